"""The cost of signature verification beside the fetch it guards, and at publish.

    .venv/bin/python bench/signing.py                               # 4 shards x 1 GiB
    .venv/bin/python bench/signing.py --shards 3 --shard-mib 2      # a smoke run

A model of ``--shards`` non-sparse shards and a config.json is signed with a generated
elliptic key through the OMS library (``model_signing``) into ``model.sig``, and fetched from
``file://`` into fresh stores with the project's own ``build_fetcher(...).warm``:

  fetch, no signing rule        the fetch alone (read, hash, O_DIRECT write, install)
  fetch, require rule           the same with the OMS check before install
  verify at end of fetch        ``SignatureGate.verify_fetch`` on its own (median of --repeats):
                                model.sig checked, its digests compared with the index
  model_signing verify          peer: the library's own ``verifying.Config().verify``, which
                                hashes every weight again (what a check without the index costs)
  authorize, no signing rule    ``Policy.authorize`` of the ready model (median)
  authorize, stored result      the same with a require rule: the recorded result is used
  authorize, re-verify          a rule trusting other keys than the recorded check: model.sig
                                verified again (median)

Targets: verify at end <= 2% of the fetch; authorize with a stored result at most 1 ms above
without a rule; re-verify <= 5% of the peer's full verify. Verdicts on stderr beside the
table; ``--json`` prints the rows on stdout.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import model_signing.signing
import model_signing.verifying
from common import output_arguments, say
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from publish_latency import write_real

from weightcache.app.wiring import build_fetcher, build_policy, build_signatures
from weightcache.daemon.config import (
    Config,
    PolicyConfig,
    SigningConfig,
    SigningRule,
    StoreConfig,
)
from weightcache.daemon.fetcher import Fetcher
from weightcache.daemon.references import parse_reference
from weightcache.daemon.signing import SignatureStatus
from weightcache.daemon.signing.gate import SignatureGate
from weightcache.daemon.store.store import Store

MIB = 1024**2
END_SHARE = 0.02
STORED_EXTRA_S = 0.001
REVERIFY_SHARE = 0.05


def arguments() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--shards", type=int, default=4, help="weight shards (default 4)")
    ap.add_argument("--shard-mib", type=float, default=1024, help="MiB per shard (default 1024)")
    ap.add_argument("--repeats", type=int, default=20, help="runs of each quick check (default 20)")
    output_arguments(ap)
    args = ap.parse_args()
    if args.shards < 1 or args.shard_mib <= 0 or args.repeats < 1:
        ap.error("--shards and --repeats must be at least 1, --shard-mib positive")
    return args


def write_key(where: Path, name: str) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    private, public = where / f"{name}.key", where / f"{name}.pub"
    private.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    public.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return private, public


def median_s(fn: Callable[[], object], repeats: int) -> float:
    runs = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - started)
    return statistics.median(runs)


def timed_fetch(config: Config, ref: str) -> tuple[float, Fetcher]:
    fetcher = build_fetcher(config, Store(config.store))
    started = time.perf_counter()
    row = fetcher.warm(parse_reference(ref))
    seconds = time.perf_counter() - started
    assert row.state == "ready", row
    return seconds, fetcher


def main() -> int:
    args = arguments()
    work = Path(tempfile.mkdtemp(prefix="wc-bench-signing-", dir=args.workdir or "/var/tmp"))
    fetchers: list[Fetcher] = []
    try:
        src = work / "src" / "model"
        nbytes = int(args.shards * args.shard_mib * MIB)
        say(f"bench: writing {nbytes / MIB:g} MiB in {args.shards} shards to {src}")
        write_real(src, nbytes, args.shards)
        (src / "config.json").write_text('{"architectures": ["Bench"]}')
        private, public = write_key(work, "team")
        _, other = write_key(work, "other")
        sig_started = time.perf_counter()
        model_signing.signing.Config().use_elliptic_key_signer(private_key=private).sign(
            src, work / "model.sig"
        )
        say(f"bench: signed with model_signing in {time.perf_counter() - sig_started:.2f} s")
        peer_started = time.perf_counter()
        model_signing.verifying.Config().use_elliptic_key_verifier(public_key=public).verify(
            src, work / "model.sig"
        )
        peer_s = time.perf_counter() - peer_started
        shutil.copy(work / "model.sig", src / "model.sig")
        ref = f"file://{src}"

        def config(name: str, keys: tuple[Path, ...] | None) -> Config:
            rules = (
                (SigningRule(models=("file://*",), mode="require", public_keys=keys),)
                if keys
                else ()
            )
            return Config(
                store=StoreConfig(root=work / name, reserve_fraction=0.0),
                policy=PolicyConfig(file_roots=(work / "src",)),
                signing=SigningConfig(rules=rules),
            )

        plain_s, plain = timed_fetch(config("plain", None), ref)
        fetchers.append(plain)
        signed_config = config("signed", (public,))
        signed_s, signed = timed_fetch(signed_config, ref)
        fetchers.append(signed)
        gate = signed.signatures
        assert isinstance(gate, SignatureGate)
        store = signed.store
        row = store.cached_model(ref)
        assert row is not None and row.signature == SignatureStatus.VERIFIED, row
        paths = {p for p, _ in store.index.model_files(row.digest)}
        model_ref = parse_reference(ref)
        end_s = median_s(lambda: gate.verify_fetch(model_ref, row.digest, paths), args.repeats)

        no_rule = build_policy(config("plain", None), plain.sources, plain.signatures)
        plain_row = plain.store.cached_model(ref)
        bare_s = median_s(lambda: no_rule.authorize(model_ref, "ns", {}, plain_row), args.repeats)
        with_rule = build_policy(signed_config, signed.sources, gate)
        stored_s = median_s(
            lambda: with_rule.authorize(model_ref, "ns", {}, store.cached_model(ref)), args.repeats
        )
        # A rule that also trusts another key: every call finds the recorded check stale.
        wider = dataclasses.replace(
            signed_config,
            signing=SigningConfig(
                rules=(
                    SigningRule(models=("file://*",), mode="require", public_keys=(public, other)),
                )
            ),
        )
        wider_gate = build_signatures(wider, store)
        assert wider_gate is not None
        wide_policy = build_policy(wider, signed.sources, wider_gate)
        fresh = store.cached_model(ref)
        assert fresh is not None
        reverify_s = median_s(
            lambda: wide_policy.authorize(model_ref, "ns", {}, fresh), args.repeats
        )

        rows = [
            ("fetch, no signing rule", plain_s, "once"),
            ("fetch, require rule", signed_s, "once, OMS check included"),
            ("verify at end of fetch", end_s, f"median of {args.repeats}; reads model.sig only"),
            ("model_signing verify", peer_s, "peer: re-hashes every file"),
            ("authorize, no signing rule", bare_s, f"median of {args.repeats}"),
            ("authorize, stored result", stored_s, f"median of {args.repeats}"),
            ("authorize, re-verify", reverify_s, f"median of {args.repeats}"),
        ]
        lines = [
            f"Signature checks of a {nbytes / MIB:g} MiB model in {args.shards} shards "
            "(file:// source), beside the fetch and the library's full verify, one run.",
            f"  {'':28} {'ms':>10}  note",
        ]
        lines += [f"  {name:28} {s * 1000:10.2f}  {note}" for name, s, note in rows]
        verdicts = [
            (
                f"verify at end {end_s / plain_s:.2%} of the fetch (target <= {END_SHARE:.0%})",
                end_s <= END_SHARE * plain_s,
            ),
            (
                f"authorize with a stored result +{(stored_s - bare_s) * 1000:.3f} ms over no "
                f"rule (target <= {STORED_EXTRA_S * 1000:g} ms)",
                stored_s - bare_s <= STORED_EXTRA_S,
            ),
            (
                f"re-verify at publish {reverify_s / peer_s:.2%} of model_signing's full verify "
                f"(target <= {REVERIFY_SHARE:.0%})",
                reverify_s <= REVERIFY_SHARE * peer_s,
            ),
        ]
        lines += [f"{'PASS' if ok else 'MISS'}  {text}" for text, ok in verdicts]
        print("\n".join(lines), file=sys.stderr)
        if args.json:
            print(
                json.dumps(
                    [
                        {"name": n, "seconds": s, "note": note, "nbytes": nbytes}
                        for n, s, note in rows
                    ]
                    + [{"verdict": text, "pass": ok} for text, ok in verdicts]
                )
            )
        return 0
    finally:
        for f in fetchers:
            f.close()
            f.store.close()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())

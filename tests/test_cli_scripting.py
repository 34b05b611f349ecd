"""The CLI as an operator scripts it, through the real ``weightcache`` console script: results on
stdout and the rest on stderr, the node's configuration found without flags, a store that does
not exist left alone, sizes with units, the node label of a reference, and the progress of
several models at once on a terminal."""

from __future__ import annotations

import json
import os
import pty
import select
import shutil
import subprocess
import sys
from pathlib import Path

import pyte
import pytest
import yaml

from weightcache.daemon.kube.naming import label_key
from weightcache.daemon.references import parse_reference
from weightcache.testing.models import sample_model, write_files

ROOT = Path(__file__).resolve().parent.parent
WEIGHTCACHE = Path(sys.executable).parent / "weightcache"
"""The console script installed beside this interpreter (``[project.scripts]``)."""
MIB = 1024 * 1024


def cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    assert WEIGHTCACHE.is_file(), f"the console script {WEIGHTCACHE} is not installed"
    clean = {k: v for k, v in os.environ.items() if k != "WEIGHTCACHE_CONFIG"}
    return subprocess.run(
        [str(WEIGHTCACHE), *args],
        capture_output=True,
        text=True,
        check=False,
        timeout=timeout,
        env={**clean, **(env or {})},
    )


def _no_traceback(out: subprocess.CompletedProcess[str]) -> None:
    assert "Traceback" not in out.stderr and "Traceback" not in out.stdout, out.stderr


@pytest.fixture
def warmed(tmp_path: Path) -> tuple[Path, str, str]:
    """A store holding one model: (store, reference, digest)."""
    src = write_files(tmp_path / "src", sample_model(90))
    store = tmp_path / "store"
    out = cli("warm", f"file://{src}", "--store", str(store), "--json")
    assert out.returncode == 0, out.stderr
    (model,) = json.loads(out.stdout)["models"]
    return store, f"file://{src}", model["digest"]


# -- stdout for results, stderr for the rest ------------------------------------------------


def test_tables_and_results_go_to_stdout(warmed: tuple[Path, str, str], tmp_path: Path) -> None:
    store, ref, digest = warmed
    ls = cli("ls", "--store", str(store))
    assert ls.returncode == 0
    lines = ls.stdout.splitlines()
    assert lines[0].split()[:2] == ["DIGEST", "STATE"]
    (row,) = [line for line in lines if line.startswith(digest[:19])]  # `ls | grep` works
    assert "ready" in row and ref in row
    assert lines[-1].startswith("used ") and "kept free" in lines[-1]
    assert digest[:19] not in ls.stderr
    verify = cli("verify", "--store", str(store))
    assert verify.returncode == 0 and verify.stdout.startswith("verify (fast): 1 models")
    # --json: stdout is one JSON document and nothing else, human lines move to stderr.
    as_json = cli("verify", "--store", str(store), "--json")
    assert json.loads(as_json.stdout)["ok"] is True
    assert "verify (fast)" in as_json.stderr
    listed = json.loads(cli("ls", "--store", str(store), "--json").stdout)
    assert [m["digest"] for m in listed["models"]] == [digest]
    # warm prints its result on stdout; progress stays on stderr.
    other = write_files(tmp_path / "other", {"w.bin": b"x" * (2 * MIB)})
    warm = cli("warm", f"file://{other}", "--store", str(store))
    assert warm.returncode == 0, warm.stderr
    assert "ready sha256:" in warm.stdout and "(100%)" not in warm.stdout
    assert "(100%)" in warm.stderr


# -- the node's configuration without flags ---------------------------------------------------


def _config(path: Path, store: Path, **settings: int | float) -> Path:
    lines = ["[store]", f'root = "{store}"', *(f"{k} = {v}" for k, v in settings.items())]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_store_commands_read_weightcache_config(warmed: tuple[Path, str, str]) -> None:
    store, _, digest = warmed
    config = _config(store.parent / "node.toml", store)
    env = {"WEIGHTCACHE_CONFIG": str(config)}
    ls = cli("ls", env=env)  # no --store, no --config: [store] root of the node's config
    assert ls.returncode == 0 and digest[:19] in ls.stdout, ls.stderr
    # Without a budget to obey, gc has nothing to do...
    assert cli("gc", env=env).stdout.startswith("gc: evicted 0 model(s)")
    # ...with the node's budget (low watermark 80% of 64 KiB), it evicts the model.
    _config(config, store, budget_bytes=65536)
    gc = cli("gc", env=env)
    assert gc.returncode == 0 and f"evicted {digest}" in gc.stdout, gc.stderr
    # --config and --store still win over the variable.
    elsewhere = cli("ls", "--store", str(store.parent / "none"), env=env)
    assert elsewhere.returncode == 1 and "no store at" in elsewhere.stderr
    # A variable naming a missing file is an error, not a silent default.
    missing = cli("ls", env={"WEIGHTCACHE_CONFIG": str(store.parent / "missing.toml")})
    assert missing.returncode == 2 and "missing.toml" in missing.stderr
    _no_traceback(missing)


def test_store_commands_read_the_default_config_path(warmed: tuple[Path, str, str]) -> None:
    """/etc/weightcache/config.toml, as the DaemonSet mounts it, seen in a mount namespace of
    the test's own so the machine's /etc is left alone."""
    store, _, digest = warmed
    unshare = shutil.which("unshare")
    assert unshare, "util-linux unshare is needed (scripts/dev installs util-linux)"
    etc = Path("/etc/weightcache")
    created = not etc.exists()
    etc.mkdir(exist_ok=True)
    try:
        script = (
            "set -e; mount -t tmpfs tmpfs /etc/weightcache; "
            f"printf '[store]\\nroot = \"{store}\"\\n' > /etc/weightcache/config.toml; "
            f"exec {WEIGHTCACHE} ls"
        )
        clean = {k: v for k, v in os.environ.items() if k != "WEIGHTCACHE_CONFIG"}
        out = subprocess.run(
            [unshare, "--mount", "--propagation", "private", "sh", "-c", script],
            capture_output=True,
            text=True,
            check=False,
            timeout=120,
            env=clean,
        )
    finally:
        if created:
            etc.rmdir()
    assert out.returncode == 0, out.stderr
    assert digest[:19] in out.stdout
    assert not (etc / "config.toml").exists()  # it lived in the namespace only


# -- a store that does not exist, and errors without tracebacks -----------------------------


@pytest.mark.parametrize("command", [["ls"], ["verify"], ["gc"], ["ls", "--json"]])
def test_a_missing_store_is_reported_and_not_created(tmp_path: Path, command: list[str]) -> None:
    store = tmp_path / "nothing-here"
    out = cli(*command, "--store", str(store))
    assert out.returncode == 1
    assert out.stderr.strip().splitlines() == [
        f"weightcache {command[0]}: no store at {store} (nothing was fetched on this node "
        "yet, or --store / [store] root names another directory)"
    ]
    assert out.stdout == ""
    assert not store.exists()


def test_an_os_error_is_one_line_naming_the_path(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    src = write_files(tmp_path / "src", {"w.bin": b"w"})
    out = cli("warm", f"file://{src}", "--store", str(blocker / "store"))
    assert out.returncode == 1
    _no_traceback(out)
    (line,) = out.stderr.strip().splitlines()
    assert line.startswith("weightcache warm: ") and str(blocker) in line, line


# -- gc sizes ---------------------------------------------------------------------------------


def test_gc_target_takes_sizes_with_units(warmed: tuple[Path, str, str]) -> None:
    store, _, digest = warmed
    keep = cli("gc", "--store", str(store), "--target-bytes", "10Gi")
    assert keep.returncode == 0 and keep.stdout.startswith("gc: evicted 0 model(s)")
    keep = cli("gc", "--store", str(store), "--target-bytes", "1G")
    assert keep.returncode == 0 and keep.stdout.startswith("gc: evicted 0 model(s)")
    for bad, why in (("-1", "must not be negative"), ("-5Gi", "must not be negative")):
        out = cli("gc", "--store", str(store), f"--target-bytes={bad}")
        assert out.returncode == 2 and why in out.stderr, out.stderr
    out = cli("gc", "--store", str(store), "--target-bytes", "10 parsecs")
    assert out.returncode == 2 and "is not a size" in out.stderr
    evict = cli("gc", "--store", str(store), "--target-bytes", "1Ki")
    assert evict.returncode == 0 and f"evicted {digest}" in evict.stdout


# -- the node label of a reference ------------------------------------------------------------


def test_label_prints_the_key_and_a_pasteable_affinity() -> None:
    refs = ["oci://Registry.Example.com:443/team/llama", "s3://bucket/models/mistral/"]
    out = cli("label", *refs)
    assert out.returncode == 0, out.stderr
    keys = [label_key(parse_reference(r)) for r in refs]
    snippet = yaml.safe_load(out.stdout)
    terms = snippet["affinity"]["nodeAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    assert [t["preference"]["matchExpressions"] for t in terms] == [
        [{"key": k, "operator": "Exists"}] for k in keys
    ]
    # The comments name the canonical reference (tag spelled out) and the label.
    assert "oci://registry.example.com/team/llama:latest" in out.stdout
    assert f"{keys[0]}=true" in out.stdout
    as_json = json.loads(cli("label", "--json", *refs).stdout)
    assert [entry["label"] for entry in as_json["labels"]] == keys
    assert as_json["affinity"] == snippet["affinity"]
    bad = cli("label", "http://not/a/model")
    assert bad.returncode == 2 and bad.stdout == ""


def test_the_warm_example_uses_the_label_the_cli_prints() -> None:
    docs = yaml.safe_load_all((ROOT / "deploy" / "examples" / "warm-deployment.yaml").read_text())
    (deployment,) = [d for d in docs if d and d["kind"] == "Deployment"]
    ref = deployment["metadata"]["annotations"]["weightcache.io/warm"]
    printed = yaml.safe_load(cli("label", ref).stdout)["affinity"]
    assert deployment["spec"]["template"]["spec"]["affinity"] == printed


# -- progress of several models on a terminal -------------------------------------------------


def test_concurrent_progress_is_one_line_per_model_on_a_terminal(tmp_path: Path) -> None:
    refs = []
    for i in range(3):
        big = {f"shard-{j}.bin": bytes([i, j]) * (2 * MIB) for j in range(2)}  # 8 MiB each
        refs.append(f"file://{write_files(tmp_path / f'src-{i}', big)}")
    main, secondary = pty.openpty()
    os.set_blocking(main, False)
    proc = subprocess.Popen(
        [str(WEIGHTCACHE), "warm", *refs, "--store", str(tmp_path / "store")],
        stdout=subprocess.PIPE,
        stderr=secondary,
        env={"TERM": "xterm", **os.environ, "COLUMNS": "200"},
    )
    os.close(secondary)
    screen = pyte.Screen(200, 50)
    stream = pyte.ByteStream(screen)
    raw = b""
    while True:
        ready, _, _ = select.select([main], [], [], 60)
        assert ready, "no output from weightcache warm within 60 s"
        try:
            chunk = os.read(main, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        raw += chunk
        stream.feed(chunk)
    os.close(main)
    assert proc.wait(120) == 0
    assert proc.stdout is not None
    results = proc.stdout.read().decode()
    assert results.count("ready sha256:") == 3
    lines = [line.rstrip() for line in screen.display if line.strip()]
    for ref in refs:
        mine = [line for line in lines if f"{ref}:" in line]
        assert len(mine) == 1, (ref, lines)  # one line per model, redrawn in place
        assert "(100%)" in mine[0] and mine[0].startswith("[" + "#" * 30 + "]")
    assert raw.count(b"\x1b[") > 3  # it was redrawn, not printed once at the end

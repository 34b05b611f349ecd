"""Generated tar layers through the unpacker and through a real fetch.

Every generated layer stack is either refused with a domain error or becomes exactly the tree
the OCI image-spec layer rules give (whiteouts, opaque whiteouts, a file replacing a directory
and back, the modelcar ``models/`` subtree), and nothing is written outside the store: no path
handed to the writer leaves it, no symlink is created, a sentinel directory beside the store is
untouched. The expected tree comes from :func:`oci_apply`, a deliberately naive reading of the
spec (quadratic scans, no index) kept independent of ``tarsafe``.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import tarfile
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from typing import IO, Literal

import pytest
from helpers import models_dir_entries, read_tree
from helpers import report as summary
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from weightcache.daemon.errors import UnsafeContent, WeightcacheError
from weightcache.daemon.fetcher import Fetcher
from weightcache.daemon.plan import safe_relpath
from weightcache.daemon.references import parse_reference
from weightcache.daemon.store.tarsafe import (
    MAX_LAYER_MEMBERS,
    TreeBuilder,
    merge,
    open_decompressed,
    unpack,
)
from weightcache.testing.models import Compression, ModelPublisher, TarMember, tar_bytes
from weightcache.testing.services import Registry

ROOT = "models"
NAMES = ("a", "b", "c")
Expect = Literal["ok", "refuse", "any"]


# -- the reference: OCI layer rules, read naively -----------------------------------------------


def _norm(name: str) -> str:
    return "/".join(p for p in name.split("/") if p not in ("", "."))


def oci_apply(layers: list[list[TarMember]], root: str) -> dict[str, bytes]:
    """The files under ``root`` after applying ``layers`` in order, per image-spec layer.md.

    Only for clean layers (no hostile members): whiteouts of each layer first, whatever their
    order, and only over the layers below; then each entry replaces what is at its path unless
    both are directories; links become copies of the file they name in the same layer."""
    state: dict[str, tuple[str, bytes]] = {}

    def drop(path: str) -> None:
        for k in [k for k in state if k == path or k.startswith(path + "/")]:
            del state[k]

    for members in layers:
        entries = []
        for m in members:
            path = _norm(m.name)
            parent, name = posixpath.split(path)
            if name == ".wh..wh..opq":
                for k in [k for k in state if not parent or k.startswith(parent + "/")]:
                    del state[k]
            elif name.startswith(".wh."):
                drop(posixpath.join(parent, name[4:]))
            else:
                entries.append((path, m))
        # A layer is a set of entries: directories first, so one listed after its own
        # children still replaces a file of the layers below without hiding those children.
        entries.sort(key=lambda e: (e[1].kind != tarfile.DIRTYPE, e[0]))
        links = []
        for path, m in entries:
            if m.kind == tarfile.DIRTYPE:
                if state.get(path, ("dir",))[0] != "dir":
                    drop(path)
                state[path] = ("dir", b"")
            elif m.kind == tarfile.REGTYPE:
                drop(path)
                assert isinstance(m.data, bytes)
                state[path] = ("file", m.data)
            else:
                links.append((path, m))
        for path, m in links:
            if m.kind == tarfile.SYMTYPE:
                target = posixpath.normpath(posixpath.join(posixpath.dirname(path), m.linkname))
            else:
                target = _norm(m.linkname)
            content = state[target][1]
            drop(path)
            state[path] = ("file", content)
    prefix = root + "/" if root else ""
    return {
        k[len(prefix) :]: v
        for k, (kind, v) in state.items()
        if kind == "file" and k.startswith(prefix)
    }


# -- generated layers ---------------------------------------------------------------------------


@dataclass
class LayerDraft:
    """One clean layer being drawn: path -> kind, and its members."""

    kinds: dict[str, str] = field(default_factory=dict)
    members: list[TarMember] = field(default_factory=list)

    def can_take(self, path: str, kind: str) -> bool:
        if path in self.kinds:
            return kind == "dir" and self.kinds[path] == "dir"
        parts = path.split("/")
        if any(
            self.kinds.get("/".join(parts[:i])) not in (None, "dir") for i in range(1, len(parts))
        ):
            return False
        return kind == "dir" or not any(k.startswith(path + "/") for k in self.kinds)

    def add(self, member: TarMember, kind: str) -> bool:
        path = _norm(member.name)
        parts = path.split("/")
        ancestors = ["/".join(parts[:i]) for i in range(1, len(parts))]
        if not self.can_take(path, kind) or not all(self.can_take(a, "dir") for a in ancestors):
            return False
        for a in ancestors:
            if a not in self.kinds:
                self.kinds[a] = "dir"
                self.members.append(TarMember(a, None, tarfile.DIRTYPE, mode=0o755))
        if path not in self.kinds:
            self.kinds[path] = kind
            self.members.append(member)
        return True


@st.composite
def clean_layer(draw: st.DrawFn, image: bool, lower: dict[str, str]) -> list[TarMember]:
    """A layer with no hostile member: files, directories, links and (images) whiteouts.

    ``lower`` (path -> "file" or "dir", what the layers below hold) is where whiteouts and
    replacements aim, so they have something to hide or replace."""
    layer = LayerDraft()
    tops = (ROOT, ROOT, ROOT, "etc", "modelsx") if image else ("w", "x", ".wh.y")
    if image and draw(st.integers(0, 9)) == 7:
        # The model directory replaced by a file (a later layer may bring it back).
        layer.add(TarMember(ROOT, b"not a directory"), "file")
        layer.kinds[ROOT + "/"] = "blocked"
        tops = ("etc",)
    for _ in range(draw(st.integers(0, 6))):
        top = draw(st.sampled_from(tops))
        rest = draw(st.lists(st.sampled_from(NAMES), min_size=1, max_size=3))
        path = "/".join([top, *rest])
        if lower and draw(st.booleans()):  # replace something below, by the other kind
            path = draw(st.sampled_from(sorted(lower)))
            if path == ROOT or not path.startswith(tops):
                continue
            kind = "dir" if lower[path] == "file" else "file"
        else:
            kind = "file" if draw(st.integers(0, 2)) else "dir"
        if kind == "file":
            layer.add(TarMember(path, draw(st.binary(max_size=64))), "file")
        else:
            layer.add(TarMember(path, None, tarfile.DIRTYPE, mode=0o755), "dir")
    if image and ROOT + "/" not in layer.kinds and lower:
        below = sorted(lower)
        for _ in range(draw(st.integers(0, 3))):
            action = draw(st.sampled_from(("hide", "opaque", "hide", "model")))
            dirs = [  # directories in the model with files below them: something to hide
                k
                for k in below
                if lower[k] == "dir"
                and k.startswith(f"{ROOT}/")
                and any(f.startswith(f"{k}/") and lower[f] == "file" for f in below)
            ]
            if action == "opaque" and dirs:
                where, marker = draw(st.sampled_from(dirs)), ".wh..wh..opq"
            elif action != "model":
                where, name = posixpath.split(draw(st.sampled_from(below)))
                marker = ".wh." + name
            else:  # the model directory itself, or everything
                where, marker = draw(
                    st.sampled_from(
                        (("", ".wh..wh..opq"), ("", f".wh.{ROOT}"), (ROOT, ".wh..wh..opq"))
                    )
                )
            path = posixpath.join(where, marker)
            if where and not layer.add(TarMember(where, None, tarfile.DIRTYPE, mode=0o755), "dir"):
                continue
            if path not in layer.kinds:
                layer.kinds[path] = "whiteout"
                layer.members.append(TarMember(path, b""))
    files = [k for k, v in layer.kinds.items() if v == "file" and k.startswith(f"{ROOT}/")]
    if not image:
        files = [k for k, v in layer.kinds.items() if v == "file"]
    for _ in range(draw(st.integers(0, 2)) if files else 0):
        target = draw(st.sampled_from(files))
        path = posixpath.join(posixpath.dirname(target), "link-" + draw(st.sampled_from(NAMES)))
        if draw(st.booleans()):
            rel = posixpath.relpath(target, posixpath.dirname(path))
            member = TarMember(path, None, tarfile.SYMTYPE, rel)
        else:
            member = TarMember(path, None, tarfile.LNKTYPE, target)
        layer.add(member, "link")
    return draw(st.permutations(layer.members))


@st.composite
def layer_stacks(draw: st.DrawFn, image: bool) -> list[list[TarMember]]:
    """One to four clean layers, each drawn knowing what the ones below hold."""
    layers: list[list[TarMember]] = []
    lower: dict[str, str] = {}
    for _ in range(draw(st.integers(1, 4))):
        members = draw(clean_layer(image, lower))
        layers.append(members)
        for m in members:
            if not posixpath.basename(m.name).startswith(".wh.") or not image:
                lower[_norm(m.name)] = "dir" if m.kind == tarfile.DIRTYPE else "file"
    return layers


def hostile_groups(prefix: str, image: bool) -> list[list[TarMember]]:
    """Member groups that must make any layer holding them refused."""
    groups = [
        [TarMember("../evil.bin", b"x")],
        [TarMember("/abs/evil.bin", b"x")],
        [TarMember(f"{prefix}a/../../../evil.bin", b"x")],
        [TarMember(f"{prefix}evil-ln", None, tarfile.SYMTYPE, "../../../etc/passwd")],
        [TarMember(f"{prefix}evil-ln", None, tarfile.SYMTYPE, "/etc/passwd")],
        [TarMember(f"{prefix}evil-hl", None, tarfile.LNKTYPE, "../outside")],
        [TarMember(f"{prefix}evil-hl", None, tarfile.LNKTYPE, "/etc/passwd")],
        [TarMember(f"{prefix}evil-hl", None, tarfile.LNKTYPE, "etc/passwd")],
        [TarMember(f"{prefix}evil-dev", None, tarfile.CHRTYPE)],
        [TarMember(f"{prefix}evil-blk", None, tarfile.BLKTYPE)],
        [TarMember(f"{prefix}evil-fifo", None, tarfile.FIFOTYPE)],
        [TarMember(f"{prefix}evil-dangling", None, tarfile.SYMTYPE, "no-such-file")],
        [TarMember(f"{prefix}back\\slash", b"x")],
        [TarMember(prefix + "n" * 256, b"x")],
        [TarMember(f"{prefix}bad-\udcff-name", b"x")],
        [
            TarMember(f"{prefix}cycle-1", None, tarfile.SYMTYPE, "cycle-2"),
            TarMember(f"{prefix}cycle-2", None, tarfile.SYMTYPE, "cycle-1"),
        ],
        [
            TarMember(f"{prefix}evil-dir", None, tarfile.DIRTYPE, mode=0o755),
            TarMember(f"{prefix}evil-dir-link", None, tarfile.SYMTYPE, "evil-dir"),
        ],
        [TarMember(f"{prefix}evil-dup", b"one"), TarMember(f"{prefix}evil-dup", b"two")],
        [TarMember(f"{prefix}evil-fd", b"file"), TarMember(f"{prefix}evil-fd/inside", b"x")],
    ]
    if image:
        groups += [
            [TarMember(f"{prefix}.wh.", b"")],
            [TarMember(f"{prefix}.wh..", b"")],
            [TarMember(f"{prefix}.wh...", b"")],
        ]
    return groups


@dataclass
class Case:
    image: bool
    layers: list[list[TarMember]]
    compression: Compression
    expect: Expect
    max_members: int = MAX_LAYER_MEMBERS
    max_bytes: int = 1 << 40
    corrupt: tuple[int, int] | None = None
    """(layer index, byte offset) of a flipped byte, or of the cut when negative."""


def _in_root_bytes(members: list[TarMember], image: bool) -> int:
    total = 0
    for m in members:
        path = _norm(m.name)
        under = not image or path.startswith(ROOT + "/")
        whiteout = image and posixpath.basename(path).startswith(".wh.")
        if m.kind == tarfile.REGTYPE and isinstance(m.data, bytes) and under and not whiteout:
            total += len(m.data)
    return total


def _modelkit_conflicts(layers: list[list[TarMember]]) -> bool:
    """Whether layers without override semantics collide (a path twice, a file as a dir)."""
    files: set[str] = set()
    dirs: set[str] = set()
    for members in layers:
        for m in members:
            path = _norm(m.name)
            parts = path.split("/")
            dirs.update("/".join(parts[:i]) for i in range(1, len(parts)))
            if m.kind == tarfile.DIRTYPE:
                dirs.add(path)
            elif path in files:
                return True
            else:
                files.add(path)
    return bool(files & dirs)


@st.composite
def cases(draw: st.DrawFn, *, knobs: bool = True) -> Case:
    image = draw(st.booleans())
    layers = draw(layer_stacks(image))
    compression: Compression = draw(st.sampled_from(("none", "gzip", "zstd")))
    expect: Expect = "refuse" if not image and _modelkit_conflicts(layers) else "ok"
    case = Case(image, layers, compression, expect)
    if draw(st.integers(0, 2)) == 1:
        group = draw(st.sampled_from(hostile_groups(f"{ROOT}/" if image else "", image)))
        at = draw(st.integers(0, len(layers) - 1))
        layer = list(layers[at])
        pos = draw(st.integers(0, len(layer)))
        layers[at] = layer[:pos] + group + layer[pos:]
        case.expect = "refuse"
    if knobs:
        most = max(len(m) for m in layers)
        if most > 1 and draw(st.integers(0, 9)) == 3:
            case.max_members = draw(st.integers(1, most - 1))
            case.expect = "refuse"
        biggest = max(_in_root_bytes(m, image) for m in layers)
        if biggest > 0 and draw(st.integers(0, 9)) == 4:
            case.max_bytes = draw(st.integers(0, biggest - 1))
            case.expect = "refuse"
        if draw(st.integers(0, 9)) == 5:
            at = draw(st.integers(0, len(layers) - 1))
            case.corrupt = (at, draw(st.integers(-(1 << 16), 1 << 16)))
            case.expect = "any"
    return case


# -- running a case in a sandbox ----------------------------------------------------------------


def _inside(base: Path, rel: str) -> bool:
    if os.path.isabs(rel):
        return False
    lexical = os.path.normpath(os.path.join(base, rel))
    real = os.path.realpath(os.path.join(base, rel))
    return lexical.startswith(f"{base}{os.sep}") and real.startswith(f"{base}{os.sep}")


class Sandbox:
    """A store directory with a sentinel beside it; counts paths that would leave the store."""

    def __init__(self, top: Path) -> None:
        self.top = top
        self.store = top / "store"
        self.sentinel = top / "sentinel"
        (self.store / "staged").mkdir(parents=True)
        self.sentinel.mkdir()
        (self.sentinel / "keep.txt").write_bytes(b"sentinel")
        self.outside = 0
        self._n = 0

    def write(self, rel: str, reader: IO[bytes], size: int) -> str:
        data = reader.read(size)
        if not _inside(self.store, rel):
            self.outside += 1
        self._n += 1
        (self.store / "staged" / str(self._n)).write_bytes(data)
        sha = "sha256:" + hashlib.sha256(data).hexdigest()
        (self.store / "staged" / sha.removeprefix("sha256:")).write_bytes(data)
        return sha

    def install(self, files: dict[str, str]) -> dict[str, bytes]:
        """Build the tree the way the store does (plain files, parents made); read it back."""
        tree = self.store / "tree"
        tree.mkdir()
        for rel, sha in files.items():
            if not _inside(tree, rel):
                self.outside += 1
                continue
            target = tree / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes((self.store / "staged" / sha.removeprefix("sha256:")).read_bytes())
        return read_tree(tree)

    def untouched(self) -> bool:
        """Nothing but store/ and sentinel/ at the top, no symlink anywhere, sentinel intact."""
        if sorted(p.name for p in self.top.iterdir()) != ["sentinel", "store"]:
            return False
        for dirpath, dirnames, filenames in os.walk(self.top):
            for name in dirnames + filenames:
                if os.path.islink(os.path.join(dirpath, name)):
                    return False
        return [p.name for p in self.sentinel.iterdir()] == ["keep.txt"] and (
            self.sentinel / "keep.txt"
        ).read_bytes() == b"sentinel"


def _layer_bytes(case: Case, i: int) -> bytes:
    data = tar_bytes(case.layers[i], case.compression)
    if case.corrupt is not None and case.corrupt[0] == i and data:
        off = case.corrupt[1]
        if off < 0:
            data = data[: abs(off) % len(data)]
        else:
            flipped = bytearray(data)
            flipped[off % len(data)] ^= 0x5A
            data = bytes(flipped)
    return data


def run_case(case: Case, sandbox: Sandbox) -> dict[str, bytes]:
    """Unpack and merge every layer the way the fetcher does; return the installed tree."""
    tree = TreeBuilder(allow_override=case.image)
    for i in range(len(case.layers)):
        stream = open_decompressed(BytesIO(_layer_bytes(case, i)), case.compression)
        layer = unpack(
            stream,
            sandbox.write,
            root=ROOT if case.image else "",
            whiteouts=case.image,
            where=f"layer {i}",
            max_bytes=case.max_bytes,
            max_members=case.max_members,
        )
        merge(tree, layer, "model")
    for path in tree.files:
        assert safe_relpath(path, what="tree") == path
    return sandbox.install(tree.files)


class Tally:
    """Outcome counts, reported in the terminal summary (shown with or without ``-s``)."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.counts: Counter[str] = Counter()

    def line(self) -> str:
        c = self.counts
        return (
            f"{self.what}: {c['generated']} generated, {c['refused']} refused with a clear error, "
            f"{c['correct']} correct models, {c['internal']} internal errors, "
            f"{c['wrong']} wrong outcomes, {c['outside']} files outside the store"
        )


def report(config: pytest.Config, line: str) -> None:
    summary(config, "generated hostile inputs", line)


# -- the tests ----------------------------------------------------------------------------------


GENERATED = settings(
    max_examples=300,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)


def check_case(tally: Tally, case: Case) -> None:
    """Run one case in a fresh sandbox; count its outcome; fail on a wrong one."""
    tally.counts["generated"] += 1
    with tempfile.TemporaryDirectory(prefix="wc-tar-") as top:
        sandbox = Sandbox(Path(top))
        try:
            got = run_case(case, sandbox)
        except WeightcacheError:
            tally.counts["refused"] += 1
            assert case.expect != "ok", "a clean layer stack was refused"
        except Exception:
            tally.counts["internal"] += 1
            raise
        else:
            want = oci_apply(case.layers, ROOT if case.image else "")
            if case.expect == "refuse" or (case.expect == "ok" and got != want):
                tally.counts["wrong"] += 1
            assert case.expect != "refuse", f"a hostile layer stack was accepted: {sorted(got)}"
            if case.expect == "ok":
                assert got == want
            tally.counts["correct"] += 1
        finally:
            untouched = sandbox.untouched()
            tally.counts["outside"] += sandbox.outside + (not untouched)
        assert sandbox.outside == 0 and untouched


def test_generated_layers_are_refused_or_follow_the_layer_rules(
    request: pytest.FixtureRequest,
) -> None:
    tally = Tally("tar layers")

    @GENERATED
    @given(case=cases())
    def one(case: Case) -> None:
        check_case(tally, case)

    one()
    report(request.config, tally.line())
    c = tally.counts
    assert c["generated"] >= 200
    assert c["refused"] > 0 and c["correct"] > 0
    assert c["refused"] + c["correct"] == c["generated"]
    assert c["internal"] == c["wrong"] == c["outside"] == 0


def _apply(layers: list[list[TarMember]], **kw: int) -> dict[str, bytes]:
    with tempfile.TemporaryDirectory(prefix="wc-tar-") as top:
        sandbox = Sandbox(Path(top))
        got = run_case(Case(True, layers, "none", "ok", **kw), sandbox)
        assert sandbox.outside == 0 and sandbox.untouched()
    assert got == oci_apply(layers, ROOT)
    return got


def _dir(name: str) -> TarMember:
    return TarMember(name, None, tarfile.DIRTYPE, mode=0o755)


BASE = [
    _dir("models"),
    _dir("models/a"),
    TarMember("models/a/x", b"x"),
    TarMember("models/y", b"y"),
]


@pytest.mark.parametrize(
    ("upper", "want"),
    [
        ([TarMember("models/.wh..wh..opq", b""), TarMember("models/z", b"z")], {"z": b"z"}),
        ([TarMember("models/z", b"z"), TarMember("models/.wh..wh..opq", b"")], {"z": b"z"}),
        ([TarMember(".wh.models", b"")], {}),
        (
            [TarMember(".wh..wh..opq", b""), _dir("models"), TarMember("models/z", b"z")],
            {"z": b"z"},
        ),
        ([TarMember("models/a/.wh..wh..opq", b"")], {"y": b"y"}),
        ([TarMember("models/.wh.a", b"")], {"y": b"y"}),
        ([TarMember("models/a", b"file now")], {"a": b"file now", "y": b"y"}),
        ([_dir("models/y"), TarMember("models/y/z", b"z")], {"a/x": b"x", "y/z": b"z"}),
        ([TarMember("models", b"not a directory")], {}),
        ([TarMember("models/.wh..wh.plnk", b"")], {"a/x": b"x", "y": b"y"}),
    ],
    ids=[
        "opaque-models-dir",
        "opaque-after-its-siblings",
        "whiteout-of-models",
        "opaque-above-models",
        "opaque-subdir",
        "whiteout-of-a-dir",
        "file-replaces-dir",
        "dir-replaces-file",
        "file-replaces-models",
        "aufs-metadata-ignored",
    ],
)
def test_oci_layer_rules(upper: list[TarMember], want: dict[str, bytes]) -> None:
    assert _apply([BASE, upper]) == want


def test_the_model_directory_comes_back_after_a_file_replaced_it() -> None:
    layers = [BASE, [TarMember("models", b"file")], [_dir("models"), TarMember("models/n", b"n")]]
    assert _apply(layers) == {"n": b"n"}


def test_the_member_cap_is_exact() -> None:
    layer = [_dir("models"), *(TarMember(f"models/f{i}", b"") for i in range(9))]
    assert len(_apply([layer], max_members=10)) == 9
    with pytest.raises(UnsafeContent, match="more than 9 entries"):
        _apply([layer], max_members=9)


def test_whiteouts_and_links_cost_constant_time_each() -> None:
    """10,000 files whited out one by one by the next layer, then 10,000 links in one chain
    listed last to first. Merging them is what whiteouts and links cost: a scan of the tree per
    whiteout, or a pass over the pending links per link, takes several seconds each at this
    size; an index of each directory's children and one walk per chain take milliseconds."""
    n = 10_000
    files = [_dir("models"), *(TarMember(f"models/f{i}", b"") for i in range(n))]
    whiteouts = [TarMember(f"models/.wh.f{i}", b"") for i in range(0, n, 2)]
    chain = [TarMember("models/l0", b"end")] + [
        TarMember(f"models/l{i}", None, tarfile.SYMTYPE, f"l{i - 1}") for i in range(n, 0, -1)
    ]
    tree = TreeBuilder(allow_override=True)
    merging = 0.0
    for i, members in enumerate([files, whiteouts, chain]):
        layer = unpack(
            BytesIO(tar_bytes(members)),
            lambda rel, reader, size: "sha256:" + hashlib.sha256(reader.read(size)).hexdigest(),
            root=ROOT,
            whiteouts=True,
            where=f"layer {i}",
            max_bytes=1 << 30,
        )
        started = time.monotonic()
        merge(tree, layer, "model")
        merging += time.monotonic() - started
    assert len(tree.files) == n // 2 + n + 1
    assert tree.files[f"l{n}"] == tree.files["l0"]
    assert "f0" not in tree.files and "f1" in tree.files
    assert merging < 2, f"merging took {merging:.2f}s"


# -- end to end: generated images pushed to the real registry, fetched by the real fetcher ----


@st.composite
def image_cases(draw: st.DrawFn) -> tuple[list[list[TarMember]], bool]:
    """Clean image layer stacks, a third of them with one hostile group: (layers, hostile)."""
    layers = draw(layer_stacks(True))
    hostile = draw(st.integers(0, 2)) == 1
    if hostile:
        group = draw(st.sampled_from(hostile_groups(f"{ROOT}/", True)))
        at = draw(st.integers(0, len(layers) - 1))
        layers[at] = [*layers[at], *group]
    return layers, hostile


def test_generated_images_fetched_end_to_end(
    request: pytest.FixtureRequest,
    registry: Registry,
    publisher: ModelPublisher,
    fetcher: Fetcher,
) -> None:
    tally = Tally("tar layers end to end")
    root = fetcher.store.config.root

    @settings(
        max_examples=20,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow],
    )
    @given(case=image_cases())
    def one(case: tuple[list[list[TarMember]], bool]) -> None:
        layers, hostile = case
        tally.counts["generated"] += 1
        tag = f"g{tally.counts['generated']}"
        desc = publisher.image_layers("gen/layers", tag, layers, "gzip")
        try:
            row = fetcher.warm(parse_reference(f"oci://{registry.host}/gen/layers@{desc.digest}"))
        except WeightcacheError:
            tally.counts["refused"] += 1
            assert hostile, "a clean image was refused"
            assert desc.digest.removeprefix("sha256:") not in models_dir_entries(root)
            return
        except Exception:
            tally.counts["internal"] += 1
            raise
        got = read_tree(fetcher.store.model_path(row.digest))  # regular files only
        if hostile or got != oci_apply(layers, ROOT):
            tally.counts["wrong"] += 1
        assert not hostile, f"a hostile image was accepted: {sorted(got)}"
        assert got == oci_apply(layers, ROOT)
        tally.counts["correct"] += 1

    one()
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            if os.path.islink(os.path.join(dirpath, name)):
                tally.counts["outside"] += 1
    report(request.config, tally.line())
    c = tally.counts
    assert c["generated"] >= 20 and c["refused"] > 0 and c["correct"] > 0
    assert c["internal"] == c["wrong"] == c["outside"] == 0

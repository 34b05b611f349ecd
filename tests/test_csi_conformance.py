"""What the CSI spec (v1.12) requires of Identity, Node and Controller, checked over the real
unix sockets of both plugins: required fields, capabilities, idempotency, publish/unpublish
semantics, CreateVolume name idempotency, and UNIMPLEMENTED for what is not offered."""

from __future__ import annotations

import asyncio
import errno
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from csi_harness import (
    AccessMode,
    mount_cap,
    mountinfo_entries,
    publish,
    serving_controller,
    serving_node,
    unpublish,
)
from helpers import make_config

from weightcache.app.wiring import build_sources
from weightcache.csi.identity import DRIVER_NAME
from weightcache.daemon.errors import SourceError
from weightcache.daemon.references import ModelRef, parse_reference
from weightcache.proto import csi_pb2
from weightcache.testing.models import sample_model, write_files

Code = grpc.StatusCode
PARAMS = {"model": "oci://registry.example/team/llama@sha256:" + "a" * 64}


async def _code(call: Any) -> tuple[Code, str]:
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await call
    return exc.value.code(), exc.value.details() or ""


@pytest.fixture
def model(tmp_path: Path) -> tuple[str, dict[str, bytes]]:
    files = sample_model(71)
    return f"file://{write_files(tmp_path / 'src', files)}", files


# -- Identity, on both endpoints -------------------------------------------------------------


def test_identity_is_the_same_on_both_endpoints(tmp_path: Path) -> None:
    async def main() -> list[tuple[str, str, list[int], bool]]:
        out = []
        async with (
            serving_node(tmp_path, make_config(tmp_path / "store")) as node,
            serving_controller(tmp_path) as controller,
        ):
            for stub in (node.identity, controller.identity):
                info = await stub.GetPluginInfo(csi_pb2.GetPluginInfoRequest())
                caps = await stub.GetPluginCapabilities(csi_pb2.GetPluginCapabilitiesRequest())
                probe = await stub.Probe(csi_pb2.ProbeRequest())
                services = [c.service.type for c in caps.capabilities]
                out.append((info.name, info.vendor_version, services, probe.ready.value))
        return out

    node_side, controller_side = asyncio.run(main())
    assert node_side == controller_side
    name, version, services, ready = node_side
    assert name == DRIVER_NAME and version and ready
    assert services == [csi_pb2.PluginCapability.Service.CONTROLLER_SERVICE]


# -- Controller ------------------------------------------------------------------------------


def create(name: str = "pvc-1", **params: str) -> csi_pb2.CreateVolumeRequest:
    return csi_pb2.CreateVolumeRequest(
        name=name,
        volume_capabilities=[mount_cap(AccessMode.MULTI_NODE_READER_ONLY)],
        parameters=params or PARAMS,
        capacity_range=csi_pb2.CapacityRange(required_bytes=1 << 30),
    )


def test_controller_capabilities(tmp_path: Path) -> None:
    async def main() -> list[int]:
        async with serving_controller(tmp_path) as c:
            caps = await c.stub.ControllerGetCapabilities(
                csi_pb2.ControllerGetCapabilitiesRequest()
            )
            return [cap.rpc.type for cap in caps.capabilities]

    assert asyncio.run(main()) == [csi_pb2.ControllerServiceCapability.RPC.CREATE_DELETE_VOLUME]


def test_create_volume_is_idempotent_by_name(tmp_path: Path) -> None:
    async def main() -> None:
        async with serving_controller(tmp_path) as c:
            first = (await c.stub.CreateVolume(create())).volume
            again = (await c.stub.CreateVolume(create())).volume
            assert first == again
            assert first.volume_id.startswith("wc-")
            assert dict(first.volume_context) == {
                **PARAMS,
                "verify": "fast",
                "fetch": "IfNotCached",
            }
            assert first.capacity_bytes == 1 << 30  # no size lookup: what was requested
            other = (await c.stub.CreateVolume(create("pvc-2"))).volume
            assert other.volume_id != first.volume_id
            code, msg = await _code(c.stub.CreateVolume(create(**PARAMS, verify="full")))
            assert code == Code.ALREADY_EXISTS and "pvc-1" in msg
            # The provisioner's per-claim metadata names the claim, not the volume.
            meta = {**PARAMS, "csi.storage.k8s.io/pvc/name": "claim"}
            assert (await c.stub.CreateVolume(create(**meta))).volume == first
            # Deleting frees the name; any id, known or not, deletes successfully (twice).
            for _ in range(2):
                await c.stub.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=first.volume_id))
            await c.stub.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id="never-seen"))
            recreated = await c.stub.CreateVolume(create(**PARAMS, verify="full"))
            assert recreated.volume.volume_context["verify"] == "full"

    asyncio.run(main())


def test_volume_ids_do_not_depend_on_the_process(tmp_path: Path) -> None:
    async def one() -> str:
        async with serving_controller(tmp_path) as c:
            return str((await c.stub.CreateVolume(create())).volume.volume_id)

    assert asyncio.run(one()) == asyncio.run(one())


def test_capacity_is_the_model_size_when_known(
    tmp_path: Path, model: tuple[str, dict[str, bytes]]
) -> None:
    ref, files = model
    sources = build_sources(make_config(tmp_path / "unused"))

    def size(r: ModelRef) -> int:
        return sources.for_ref(r).resolve(r).total_bytes

    def unknown(r: ModelRef) -> int:
        raise SourceError("registry down", reason="network", retryable=True)

    total = sum(map(len, files.values()))

    async def main() -> None:
        async with serving_controller(tmp_path, size) as c:
            small = create(model=ref)
            small.capacity_range.required_bytes = 1
            assert (await c.stub.CreateVolume(small)).volume.capacity_bytes == total
            # Never less than asked: the provisioner deletes a volume smaller than the claim.
            big = (await c.stub.CreateVolume(create("pvc-big", model=ref))).volume
            assert big.capacity_bytes == 1 << 30 > total
            tight = create("pvc-tight", model=ref)
            tight.capacity_range.limit_bytes = total - 1
            tight.capacity_range.required_bytes = 1
            code, msg = await _code(c.stub.CreateVolume(tight))
            assert code == Code.OUT_OF_RANGE and str(total) in msg
        again = tmp_path / "again"  # a fresh socket path: the first server's may linger
        again.mkdir()
        async with serving_controller(again, unknown) as c:
            vol = (await c.stub.CreateVolume(create("pvc-3", model=ref))).volume
            assert vol.capacity_bytes == 1 << 30

    asyncio.run(main())


def _drop(field: str) -> Callable[[Any], None]:
    return lambda r: r.ClearField(field)


@pytest.mark.parametrize(
    ("mutate", "code", "message"),
    [
        (_drop("name"), Code.INVALID_ARGUMENT, "name is required"),
        (_drop("volume_capabilities"), Code.INVALID_ARGUMENT, "volume_capabilities is required"),
        (
            lambda r: r.volume_capabilities[0].ClearField("access_mode"),
            Code.INVALID_ARGUMENT,
            "access_mode is required",
        ),
        (
            lambda r: r.volume_capabilities[0].block.SetInParent(),
            Code.INVALID_ARGUMENT,
            "block access",
        ),
        (lambda r: r.parameters.pop("model"), Code.INVALID_ARGUMENT, "'model' is required"),
        (
            lambda r: r.parameters.__setitem__("model", "http://x/y"),
            Code.INVALID_ARGUMENT,
            "'model'",
        ),
        (
            lambda r: r.parameters.__setitem__("fetch", "Always"),
            Code.INVALID_ARGUMENT,
            "'fetch' must be",
        ),
        (
            lambda r: r.parameters.__setitem__("modle", "x"),
            Code.INVALID_ARGUMENT,
            "unknown volume attribute",
        ),
        (
            lambda r: r.volume_content_source.snapshot.SetInParent(),
            Code.INVALID_ARGUMENT,
            "volume_content_source",
        ),
        (
            lambda r: setattr(r.capacity_range, "limit_bytes", 1),
            Code.OUT_OF_RANGE,
            "required_bytes",
        ),
    ],
)
def test_create_volume_field_errors(
    tmp_path: Path, mutate: Callable[[Any], None], code: Code, message: str
) -> None:
    request = create()
    mutate(request)

    async def main() -> tuple[Code, str]:
        async with serving_controller(tmp_path) as c:
            return await _code(c.stub.CreateVolume(request))

    got, msg = asyncio.run(main())
    assert (got, message in msg) == (code, True), msg


def test_delete_and_validate_field_errors(tmp_path: Path) -> None:
    async def main() -> None:
        async with serving_controller(tmp_path) as c:
            code, msg = await _code(c.stub.DeleteVolume(csi_pb2.DeleteVolumeRequest()))
            assert (code, msg) == (Code.INVALID_ARGUMENT, "volume_id is required")
            validate = c.stub.ValidateVolumeCapabilities
            code, msg = await _code(
                validate(
                    csi_pb2.ValidateVolumeCapabilitiesRequest(volume_capabilities=[mount_cap()])
                )
            )
            assert (code, msg) == (Code.INVALID_ARGUMENT, "volume_id is required")
            vid = (await c.stub.CreateVolume(create())).volume.volume_id
            code, msg = await _code(
                validate(csi_pb2.ValidateVolumeCapabilitiesRequest(volume_id=vid))
            )
            assert (code, msg) == (Code.INVALID_ARGUMENT, "volume_capabilities is required")

    asyncio.run(main())


def test_validate_volume_capabilities(tmp_path: Path) -> None:
    async def main() -> None:
        async with serving_controller(tmp_path) as c:
            vol = (await c.stub.CreateVolume(create())).volume
            ok = await c.stub.ValidateVolumeCapabilities(
                csi_pb2.ValidateVolumeCapabilitiesRequest(
                    volume_id=vol.volume_id,
                    volume_context=vol.volume_context,
                    volume_capabilities=[
                        mount_cap(AccessMode.MULTI_NODE_READER_ONLY),
                        mount_cap(AccessMode.SINGLE_NODE_WRITER),
                    ],
                )
            )
            assert ok.HasField("confirmed")
            assert len(ok.confirmed.volume_capabilities) == 2
            block = csi_pb2.VolumeCapability(
                block=csi_pb2.VolumeCapability.BlockVolume(),
                access_mode=AccessMode(mode=AccessMode.SINGLE_NODE_READER_ONLY),
            )
            refused = await c.stub.ValidateVolumeCapabilities(
                csi_pb2.ValidateVolumeCapabilitiesRequest(
                    volume_id=vol.volume_id, volume_capabilities=[block]
                )
            )
            assert not refused.HasField("confirmed") and "block" in refused.message
            code, _ = await _code(
                c.stub.ValidateVolumeCapabilities(
                    csi_pb2.ValidateVolumeCapabilitiesRequest(
                        volume_id="pvc-from-another-driver", volume_capabilities=[mount_cap()]
                    )
                )
            )
            assert code == Code.NOT_FOUND

    asyncio.run(main())


def test_what_is_not_offered_is_unimplemented(tmp_path: Path) -> None:
    async def main() -> list[Code]:
        codes = []
        async with (
            serving_node(tmp_path, make_config(tmp_path / "store")) as n,
            serving_controller(tmp_path) as c,
        ):
            for call in (
                c.stub.ControllerPublishVolume(csi_pb2.ControllerPublishVolumeRequest()),
                c.stub.ListVolumes(csi_pb2.ListVolumesRequest()),
                c.stub.CreateSnapshot(csi_pb2.CreateSnapshotRequest()),
                c.stub.ControllerExpandVolume(csi_pb2.ControllerExpandVolumeRequest()),
                n.stub.NodeStageVolume(csi_pb2.NodeStageVolumeRequest()),
                n.stub.NodeGetVolumeStats(csi_pb2.NodeGetVolumeStatsRequest()),
                n.stub.NodeExpandVolume(csi_pb2.NodeExpandVolumeRequest()),
            ):
                codes.append((await _code(call))[0])
        return codes

    assert set(asyncio.run(main())) == {Code.UNIMPLEMENTED}


# -- Node ------------------------------------------------------------------------------------


def test_node_info_and_capabilities(tmp_path: Path) -> None:
    async def main() -> tuple[str, list[Any]]:
        async with serving_node(tmp_path, make_config(tmp_path / "store")) as n:
            info = await n.stub.NodeGetInfo(csi_pb2.NodeGetInfoRequest())
            caps = await n.stub.NodeGetCapabilities(csi_pb2.NodeGetCapabilitiesRequest())
            return info.node_id, list(caps.capabilities)

    node_id, caps = asyncio.run(main())
    # No STAGE_UNSTAGE_VOLUME: the kubelet goes straight to publish, which is what makes a
    # mount a single bind of an already-present tree.
    assert node_id == "node-1" and caps == []


def test_publish_semantics_on_real_mounts(
    tmp_path: Path, model: tuple[str, dict[str, bytes]]
) -> None:
    ref, files = model
    pods = tmp_path / "kubelet" / "pods"
    targets = [
        pods / f"uid-{i}" / "volumes" / "kubernetes.io~csi" / "model" / "mount" for i in range(3)
    ]

    async def main() -> None:
        async with serving_node(tmp_path, make_config(tmp_path / "store")) as n:
            await asyncio.to_thread(n.fetcher.warm, parse_reference(ref))
            # Inline (SINGLE_NODE_WRITER, readonly=false), static PV and StorageClass volumes
            # (MULTI_NODE_READER_ONLY, readonly=true) are all mounted read-only.
            inline = publish(ref, targets[0], **{"csi.storage.k8s.io/ephemeral": "true"})
            static = publish(ref, targets[1])
            static.volume_capability.CopyFrom(mount_cap(AccessMode.MULTI_NODE_READER_ONLY))
            static.readonly = True
            dynamic = publish(ref, targets[2], verify="fast", fetch="CachedOnly")
            dynamic.volume_id = "wc-" + "0" * 40
            for request in (inline, static, dynamic):
                await n.stub.NodePublishVolume(request)
                await n.stub.NodePublishVolume(request)  # idempotent
            for target in targets:
                assert mountinfo_entries(target) == 1, target
                entry = n.mounter.mounts()[str(target)]
                assert {"ro", "nosuid", "nodev"} <= entry.options
                assert {p: (target / p).read_bytes() for p in files} == files
                with pytest.raises(OSError) as exc:
                    (target / "new-file").write_bytes(b"x")
                assert exc.value.errno == errno.EROFS
                with pytest.raises(OSError) as exc:
                    (target / next(iter(files))).write_bytes(b"x")
                assert exc.value.errno in (errno.EROFS, errno.EACCES)
            digest = n.store.models()[0].digest
            assert {(m, h) for m, _, h in n.store.pins()} == {(digest, str(t)) for t in targets}
            # Another volume on a target already in use is ALREADY_EXISTS, and changes nothing.
            other = write_files(tmp_path / "other", {"w.bin": b"other model"})
            await asyncio.to_thread(n.fetcher.warm, parse_reference(f"file://{other}"))
            code, _ = await _code(n.stub.NodePublishVolume(publish(f"file://{other}", targets[0])))
            assert code == Code.ALREADY_EXISTS
            assert (targets[0] / next(iter(files))).read_bytes() == files[next(iter(files))]
            for target in targets:
                await n.stub.NodeUnpublishVolume(unpublish(target))
                await n.stub.NodeUnpublishVolume(unpublish(target))  # idempotent
                assert mountinfo_entries(target) == 0 and not target.exists()
            assert n.store.pins() == []

    asyncio.run(main())


@pytest.mark.parametrize(
    ("request_", "message"),
    [
        (csi_pb2.NodeUnpublishVolumeRequest(target_path="/x"), "volume_id is required"),
        (csi_pb2.NodeUnpublishVolumeRequest(volume_id="v"), "target_path is required"),
        (
            csi_pb2.NodeUnpublishVolumeRequest(volume_id="v", target_path="a/b"),
            "must be an absolute path",
        ),
        (
            csi_pb2.NodeUnpublishVolumeRequest(volume_id="v", target_path="/a/../b"),
            "without '..'",
        ),
    ],
)
def test_unpublish_field_errors(
    tmp_path: Path, request_: csi_pb2.NodeUnpublishVolumeRequest, message: str
) -> None:
    async def main() -> tuple[Code, str]:
        async with serving_node(tmp_path, make_config(tmp_path / "store")) as n:
            return await _code(n.stub.NodeUnpublishVolume(request_))

    code, msg = asyncio.run(main())
    assert code == Code.INVALID_ARGUMENT and message in msg


def test_publish_refuses_block_and_checks_fields_before_any_lookup(tmp_path: Path) -> None:
    request = publish("oci://127.0.0.1:9/never/contacted:v1", tmp_path / "kubelet" / "t")
    request.volume_capability.CopyFrom(
        csi_pb2.VolumeCapability(
            block=csi_pb2.VolumeCapability.BlockVolume(),
            access_mode=AccessMode(mode=AccessMode.SINGLE_NODE_WRITER),
        )
    )

    async def main() -> tuple[Code, str, int]:
        async with serving_node(tmp_path, make_config(tmp_path / "store")) as n:
            code, msg = await _code(n.stub.NodePublishVolume(request))
            return code, msg, len(n.store.models())

    code, msg, models = asyncio.run(main())
    assert code == Code.INVALID_ARGUMENT and "block access" in msg
    assert models == 0 and not (tmp_path / "kubelet" / "t").exists()


def test_a_model_that_cannot_fit_is_resource_exhausted(tmp_path: Path) -> None:
    ref = f"file://{write_files(tmp_path / 'src', sample_model(72))}"  # ~768 KiB
    config = make_config(tmp_path / "store", store={"budget_bytes": 64 * 1024})

    async def main() -> tuple[Code, str]:
        async with serving_node(tmp_path, config) as n:
            return await _code(n.stub.NodePublishVolume(publish(ref, tmp_path / "kubelet" / "t")))

    code, msg = asyncio.run(main())
    assert code == Code.RESOURCE_EXHAUSTED, msg
    assert "needs" in msg and "store budget 65536 bytes" in msg
    assert not (tmp_path / "kubelet" / "t").exists()


# -- CreateVolume: an existing name and the capacity_range (spec v1.12, CreateVolume) ----------

GIB = 1 << 30


@pytest.mark.parametrize(
    ("required", "limit", "code"),
    [
        # The volume pvc-1 exists with 1 GiB (the first call asked for exactly that).
        (GIB, 0, Code.OK),  # the same request: idempotent
        (0, 0, Code.OK),  # no range: any volume is compatible
        (GIB - 1, 0, Code.OK),  # 1 GiB is at least that
        (0, GIB, Code.OK),  # and at most that
        (GIB, GIB, Code.OK),  # exactly that
        (1, 2 * GIB, Code.OK),  # within
        (GIB + 1, 0, Code.ALREADY_EXISTS),  # larger than the volume that exists
        (2 * GIB, 4 * GIB, Code.ALREADY_EXISTS),  # a range above it
        (0, GIB - 1, Code.ALREADY_EXISTS),  # a limit below it
        (1, GIB - 1, Code.ALREADY_EXISTS),  # a range below it
    ],
)
def test_create_volume_capacity_compatibility(
    tmp_path: Path, required: int, limit: int, code: Code
) -> None:
    async def main() -> tuple[Code, str, csi_pb2.Volume | None, csi_pb2.Volume]:
        async with serving_controller(tmp_path) as c:
            first = (await c.stub.CreateVolume(create())).volume
            again = create()
            again.capacity_range.required_bytes = required
            again.capacity_range.limit_bytes = limit
            try:
                volume = (await c.stub.CreateVolume(again)).volume
            except grpc.aio.AioRpcError as exc:
                return exc.code(), exc.details() or "", None, first
            return Code.OK, "", volume, first

    got, msg, volume, first = asyncio.run(main())
    assert got == code, msg
    if code == Code.OK:
        assert volume == first  # the corresponding response: the same volume, same capacity
    else:
        assert "pvc-1" in msg and str(GIB) in msg and "capacity_range" in msg


def test_a_repeat_is_answered_with_the_volume_first_given(
    tmp_path: Path, model: tuple[str, dict[str, bytes]]
) -> None:
    """The size lookup may succeed once and time out the next time: the repeat still gets the
    volume the name was given, not a new capacity."""
    ref, files = model
    total = sum(map(len, files.values()))
    sources = build_sources(make_config(tmp_path / "unused"))
    answers: list[bool] = [True, False]

    def size(r: ModelRef) -> int:
        if answers.pop(0):
            return sources.for_ref(r).resolve(r).total_bytes
        raise SourceError("registry down", reason="network", retryable=True)

    async def main() -> tuple[csi_pb2.Volume, csi_pb2.Volume, Code]:
        async with serving_controller(tmp_path, size) as c:
            request = create(model=ref)
            request.capacity_range.required_bytes = 1
            first = (await c.stub.CreateVolume(request)).volume
            again = (await c.stub.CreateVolume(request)).volume
            # A claim larger than the model, under a name that was given the model's size.
            request.capacity_range.required_bytes = total + 1
            code, _ = await _code(c.stub.CreateVolume(request))
            return first, again, code

    first, again, code = asyncio.run(main())
    assert first.capacity_bytes == total and again == first
    assert code == Code.ALREADY_EXISTS


def test_create_volume_refuses_mutable_parameters(tmp_path: Path) -> None:
    request = create()
    request.mutable_parameters["verify"] = "full"

    async def main() -> tuple[Code, str]:
        async with serving_controller(tmp_path) as c:
            return await _code(c.stub.CreateVolume(request))

    code, msg = asyncio.run(main())
    assert code == Code.INVALID_ARGUMENT and "MODIFY_VOLUME" in msg


# -- further MUSTs of the spec (docs/csi.md) --------------------------------------------------


def test_plugin_name_and_error_status_follow_the_spec(tmp_path: Path) -> None:
    async def main() -> tuple[str, str, Any]:
        async with serving_controller(tmp_path) as c:
            info = await c.identity.GetPluginInfo(csi_pb2.GetPluginInfoRequest())
            with pytest.raises(grpc.aio.AioRpcError) as exc:
                await c.stub.DeleteVolume(csi_pb2.DeleteVolumeRequest())
            return info.name, info.vendor_version, exc.value

    name, version, error = asyncio.run(main())
    # Domain name notation, at most 63 characters, alphanumeric at both ends.
    assert len(name) <= 63 and re.fullmatch(r"[a-zA-Z0-9]([a-zA-Z0-9.-]*[a-zA-Z0-9])?", name)
    assert version
    # A non-OK status: a canonical code, a human-readable message, no details.
    assert error.code() == Code.INVALID_ARGUMENT and error.details()
    assert all(key != "grpc-status-details-bin" for key, _ in error.trailing_metadata() or ())


@pytest.mark.parametrize(("required", "limit"), [(-1, 0), (0, -1)])
def test_a_negative_capacity_is_invalid(tmp_path: Path, required: int, limit: int) -> None:
    request = create()
    request.capacity_range.required_bytes = required
    request.capacity_range.limit_bytes = limit

    async def main() -> tuple[Code, str]:
        async with serving_controller(tmp_path) as c:
            return await _code(c.stub.CreateVolume(request))

    code, msg = asyncio.run(main())
    assert code == Code.INVALID_ARGUMENT and "negative" in msg


def test_publish_accepts_long_target_paths(
    tmp_path: Path, model: tuple[str, dict[str, bytes]]
) -> None:
    """The SP MUST accept a target_path of at least 128 bytes; the kubelet's are longer."""
    ref, files = model
    pod = "0123456789abcdef-" * 8
    target = tmp_path / "kubelet" / "pods" / pod / "volumes" / "kubernetes.io~csi" / "m" / "mount"
    assert len(str(target).encode()) > 200

    async def main() -> bytes:
        async with serving_node(tmp_path, make_config(tmp_path / "store")) as n:
            await asyncio.to_thread(n.fetcher.warm, parse_reference(ref))
            await n.stub.NodePublishVolume(publish(ref, target))
            name = next(iter(files))
            content = (target / name).read_bytes()
            await n.stub.NodeUnpublishVolume(unpublish(target))
            return content

    assert asyncio.run(main()) == files[next(iter(files))]
    assert not target.exists()


def test_every_row_of_docs_csi_md_names_a_test_that_exists() -> None:
    root = Path(__file__).resolve().parent
    table = (root.parent / "docs" / "csi.md").read_text()
    rows = [line for line in table.splitlines() if re.match(r"^\| \d+ \|", line)]
    assert len(rows) >= 40
    for row in rows:
        named = re.findall(r"`((?:conf|test_[a-z_]+\.py)::(test_[a-z_0-9]+))`", row)
        assert named, f"docs/csi.md row without a test: {row[:60]}"
        for full, name in named:
            module = "test_csi_conformance.py" if full.startswith("conf::") else full.split("::")[0]
            source = (root / module).read_text()
            assert re.search(rf"^(async )?def {name}\(", source, re.M), f"{full} does not exist"

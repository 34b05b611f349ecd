"""``weightcache controller``: the metadata-only CSI Controller beside the external-provisioner.

It holds no store and no state worth keeping: CreateVolume derives everything from the request,
and resolving a model's manifest (for the reported capacity) is the only network call it makes.
"""

from __future__ import annotations

import asyncio
import logging
import signal

from weightcache.app.wiring import build_sources
from weightcache.csi.controller import ControllerService
from weightcache.csi.identity import IdentityService
from weightcache.csi.server import start_controller_server
from weightcache.daemon.config import Config
from weightcache.daemon.references import ModelRef

log = logging.getLogger(__name__)
SHUTDOWN_GRACE_S = 5.0


async def run_controller(config: Config, endpoint: str) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    sources = build_sources(config)

    def model_size(ref: ModelRef) -> int:
        return sources.for_ref(ref).resolve(ref).total_bytes

    controller = ControllerService(model_size, size_timeout_s=min(config.fetch.timeout_s, 10.0))
    server = await start_controller_server(endpoint, IdentityService(lambda: True), controller)
    try:
        log.info("controller serving CSI on %s", endpoint)
        await stop.wait()
        log.info("shutting down")
    finally:
        await server.stop(grace=SHUTDOWN_GRACE_S)

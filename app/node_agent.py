"""``weightcache node``: the node agent and the CSI Identity and Node services on one loop.

Lifecycle: open the store (reconciles the disk with the index), reconcile mount pins with the
kernel's mount table, serve on the CSI socket, report ready through Probe, and on SIGTERM or
SIGINT stop accepting calls and shut down within a deadline. Mounts are never touched on
shutdown: pods keep reading through their bind mounts while the agent restarts.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
from collections.abc import Callable

from weightcache.app import logs
from weightcache.app.status import AgentView
from weightcache.app.wiring import build_fetcher, build_policy
from weightcache.csi.identity import IdentityService
from weightcache.csi.mounter import SystemMounter
from weightcache.csi.node import NodeService, store_checks
from weightcache.csi.server import start_node_server
from weightcache.daemon.config import Config
from weightcache.daemon.errors import AgentFailed
from weightcache.daemon.kube.client import KubeClient
from weightcache.daemon.kube.events import NODE_EVENT_NAMESPACE, event_body
from weightcache.daemon.kube.warm import WarmController
from weightcache.daemon.metrics import Metrics, MetricsServer
from weightcache.daemon.repair import Repairer
from weightcache.daemon.scrubber import Scrubber
from weightcache.daemon.store.store import Store
from weightcache.daemon.store.verify import Problem
from weightcache.daemon.threads import Supervisor

log = logging.getLogger(__name__)
SHUTDOWN_GRACE_S = 10.0


async def run_node(
    config: Config,
    endpoint: str,
    node_id: str,
    *,
    kube: bool = False,
    kubeconfig: str | None = None,
    metrics_address: str | None = None,
) -> None:
    """Serve until SIGTERM. With ``kube``, also run the warm controller against the API server
    named by ``kubeconfig`` (or the in-cluster service account when None). With
    ``metrics_address`` (HOST:PORT), serve Prometheus metrics there."""
    # One stop signal for everything: SIGTERM, SIGINT, or a background loop past its bound.
    stopping = threading.Event()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    supervisor = Supervisor(stopping, on_fatal=lambda _: loop.call_soon_threadsafe(stop.set))
    started = False

    def ready() -> bool:
        return started and supervisor.healthy()

    store = await asyncio.to_thread(Store, config.store)
    names = logs.ModelNames(store.layout.index)  # digest and ref on every log line of a model
    logs.use_model_names(names)
    recent = logs.RecentErrors()
    detach_recent = logs.attach(recent)
    metrics = Metrics()
    http: MetricsServer | None = None
    fetcher = build_fetcher(config, store, metrics=metrics, stop=stopping)
    client = KubeClient(kubeconfig, config.warm.request_timeout_s) if kube else None
    repairer = Repairer(
        store,
        fetcher,
        on_damage=_node_event_poster(client, node_id) if client is not None else None,
    )
    node = NodeService(
        node_id,
        store,
        fetcher,
        SystemMounter(),
        build_policy(config, fetcher.sources, fetcher.signatures),
        repairer,
        checks=store_checks(store),
        kubelet_dir=config.csi.kubelet_dir,
        aliases=config.registry.aliases,
        metrics=metrics,
    )
    identity = IdentityService(ready)
    server = await start_node_server(endpoint, identity, node)
    warm: WarmController | None = None
    try:
        if client is not None:
            warm = WarmController(
                node_id,
                client,
                store,
                fetcher,
                config.warm,
                node.policy,
                aliases=config.registry.aliases,
                stop=stopping,
            )
            warm.start(supervisor.start)
            log.info("warm controller watching workloads for node %s", node_id)
        scrubber = None
        if config.scrub.enabled:
            scrubber = Scrubber(
                store, repairer.damaged, config.scrub, stop=stopping, metrics=metrics
            )
            scrubber.start(supervisor.start)
        metrics.watch(
            store,
            scrub=scrubber.stats if scrubber is not None else None,
            warm_requests=warm.request_states if warm is not None else None,
            scrub_config=config.scrub,
        )
        if metrics_address:
            scrub = scrubber.stats if scrubber is not None else None
            agent = AgentView(node_id, ready, recent, scrub, warm)
            http = metrics.serve(metrics_address, ready=ready, status=agent.report)
            log.info("metrics on http://%s/metrics", metrics_address)
        dropped = await asyncio.to_thread(node.reconcile)
        for target in dropped:
            log.info("dropped the pin of %s: its mount is gone", target)
        started = True
        log.info("node %s serving CSI on %s with store %s", node_id, endpoint, config.store.root)
        await stop.wait()
        log.info("shutting down")
    finally:
        stopping.set()
        if http is not None:
            http.close()
        detach_recent()
        logs.use_model_names(None)
        names.close()
        if warm is not None:
            await asyncio.to_thread(warm.stop)
        await server.stop(grace=SHUTDOWN_GRACE_S)
        await asyncio.to_thread(fetcher.close)
        left = await asyncio.to_thread(supervisor.join, SHUTDOWN_GRACE_S)
        if left:  # daemon threads: they cannot keep the process alive
            log.warning("background loops still running at exit: %s", ", ".join(left))
        store.close()
    if supervisor.fatal is not None:
        raise AgentFailed(
            f"background loop {supervisor.fatal.name} kept failing: {supervisor.fatal.error}"
        )


def _node_event_poster(client: KubeClient, node_id: str) -> Callable[[Problem], None]:
    """Scrub findings become Warning events on this Node."""

    def post(problem: Problem) -> None:
        involved = {"apiVersion": "v1", "kind": "Node", "name": node_id}
        message = (
            f"model {problem.model} file {problem.path}: {problem.reason}; quarantined, "
            "refused to new mounts and being repaired"
        )
        client.create_event(
            NODE_EVENT_NAMESPACE,
            event_body(involved, NODE_EVENT_NAMESPACE, node_id, "ModelCorrupt", "Warning", message),
        )

    return post

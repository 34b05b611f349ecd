"""Supervised background loops: one that dies makes the agent not ready (Probe over the real
socket says so) until it runs again; past its bound it is fatal; one stop signal ends them."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

from csi_harness import serving_node
from helpers import make_config

from weightcache.daemon.threads import Failure, Supervisor
from weightcache.proto import csi_pb2


class Flaky:
    """A loop that fails ``failures`` times, then runs until stopped."""

    def __init__(self, stop: threading.Event, failures: int) -> None:
        self.stop, self.failures, self.runs = stop, failures, 0
        self.running = threading.Event()

    def __call__(self) -> None:
        self.runs += 1
        if self.runs <= self.failures:
            raise RuntimeError(f"failure {self.runs}")
        self.running.set()
        self.stop.wait()


def test_a_dying_loop_turns_probe_not_ready_until_it_runs_again(tmp_path: Path) -> None:
    stop = threading.Event()
    supervisor = Supervisor(stop, delays=(3600.0,))  # down until told otherwise
    flaky = Flaky(stop, failures=1)

    async def main() -> tuple[bool, bool]:
        async with serving_node(
            tmp_path, make_config(tmp_path / "store"), ready=supervisor.healthy
        ) as h:
            before = (await h.identity.Probe(csi_pb2.ProbeRequest())).ready.value
            supervisor.start(flaky, "flaky")
            with supervisor.changed:
                assert supervisor.changed.wait_for(lambda: bool(supervisor.down()), 10)
            during = (await h.identity.Probe(csi_pb2.ProbeRequest())).ready.value
            return before, during

    before, during = asyncio.run(main())
    assert before is True and during is False
    assert [f.name for f in supervisor.down()] == ["flaky"]
    assert "RuntimeError: failure 1" in supervisor.down()[0].error
    stop.set()  # the one stop signal ends the wait and the loop
    assert supervisor.join(10) == []
    assert supervisor.fatal is None


def test_a_loop_failing_past_its_bound_is_fatal() -> None:
    stop = threading.Event()
    fatal: list[Failure] = []
    supervisor = Supervisor(stop, delays=(0.0,), max_restarts=3, on_fatal=fatal.append)
    flaky = Flaky(stop, failures=10)
    supervisor.start(flaky, "scrubber")
    assert supervisor.join(10) == []  # it gave up on its own, stop never set
    assert flaky.runs == 4 and len(fatal) == 1 and fatal[0].name == "scrubber"
    assert supervisor.fatal is fatal[0] and not supervisor.healthy()


def test_a_loop_that_recovers_makes_the_agent_healthy_again() -> None:
    stop = threading.Event()
    supervisor = Supervisor(stop, delays=(0.0,), max_restarts=3)
    flaky = Flaky(stop, failures=2)
    supervisor.start(flaky, "informer-Node")
    assert flaky.running.wait(10)
    with supervisor.changed:
        assert supervisor.changed.wait_for(lambda: not supervisor.down(), 10)
    assert supervisor.healthy() and flaky.runs == 3
    stop.set()
    assert supervisor.join(10) == []

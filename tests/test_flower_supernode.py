"""fedsec.engine.supernode: the SuperNodes fedsec starts wait at most IDLE_SECONDS between
pulls and reply checks, and are Flower's own otherwise."""

from __future__ import annotations

import importlib
import time

import pytest

pytest.importorskip("flwr")

from fedsec.engine import supernode  # noqa: E402


@pytest.fixture()
def loop_module(monkeypatch):
    """Flower's SuperNode loop module, its `time` put back after the test."""
    internal = importlib.import_module("flwr.supernode.start_client_internal")
    monkeypatch.setattr(internal, "time", time)
    return internal


def test_the_supernode_loop_sleeps_at_most_the_cap_and_keeps_the_rest_of_time(loop_module, monkeypatch):
    slept: list[float] = []
    monkeypatch.setattr(time, "sleep", slept.append)
    assert supernode.shorten_waits(0.2)
    loop_module.time.sleep(3)  # the idle pull's wait in flwr 1.41
    loop_module.time.sleep(0.5)  # the reply poll's
    loop_module.time.sleep(0.05)  # a shorter one stays as asked
    assert slept == [0.2, 0.2, 0.05]
    assert loop_module.time.monotonic is time.monotonic and loop_module.time.time is time.time
    assert not supernode.shorten_waits(0.2)  # once: a second call changes nothing
    loop_module.time.sleep(3)
    assert slept[-1] == 0.2


def test_the_cap_reaches_exactly_the_idle_pull_and_the_reply_polls(loop_module):
    """Every call the pinned Flower's SuperNode loop makes to its `time`: the 3 s sleep after a
    pull that found nothing and the two 0.5 s polls for a reply. A Flower that sleeps elsewhere,
    or waits on `time` for something else (a heartbeat, a back-off), fails here first."""
    import inspect
    import re

    calls = re.findall(r"\btime\.(\w+)\(([^)]*)\)", inspect.getsource(loop_module))
    assert calls == [("sleep", "3"), ("sleep", "0.5"), ("sleep", "0.5")]

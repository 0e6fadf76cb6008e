"""The bridge from the Rust core to asyncio (src/python/bridge.rs): no tokio
worker takes the GIL, a cancelled call aborts its Rust task, every event loop
of a process gets its own results.

These run in the test process (no hub): the core's calls are awaited on
loops made here. The first one does real SSH against the test bed."""

from __future__ import annotations

import asyncio
import json
import sys
import time

import pytest
from ssh_spawner import _core
from ssh_spawner.spawner import SSHSpawner

pytestmark = pytest.mark.any_hub  # see conftest.ANY_HUB


def _handed_over() -> int:
    return _core.bridge_stats()[1]


def _delivered() -> int:
    return _core.bridge_stats()[2]


def test_results_are_handed_over_while_the_loop_thread_holds_the_gil(testbed):
    """Several real reads of the options form's host figures (SSH commands
    on node1, the hub's own path: `Core.options_form`) finish and hand
    their results over while this thread, the loop's, keeps the GIL in a
    pure-Python loop: with the switch interval raised, no other thread gets
    the GIL during the spin, so a tokio worker that needed it (to set a
    future, build an exception, drop a Python object) would stall and the
    count would not move. The futures are set afterwards, by the loop."""
    host = testbed["hosts"][0]
    user = testbed["users"][0]["name"]
    n = 8

    async def run():
        sp = SSHSpawner(
            hosts=[{"address": host["address"], "name": host["name"]}],
            key_path=testbed["hub_key"],
            known_hosts=testbed["known_hosts"],
        )
        core = sp.core
        bounds = json.dumps({"hosts": [host["name"]]})

        def form():
            # max_age 0: every call reads the host's figures again.
            return core.options_form(user, bounds, "{}", 0.0, 30.0)

        def answered(html: str) -> bool:
            # The host's figures, read over SSH: it was reached and logged into.
            return " free, load " in html and "not answering" not in html

        # Connect once (the pool then carries the calls on one connection).
        first = await form()
        assert answered(first), first
        handed0, delivered0 = _handed_over(), _delivered()
        old = sys.getswitchinterval()
        sys.setswitchinterval(120.0)
        try:
            futures = [form() for _ in range(n)]
            t0 = time.monotonic()
            deadline = t0 + 60.0
            # No await, no sleep, no I/O: this thread keeps the GIL.
            while _handed_over() - handed0 < n and time.monotonic() < deadline:
                pass
            spun = time.monotonic() - t0
            handed = _handed_over() - handed0
            delivered_meanwhile = _delivered() - delivered0
        finally:
            sys.setswitchinterval(old)
        print(f"BRIDGE {handed}/{n} results handed over in {spun:.3f} s with the GIL held")
        assert handed == n, (
            f"only {handed} of {n} results were handed over in {spun:.1f} s while the"
            " loop thread held the GIL: a tokio worker waits for the GIL"
        )
        assert delivered_meanwhile == 0, "a future was set off the loop thread"
        pages = await asyncio.gather(*futures)
        assert all(answered(p) for p in pages), pages
        assert _delivered() - delivered0 == n

    asyncio.run(run())


def test_a_cancelled_call_aborts_its_rust_task_and_other_loops_still_get_results():
    """`Progress.next` waits in Rust until an event comes. Cancelling the
    asyncio future must drop that Rust future (its task ends, counted as
    handed over without a result set); a call left pending on a loop that
    closed does no harm; a new loop gets its results."""
    progress = _core.Progress()

    async def cancel_one():
        handed0, delivered0 = _handed_over(), _delivered()
        fut = progress.next(0)
        await asyncio.sleep(0)
        assert not fut.done()
        fut.cancel()
        with pytest.raises(asyncio.CancelledError):
            await fut
        # Bounded wait (10 s) for the aborted task to end.
        for _ in range(1000):
            if _handed_over() != handed0:
                break
            await asyncio.sleep(0.01)
        assert _handed_over() == handed0 + 1, "the Rust task of a cancelled call still runs"
        assert _delivered() == delivered0
        # Left pending when this loop closes: its result comes after.
        return progress.next(0)

    orphan = asyncio.run(cancel_one())
    assert not orphan.done()
    handed0 = _handed_over()
    progress.emit(10, "first")
    deadline = time.monotonic() + 10
    while _handed_over() == handed0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert _handed_over() == handed0 + 1
    assert not orphan.done(), "nothing runs a closed loop's futures"

    async def on_new_loop():
        other = _core.Progress()
        waiting = other.next(0)
        other.emit(20, "second")
        assert await asyncio.wait_for(waiting, 10) == [(20, "second")]
        assert await asyncio.wait_for(progress.next(0), 10) == [(10, "first")]
        progress.finish()
        assert await asyncio.wait_for(progress.next(1), 10) == []

    async def third_loop():
        done = _core.Progress()
        done.finish()
        assert await asyncio.wait_for(done.next(0), 10) == []

    asyncio.run(on_new_loop())
    asyncio.run(third_loop())


def test_results_that_finish_while_the_loop_drains_are_never_lost():
    """Results handed over from tokio workers while the loop is taking
    earlier ones: every one must reach its future. (The loop once cleared
    its wake-up flag before reading the wake-up byte; a result queued just
    after it took the queue then waited forever, and every later one with
    it.) Another thread emits on many `Progress` streams whose `next` the
    loop awaits, in bursts, so completions and drains interleave."""
    import threading

    rounds, per_round = 200, 50

    async def run():
        for _ in range(rounds):
            streams = [_core.Progress() for _ in range(per_round)]
            waiting = [s.next(0) for s in streams]
            go = threading.Event()

            def emit(streams=streams, go=go):
                go.wait()
                for i, s in enumerate(streams):
                    s.emit(i % 100, "x")

            t = threading.Thread(target=emit)
            t.start()
            go.set()
            # Keep the loop draining while the other thread emits.
            results = await asyncio.wait_for(asyncio.gather(*waiting), 20)
            t.join()
            assert [r[0][0] for r in results] == [i % 100 for i in range(per_round)]

    asyncio.run(run())

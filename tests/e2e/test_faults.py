"""A host cut off while the hub is down: the server survives the restart."""

from __future__ import annotations

import time

import pytest

from .conftest import assert_server_process, host_cut, proc_start_time, wait_polls, wait_until

pytestmark = pytest.mark.any_hub  # see conftest.ANY_HUB

ALICE = "tb-alice"


def test_host_cut_while_hub_down_keeps_server(testbed, hub_factory):
    hub = hub_factory(
        {
            "JupyterHub.cleanup_servers": False,
            "SSHSpawner.connect_timeout": 3.0,
        }
    )
    hub.spawn(ALICE)
    state = hub.ssh_state(ALICE)
    assert_server_process(testbed, state, ALICE)
    host = state["host"]
    hub.stop()
    log_before = len(hub.log_text())

    with host_cut(testbed, host):
        t0 = time.monotonic()
        hub.start(
            **{
                "SSHSpawner.unreachable_grace": 120.0,
                "JupyterHub.init_spawners_timeout": 1,
            }
        )
        print(f"HUB_UP_WITH_HOST_CUT seconds={time.monotonic() - t0:.2f}")

        def warned():
            return "cannot reach the host" in hub.log_text()[log_before:]

        wait_until(warned, 15, what='the spawner\'s "cannot reach the host" warning')
        model = hub.server_model(ALICE)
        assert model is not None, "the hub dropped the server of the unreachable host"
        log = hub.log_text()[log_before:]
        assert "stopped while the Hub was down" not in log
        assert "shutting it down" not in log
        assert "reporting the server stopped" not in log
        # The server itself kept running all along.
        assert proc_start_time(state["pid"]) == state["start_time"]
        # The next poll (the restarted hub waits for the host) keeps it too.
        wait_polls(hub, ALICE, 2, log_before)
        assert hub.server_model(ALICE) is not None
    t_heal = time.monotonic()

    wait_until(
        lambda: hub.proxy_get(f"/user/{ALICE}/api/status").status_code == 200,
        30,
        interval=0.5,
        what="the server to be reachable after heal",
    )
    print(f"HEAL_TO_REACHABLE seconds={time.monotonic() - t_heal:.2f}")
    model = hub.server_model(ALICE)
    assert model and model["ready"], model
    assert hub.ssh_state(ALICE) == state
    assert_server_process(testbed, state, ALICE)
    log = hub.log_text()[log_before:]
    assert "host answers again" in log
    assert "stopped while the Hub was down" not in log

    hub.stop_server(ALICE)
    assert proc_start_time(state["pid"]) != state["start_time"]


def test_stop_while_host_cut_cleans_up_once_it_heals(testbed, hub_factory):
    hub = hub_factory({"SSHSpawner.connect_timeout": 3.0, "SSHSpawner.pending_stop_retry": 2.0})
    hub.spawn(ALICE)
    state = hub.ssh_state(ALICE)
    assert_server_process(testbed, state, ALICE)
    host = state["host"]

    with host_cut(testbed, host):
        t0 = time.monotonic()
        r = hub.api("DELETE", hub.server_path(ALICE), timeout=60)
        took = time.monotonic() - t0
        print(f"DELETE while cut: {r.status_code} {r.text[:200]!r} after {took:.1f} s")
        wait_until(lambda: hub.server_model(ALICE) is None, 30, what="the hub to forget it")
        # The host never heard of the stop: the server still runs.
        assert proc_start_time(state["pid"]) == state["start_time"]
    t_heal = time.monotonic()
    # The spawner keeps trying in the background (every pending_stop_retry:
    # 2 s here) and stops it.
    wait_until(
        lambda: proc_start_time(state["pid"]) != state["start_time"] and not hub.my_procs(),
        45,
        interval=0.5,
        what="the abandoned server to be stopped after heal",
    )
    print(f"HEAL_TO_CLEANED seconds={time.monotonic() - t_heal:.2f}")
    # The process can be gone a moment before the stop's exec returns.
    wait_until(
        lambda: "finished the pending stop" in hub.log_text(),
        10,
        interval=0.25,
        what="the clean-up to be logged",
    )


def pending_stops(hub) -> list[str]:
    d = hub.dir / "ssh-spawner-journal" / "stops"
    return sorted(p.name for p in d.iterdir() if p.suffix == ".json") if d.exists() else []


def test_stop_while_host_cut_is_finished_after_a_hub_restart(testbed, hub_factory):
    """A stop that cannot reach the host is a pending stop in the journal: a
    hub restarted before the host heals still finishes it (no user acts, no
    server runs that would make the hub call the spawner)."""
    hub = hub_factory({"SSHSpawner.connect_timeout": 3.0, "SSHSpawner.pending_stop_retry": 2.0})
    hub.spawn(ALICE)
    state = hub.ssh_state(ALICE)
    assert_server_process(testbed, state, ALICE)
    host = state["host"]

    with host_cut(testbed, host):
        hub.api("DELETE", hub.server_path(ALICE), timeout=60)
        wait_until(lambda: hub.server_model(ALICE) is None, 30, what="the hub to forget it")
        assert pending_stops(hub) == [f"{state['run_id']}.json"]
        hub.stop()
        log_before = len(hub.log_text())
        hub.start()
        # The restarted hub tries the pending stop and fails: the host is cut.
        wait_until(
            lambda: "not done yet" in hub.log_text()[log_before:],
            30,
            interval=0.5,
            what="the restarted hub to retry the pending stop",
        )
        assert proc_start_time(state["pid"]) == state["start_time"]
    t_heal = time.monotonic()
    wait_until(
        lambda: proc_start_time(state["pid"]) != state["start_time"] and not hub.my_procs(),
        45,
        interval=0.5,
        what="the pending stop to be finished after heal",
    )
    print(f"HEAL_TO_STOPPED_AFTER_RESTART seconds={time.monotonic() - t_heal:.2f}")
    wait_until(lambda: not pending_stops(hub), 10, what="the pending stop to leave the journal")
    wait_until(
        lambda: "finished the pending stop" in hub.log_text()[log_before:],
        10,
        what="the pending stop to be logged as finished",
    )


def test_server_reported_stopped_after_a_long_outage_is_stopped_when_host_returns(
    testbed, hub_factory
):
    """Past unreachable_grace poll reports the server stopped and the hub
    clears its state without calling stop(): the server must not keep running
    unknown once the host is back."""
    hub = hub_factory(
        {
            "SSHSpawner.connect_timeout": 2.0,
            "SSHSpawner.unreachable_grace": 4.0,
            "SSHSpawner.pending_stop_retry": 2.0,
            "Spawner.poll_interval": 1,
        }
    )
    hub.spawn(ALICE)
    state = hub.ssh_state(ALICE)
    assert_server_process(testbed, state, ALICE)
    host = state["host"]

    with host_cut(testbed, host):
        # A poll over the pooled connection to a blackholed host may wait
        # for command_timeout (30 s) before it says "unknown".
        wait_until(
            lambda: hub.server_model(ALICE) is None, 120, what="the hub to report it stopped"
        )
        assert "reporting the server stopped" in hub.log_text()
        assert pending_stops(hub) == [f"{state['run_id']}.json"]
        assert proc_start_time(state["pid"]) == state["start_time"]
    t_heal = time.monotonic()
    wait_until(
        lambda: proc_start_time(state["pid"]) != state["start_time"] and not hub.my_procs(),
        45,
        interval=0.5,
        what="the server to be stopped once its host is back",
    )
    print(f"HEAL_TO_STOPPED_AFTER_OUTAGE seconds={time.monotonic() - t_heal:.2f}")
    wait_until(lambda: not pending_stops(hub), 10, what="the pending stop to leave the journal")

"""Spawn, reach, stop, hub restart: the lifecycle through the REST API."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

from .conftest import (
    all_procs,
    assert_server_process,
    group_members,
    proc_environ,
    proc_start_time,
    read_proc,
    url_port,
    wait_polls,
    wait_scans,
    wait_until,
)

ALICE = "tb-alice"
BOB = "tb.bob-2"


def assert_status_200(hub, path):
    r = hub.proxy_get(path)
    assert r.status_code == 200, (path, r.status_code, r.headers, r.text[:500])
    body = r.json()
    assert "started" in body and "last_activity" in body, body
    return body


def proxy_secret(hub) -> str:
    """CONFIGPROXY_AUTH_TOKEN from the proxy's environment."""
    pid = int((hub.dir / "jupyterhub-proxy.pid").read_text())
    return proc_environ(pid)["CONFIGPROXY_AUTH_TOKEN"]


def test_spawn_ready_reachable_and_runs_as_user(testbed, argv_watch, hub):
    model, elapsed = hub.spawn(ALICE)
    assert model["ready"] and model["url"] == f"/user/{ALICE}/"
    state = hub.ssh_state(ALICE)
    host = {h["name"]: h for h in testbed["hosts"]}[state["host"]]
    assert state["address"] == host["address"]
    assert state["remote_user"] == ALICE
    assert 20000 <= state["port"] <= 29999

    assert_status_200(hub, f"/user/{ALICE}/api/status")

    p, env = assert_server_process(testbed, state, ALICE)
    assert url_port(env["JUPYTERHUB_SERVICE_URL"]) == state["port"], env["JUPYTERHUB_SERVICE_URL"]
    assert env["JUPYTERHUB_API_URL"].startswith(f"http://{testbed['hub_address']}:{hub.hub_port}/")
    assert env["JUPYTERHUB_USER"] == ALICE
    assert elapsed < 30, f"spawn took {elapsed:.1f} s"

    # The secrets must never show up in any argv, during the spawn or after.
    secrets = {
        "server API token": env["JUPYTERHUB_API_TOKEN"],
        "e2e service token": hub.token,
        "proxy auth token": proxy_secret(hub),
    }
    hub.stop_server(ALICE)
    wait_scans(argv_watch)  # the /proc scanner has looked after the stop too
    argv_watch.stop()
    assert argv_watch.passes > 10, "the /proc scanner hardly ran"
    assert not argv_watch.offending(secrets)


def test_stop_kills_process_group_and_cleans_directory(testbed, hub):
    hub.spawn(ALICE)
    state = hub.ssh_state(ALICE)
    assert_server_process(testbed, state, ALICE)
    d = Path(state["dir"])
    assert (d / "pid").is_file()

    # A terminal (terminado: a shell on a pty, in a session of its own, so
    # outside the wrapper's process group): stop must get it too.
    r = hub.session.post(f"{hub.url}/user/{ALICE}/api/terminals", timeout=10)
    assert r.status_code == 200, (r.status_code, r.text[:300])
    kids = wait_until(
        lambda: [p for p in all_procs() if p.ppid == state["pid"] and p.pgrp != state["pgid"]],
        10,
        what="the terminal's shell",
    )
    print("TERMINAL " + "; ".join(f"{k.pid} pgrp={k.pgrp} {k.argv}" for k in kids))

    t0 = time.monotonic()
    hub.stop_server(ALICE)
    took = time.monotonic() - t0
    print(f"STOP seconds={took:.2f}")

    assert proc_start_time(state["pid"]) != state["start_time"], "server still running"
    assert not group_members(state["pgid"]), f"process group {state['pgid']} still has members"
    for k in kids:
        assert proc_start_time(k.pid) != k.start, f"terminal {k.pid} {k.argv} survived the stop"
    left = set(os.listdir(d)) if d.exists() else set()
    assert left <= {"server.log", "exit_status"}, f"left in {d}: {left}"
    assert (d / "server.log").is_file(), "keep_log (default) should keep server.log"
    assert took < 15, f"stop took {took:.1f} s"


def test_hub_restart_keeps_server_then_poll_and_stop_work(testbed, hub_factory):
    hub = hub_factory({"JupyterHub.cleanup_servers": False, "Spawner.poll_interval": 2})
    hub.spawn(ALICE)
    state = hub.ssh_state(ALICE)
    assert_server_process(testbed, state, ALICE)

    hub.stop()
    assert proc_start_time(state["pid"]) == state["start_time"], "hub exit killed the server"
    log_before = len(hub.log_text())

    t0 = time.monotonic()
    hub.start()
    wait_until(
        lambda: hub.proxy_get(f"/user/{ALICE}/api/status").status_code == 200,
        30,
        what="the server to be routed again",
    )
    print(f"RESTART_TO_REACHABLE seconds={time.monotonic() - t0:.2f}")
    assert hub.ssh_state(ALICE) == state
    assert proc_start_time(state["pid"]) == state["start_time"]

    # Several polls later the server is still there and still ours.
    wait_polls(hub, ALICE, 3, log_before)
    model = hub.server_model(ALICE)
    assert model and model["ready"], model
    assert_status_200(hub, f"/user/{ALICE}/api/status")
    assert proc_start_time(state["pid"]) == state["start_time"]
    log = hub.log_text()[log_before:]
    assert "stopped while the Hub was down" not in log
    assert "shutting it down" not in log
    assert f"{ALICE} still running" in log

    hub.stop_server(ALICE)
    assert proc_start_time(state["pid"]) != state["start_time"]
    assert not group_members(state["pgid"])


def test_poll_after_restart_notices_a_killed_server(testbed, hub_factory):
    hub = hub_factory({"JupyterHub.cleanup_servers": False, "Spawner.poll_interval": 2})
    hub.spawn(ALICE)
    state = hub.ssh_state(ALICE)
    hub.stop()
    hub.start()
    wait_until(lambda: hub.proxy_get(f"/user/{ALICE}/api/status").status_code == 200, 30)

    os.kill(state["pid"], signal.SIGKILL)
    t0 = time.monotonic()
    wait_until(lambda: hub.server_model(ALICE) is None, 20, what="the hub to notice")
    print(f"POLL_NOTICED seconds={time.monotonic() - t0:.2f}")
    assert "server is gone" in hub.log_text()
    wait_until(lambda: not group_members(state["pgid"]), 10, what="the wrapper to exit")
    d = Path(state["dir"])
    wait_until(
        lambda: not d.exists() or set(os.listdir(d)) <= {"server.log", "exit_status"},
        10,
        what=f"{d} to be cleaned",
    )
    if (d / "exit_status").exists():
        assert (d / "exit_status").read_text().strip() == str(128 + signal.SIGKILL)


def test_drained_then_removed_host_under_an_old_remote_user_keeps_its_servers_across_restarts(
    testbed, hub_factory
):
    """The admin drains a host and restarts the hub: no new server goes
    there, and one already there stops cleanly. Then the admin takes the host
    out of ``hosts`` and changes ``remote_user``, and restarts again: the
    server still there is polled, reached and stopped as its state says (the
    host's key is in known_hosts; the hub ran with the old remote_user
    before), never reported stopped and left running."""
    hosts = [{"address": h["address"], "name": h["name"]} for h in testbed["hosts"]]
    retired, kept = hosts[1], hosts[0]
    hub = hub_factory(
        {
            "JupyterHub.cleanup_servers": False,
            "Spawner.poll_interval": 2,
            "SSHSpawner.hosts": [retired],
        }
    )
    hub.spawn(ALICE)
    hub.spawn(ALICE, "d")
    state, drained = hub.ssh_state(ALICE), hub.ssh_state(ALICE, "d")
    assert state["address"] == drained["address"] == retired["address"], (state, drained)
    assert_server_process(testbed, state, ALICE)
    hub.stop()

    # Drained: new servers go elsewhere; the ones there keep running and stop.
    hub.start(**{"SSHSpawner.hosts": [kept, {**retired, "drain": True}]})
    hub.spawn(BOB)
    assert hub.ssh_state(BOB)["address"] == kept["address"], "a server went to the drained host"
    assert_status_200(hub, f"/user/{ALICE}/d/api/status")
    hub.stop_server(ALICE, "d")
    assert proc_start_time(drained["pid"]) != drained["start_time"], "still running after stop"
    assert not group_members(drained["pgid"])
    hub.stop_server(BOB)
    hub.stop()

    # Removed, and remote_user changed: the server there is still ours.
    log_before = len(hub.log_text())
    hub.start(**{"SSHSpawner.hosts": [kept], "SSHSpawner.remote_user": "x-{username}"})
    wait_until(
        lambda: hub.proxy_get(f"/user/{ALICE}/api/status").status_code == 200,
        30,
        what="the server on the retired host to be routed again",
    )
    wait_polls(hub, ALICE, 3, log_before)
    log = hub.log_text()[log_before:]
    assert "refusing the saved state" not in log, log[-3000:]
    assert log.count("a host no longer configured") == 1, log[-3000:]
    assert hub.server_model(ALICE)["ready"]
    assert proc_start_time(state["pid"]) == state["start_time"], "the server was stopped"

    hub.stop_server(ALICE)
    assert proc_start_time(state["pid"]) != state["start_time"], "still running after stop"
    assert not group_members(state["pgid"])
    for st in (state, drained):
        d = Path(st["dir"])
        left = set(os.listdir(d)) if d.exists() else set()
        assert left <= {"server.log", "exit_status"}, f"left in {d}: {left}"


def test_a_prologue_that_backgrounds_a_job_starts_fast_logs_to_server_log_and_stops_with_it(
    testbed, hub_factory
):
    """A lab's prologue that starts something in the background (``Xvfb :99
    &``) does not hold the start up: the server is ready long before the job
    ends, the prologue's output is in ``server.log``, and the job ends with
    the server's stop."""
    said, job = "e2e-prologue-said", "47.25"
    hub = hub_factory({"SSHSpawner.prologue": [f"echo {said}", f"sleep {job} &"]})
    _, took = hub.spawn(ALICE)
    assert took < 15, f"the start took {took:.1f} s: the background job held it"
    state = hub.ssh_state(ALICE)
    assert_server_process(testbed, state, ALICE)
    assert said in (Path(state["dir"]) / "server.log").read_text()

    def jobs() -> list:
        return [p for p in all_procs() if p.argv[:2] == ["sleep", job]]

    assert jobs(), "the prologue's background job is not running"
    hub.stop_server(ALICE)
    wait_until(lambda: not jobs(), 15, what="the prologue's job to end with the server")


def test_two_named_servers_at_once(testbed, hub):
    names = ["one", "two"]
    results, errors = {}, []

    def go(name):
        try:
            results[name] = hub.spawn(BOB, name)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=go, args=(n,)) for n in names]
    for t in threads:
        t.start()
    for t in threads:
        t.join(90)
    assert not errors, errors
    states = {}
    for name in names:
        assert results[name][0]["ready"]
        assert_status_200(hub, f"/user/{BOB}/{name}/api/status")
        states[name] = hub.ssh_state(BOB, name)
        p, env = assert_server_process(testbed, states[name], BOB)
        assert env["JUPYTERHUB_SERVER_NAME"] == name
    assert len({(s["address"], s["port"]) for s in states.values()}) == 2
    assert len({s["pid"] for s in states.values()}) == 2
    assert len({s["dir"] for s in states.values()}) == 2
    for name in names:
        hub.stop_server(BOB, name)
        assert read_proc(states[name]["pid"]) is None or (
            proc_start_time(states[name]["pid"]) != states[name]["start_time"]
        )


def test_helpers_of_a_crashed_server_are_killed(testbed, hub_factory):
    singleuser = testbed["venv"] + "/bin/jupyterhub-singleuser"
    hub = hub_factory(
        {
            "Spawner.poll_interval": 1,
            # the server starts a helper in its process group, then becomes the server
            "Spawner.cmd": ["/bin/sh", "-c", f'sleep 10007 & exec {singleuser} "$@"', "sh"],
        }
    )
    hub.spawn(ALICE)
    state = hub.ssh_state(ALICE)
    helpers = [p for p in group_members(state["pgid"]) if p.argv[:1] == ["sleep"]]
    assert helpers, group_members(state["pgid"])
    hub.expect_leftovers = True  # the teardown kills them; not a separate leak report

    os.kill(state["pid"], signal.SIGKILL)
    wait_until(lambda: hub.server_model(ALICE) is None, 20, what="the hub to notice")

    def left():
        return [p for p in helpers if proc_start_time(p.pid) == p.start]

    # The clean-up after the exit may still be under way when the hub drops
    # the server: wait for it, with a bound.
    wait_until(lambda: not left(), 15, what="the helpers of the crashed server to be killed")

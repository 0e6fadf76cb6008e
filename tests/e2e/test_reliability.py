"""Rows of the fault and hostile-input matrix (docs/reliability.md) that need
the whole chain: a real hub, its database, the proxy and the test bed."""

from __future__ import annotations

import contextlib
import json
import sqlite3
import stat
import statistics
import subprocess
import threading
import time
from datetime import datetime
from pathlib import Path

import pytest
import requests

from .conftest import (
    E2E_SCOPES,
    SpawnFailed,
    all_at_once,
    all_procs,
    assert_server_process,
    bed_fault,
    group_members,
    host_cut,
    proc_start_time,
    read_proc,
    wait_polls,
    wait_scans,
    wait_until,
)

ALICE = "tb-alice"
BOB = "tb.bob-2"


def journal_entries(hub) -> list[Path]:
    d = hub.dir / "ssh-spawner-journal"
    return sorted(p for p in d.iterdir() if p.suffix == ".json") if d.exists() else []


@pytest.mark.any_hub
def test_hub_sigkilled_mid_start_leaves_no_orphan(testbed, hub_factory):
    """The hub dies after the launch reached the host but before start()
    returned (so before the hub saved the state): the restarted hub stops what
    was launched, and the journal ends empty."""
    marker = "3.77"  # the prologue's `sleep`: the launch exec is under way while it runs
    hub = hub_factory(
        {
            "JupyterHub.cleanup_servers": False,
            "SSHSpawner.prologue": [f"sleep {marker}"],
        }
    )
    hub.create_user(ALICE)

    # The POST waits for the spawn (up to slow_spawn_timeout): the hub dies under it.
    def post_spawn():
        with contextlib.suppress(requests.RequestException):
            hub.api("POST", hub.server_path(ALICE), timeout=30)

    post = threading.Thread(target=post_spawn, daemon=True)
    post.start()

    def prologue_running():
        return [p for p in all_procs() if p.argv == ["sleep", marker]]

    wait_until(prologue_running, 20, interval=0.05, what="the launch's prologue to run")
    entries = journal_entries(hub)
    assert len(entries) == 1, entries
    entry = json.loads(entries[0].read_text())
    assert stat.S_IMODE(entries[0].stat().st_mode) == 0o600
    assert stat.S_IMODE(entries[0].parent.stat().st_mode) == 0o700
    hub.kill()

    # With the hub gone the launch goes on: the server starts, and the database
    # has no state for it.
    wrappers = wait_until(hub.my_procs, 20, what="the orphaned launch to start its server")
    print(f"ORPHAN {[(p.pid, p.argv[-1][-60:]) for p in wrappers]}")
    assert any(entry["run_id"].encode() in p.cmdline for p in wrappers)
    db = sqlite3.connect(hub.dir / "jupyterhub.sqlite")
    try:
        (saved,) = db.execute(
            "SELECT spawners.state FROM spawners JOIN users ON spawners.user_id = users.id"
            " WHERE users.name = ?",
            (ALICE,),
        ).fetchone()
    finally:
        db.close()
    assert "ssh" not in json.loads(saved or "{}"), saved

    t0 = time.monotonic()
    hub.start()
    wait_until(
        lambda: not hub.my_procs() and not journal_entries(hub),
        30,
        interval=0.2,
        what="the restarted hub to stop the orphaned server and empty its journal",
    )
    print(f"RESTART_TO_ORPHAN_STOPPED seconds={time.monotonic() - t0:.2f}")
    wait_until(
        lambda: "launched by a hub that died before saving it" in hub.log_text(),
        10,
        interval=0.25,
        what="the journal sweep to be logged",
    )
    assert not hub.user_model(ALICE)["servers"]
    # The user can start again.
    hub.config["SSHSpawner.prologue"] = []
    hub.stop()
    hub.start()
    hub.spawn(ALICE)
    assert_server_process(testbed, hub.ssh_state(ALICE), ALICE)
    hub.stop_server(ALICE)
    assert not journal_entries(hub)


@pytest.mark.any_hub
def test_host_reboot_reports_the_server_stopped_and_clears_its_state(testbed, hub_factory):
    """A rebooted host has lost its processes: poll says stopped, the state is
    cleared and the user starts again (the bed shares one kernel: a reboot is
    sshd down, the server's processes killed, sshd up)."""
    hub = hub_factory({"Spawner.poll_interval": 1, "SSHSpawner.connect_timeout": 3.0})
    hub.spawn(ALICE)
    state = hub.ssh_state(ALICE)
    assert_server_process(testbed, state, ALICE)
    host = state["host"]
    log_before = len(hub.log_text())

    bed_fault(testbed, "reboot", host)
    wait_until(lambda: hub.server_model(ALICE) is None, 30, what="the hub to see it stopped")
    log = hub.log_text()[log_before:]
    assert "server is gone" in log
    assert proc_start_time(state["pid"]) != state["start_time"]
    db = sqlite3.connect(hub.dir / "jupyterhub.sqlite")
    try:
        (saved,) = db.execute(
            "SELECT spawners.state FROM spawners JOIN users ON spawners.user_id = users.id"
            " WHERE users.name = ? AND spawners.name = ''",
            (ALICE,),
        ).fetchone()
    finally:
        db.close()
    assert "ssh" not in json.loads(saved or "{}"), f"state kept after the reboot: {saved}"
    hub.spawn(ALICE)
    again = hub.ssh_state(ALICE)
    assert again["run_id"] != state["run_id"]
    assert_server_process(testbed, again, ALICE)


ALL_BYTES = "".join(chr(i) for i in range(1, 256))


def run_as(user: str, *argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["runuser", "-u", user, "--", *argv], capture_output=True, text=True, timeout=30
    )


@pytest.mark.any_hub
def test_private_modes_exact_env_and_other_users_locked_out(testbed, hub_factory):
    hub = hub_factory(
        {
            "Spawner.environment": {"E2E_ALL_BYTES": ALL_BYTES},
            "Spawner.poll_interval": 1,
        }
    )
    hub.spawn(ALICE)
    state = hub.ssh_state(ALICE)
    p, env = assert_server_process(testbed, state, ALICE)

    # Every byte but NUL arrives exactly (non-ASCII as the hub's UTF-8).
    raw = Path(f"/proc/{p.pid}/environ").read_bytes()
    want = b"E2E_ALL_BYTES=" + ALL_BYTES.encode() + b"\0"
    assert want in b"\0" + raw, "E2E_ALL_BYTES changed on its way"
    assert env["E2E_ALL_BYTES"] == ALL_BYTES

    # Modes: the state dir and the server's dir 0700, its files 0600, all alice's.
    uid = testbed["uids"][ALICE]
    d = Path(state["dir"])
    for path in (d.parent, d):
        st = path.stat()
        assert stat.S_IMODE(st.st_mode) == 0o700, f"{path} mode {oct(st.st_mode)}"
        assert st.st_uid == uid
    files = [f for f in d.iterdir()]
    assert {f.name for f in files} >= {"pid", "server.log"}, files
    for f in files:
        st = f.stat()
        assert stat.S_IMODE(st.st_mode) == 0o600, f"{f} mode {oct(st.st_mode)}"
        assert st.st_uid == uid
    # The hub's journal: 0700, and its entry gone once the state is saved.
    jdir = hub.dir / "ssh-spawner-journal"
    assert stat.S_IMODE(jdir.stat().st_mode) == 0o700
    wait_until(lambda: not journal_entries(hub), 10, what="the journal entry to be removed")

    polls_before = len(hub.log_text())
    # Bob, on the same host, can neither read alice's files nor signal her server.
    for argv in (
        ["cat", str(d / "server.log")],
        ["cat", str(d / "pid")],
        ["ls", str(d)],
        ["kill", "-TERM", str(state["pid"])],
        ["kill", "-KILL", "--", f"-{state['pgid']}"],
        ["cat", f"/proc/{state['pid']}/environ"],
    ):
        r = run_as(BOB, *argv)
        print(f"AS {BOB}: {' '.join(argv)} -> {r.returncode} {r.stderr.strip()[:120]}")
        assert r.returncode != 0, f"{BOB} could run {argv}: {r.stdout[:200]}"
        assert env["JUPYTERHUB_API_TOKEN"] not in r.stdout
    wait_polls(hub, ALICE, 2, polls_before)  # a signal would have been noticed
    assert proc_start_time(state["pid"]) == state["start_time"], "bob's signal reached alice"
    assert hub.server_model(ALICE)["ready"]
    hub.stop_server(ALICE)


def forge(hub, user: str, name: str, changes: dict) -> dict:
    db = sqlite3.connect(hub.dir / "jupyterhub.sqlite")
    try:
        row = db.execute(
            "SELECT spawners.id, spawners.state FROM spawners JOIN users"
            " ON spawners.user_id = users.id WHERE users.name = ? AND spawners.name = ?",
            (user, name),
        ).fetchone()
        state = json.loads(row[1])
        state["ssh"].update(changes)
        db.execute("UPDATE spawners SET state = ? WHERE id = ?", (json.dumps(state), row[0]))
        db.commit()
    finally:
        db.close()
    return state["ssh"]


@pytest.mark.any_hub
def test_forged_state_never_signals_another_users_process(testbed, hub_factory):
    """Alice's saved states are edited to name bob's running server (its pid,
    process group, start time, uid; then also bob as the remote user; then
    bob as the user too). Bob's server is untouched throughout: the state
    naming alice's login finds no process of hers (server gone); the one
    naming bob's login is refused without an exec, kept as running with an
    error (it is never reported stopped), and stopping it from the hub only
    records a pending stop that touches nothing; the one of user bob is not
    even loaded."""
    hub = hub_factory({"JupyterHub.cleanup_servers": False, "Spawner.poll_interval": 1})
    hub.spawn(BOB)
    hub.spawn(ALICE, "a")
    hub.spawn(ALICE, "b")
    hub.spawn(ALICE, "c")
    bob = hub.ssh_state(BOB)
    bob_proc, _ = assert_server_process(testbed, bob, BOB)
    hub.stop()
    take = {k: bob[k] for k in ("pid", "pgid", "start_time", "uid", "boot_id", "host", "address")}
    forge(hub, ALICE, "a", take)
    forge(hub, ALICE, "b", {**take, "remote_user": BOB})
    forge(hub, ALICE, "c", {**take, "remote_user": BOB, "username": BOB})
    log_before = len(hub.log_text())
    hub.start()
    for name in ("a", "c"):
        wait_until(
            lambda name=name: hub.server_model(ALICE, name) is None,
            30,
            what=f"the hub to drop alice's forged server {name}",
        )
    wait_polls(hub, f"{ALICE}:b", 3, log_before)
    assert hub.server_model(ALICE, "b") is not None, "a refused state was reported stopped"
    wait_polls(hub, BOB, 2, len(hub.log_text()))  # more polls
    assert proc_start_time(bob["pid"]) == bob["start_time"], "bob's server was signalled"
    assert group_members(bob["pgid"]), "bob's process group was signalled"
    assert hub.server_model(BOB)["ready"]
    r = hub.proxy_get(f"/user/{BOB}/api/status")
    assert r.status_code == 200, r.text[:300]
    log = hub.log_text()[log_before:]
    print("\n".join(line for line in log.splitlines() if "tb-alice" in line)[-3000:])
    # a: alice's login, bob's uid: the poll sees a process that is not hers.
    assert "tb-alice:a: server is gone" in log
    # b: bob as the remote user of alice's state: refused without an exec,
    # said once, and kept.
    assert log.count("tb-alice:b: refusing the saved state") == 1, log[-3000:]
    assert "refusing to act on it" in log
    assert "The server is reported running and nothing is done to it" in log
    # Stopped from the hub: a pending stop that acts on nothing.
    hub.stop_server(ALICE, "b")
    wait_until(
        lambda: "pending stop of run" in hub.log_text()[log_before:],
        30,
        what="the refused state's stop to become a pending stop",
    )
    assert proc_start_time(bob["pid"]) == bob["start_time"], "bob's server was signalled"
    # c: a state of user bob in alice's row: not even loaded.
    assert "tb-alice:c: ignoring a saved state that belongs to user 'tb.bob-2'" in log
    # Alice's real servers (not named by the forged states any more) are
    # orphans now; the teardown kills them.
    hub.expect_leftovers = True
    hub.stop_server(BOB)


@pytest.mark.any_hub
def test_twenty_servers_at_once_on_three_hosts_survive_a_hub_restart(
    testbed, argv_watch, hub_factory
):
    """Twenty servers spawned at once (two users, ten named servers each)
    across the three hosts: each runs as its user with its own token, no two
    share a (host, port), no token is in any argv meanwhile; then the hub
    restarts and every server is adopted and routed again, and all twenty
    stop at once leaving no process group. (This test took over the ten-at-
    once scale test, which checked the same things for ten.)

    The servers are JupyterHub's mock single-user server (a small tornado
    app): what this test is about is twenty launches, states and adoptions at
    once, not twenty notebook servers booting on two CPUs, which took a
    minute of CI; every other test runs the real jupyterhub-singleuser."""
    mocksu = "jupyterhub.tests.mocksu"
    hub = hub_factory(
        {
            "JupyterHub.cleanup_servers": False,
            "Spawner.poll_interval": 2,
            "Spawner.http_timeout": 60,
            "Spawner.cmd": [testbed["venv"] + "/bin/python", "-m", mocksu],
        }
    )
    wanted = [(u, f"r{i}") for u in (ALICE, BOB) for i in range(10)]
    for u in (ALICE, BOB):
        hub.create_user(u)
    t0 = time.monotonic()
    results, errors = all_at_once(lambda u, n: hub.spawn(u, n, timeout=180), wanted, 240)
    wall = time.monotonic() - t0
    assert not errors, "\n".join(errors)
    assert len(results) == len(wanted)
    times = sorted(t for _, t in results.values())
    print(
        f"TWENTY_AT_ONCE wall={wall:.2f} min={times[0]:.2f} "
        f"median={statistics.median(times):.2f} max={times[-1]:.2f}"
    )
    # How much of that is the spawner (POST to "Server started", every launch
    # done) and how much twenty servers booting on the same CPUs.
    stamps = [
        datetime.strptime(" ".join(line.split()[1:3]), "%Y-%m-%d %H:%M:%S.%f")
        for line in hub.log_text().splitlines()
        if "Calling Spawner.start" in line or "[ssh_spawner::spawner] Server started on" in line
    ]
    launched = (max(stamps) - min(stamps)).total_seconds()
    print(f"TWENTY_AT_ONCE all launched {launched:.2f} s after the first start")

    states, tokens = {}, {"e2e service token": hub.token}
    for user, name in wanted:
        state = hub.ssh_state(user, name)
        states[(user, name)] = state
        _, env = assert_server_process(testbed, state, user, program=mocksu)
        assert env["JUPYTERHUB_SERVER_NAME"] == name
        tokens[f"{user}/{name} API token"] = env["JUPYTERHUB_API_TOKEN"]
    pairs = {(s["address"], s["port"]) for s in states.values()}
    assert len(pairs) == len(wanted), f"(host, port) pairs collide: {sorted(pairs)}"
    hosts = {s["host"] for s in states.values()}
    assert hosts == {h["name"] for h in testbed["hosts"]}, f"servers only on {hosts}"
    per_host = {h: sum(s["host"] == h for s in states.values()) for h in sorted(hosts)}
    print("HOSTS " + " ".join(f"{h}={n}" for h, n in per_host.items()))
    assert len(set(tokens.values())) == len(tokens), "API tokens are not distinct"

    hub.stop()
    for s in states.values():
        assert proc_start_time(s["pid"]) == s["start_time"]
    log_before = len(hub.log_text())

    t0 = time.monotonic()
    hub.start(timeout=90)

    def all_reachable():
        return all(hub.proxy_get(f"/user/{u}/{n}/api/status").status_code == 200 for u, n in wanted)

    wait_until(all_reachable, 60, interval=0.5, what="all twenty to be routed again")
    print(f"TWENTY_RESTART_TO_REACHABLE seconds={time.monotonic() - t0:.2f}")
    polls_from = len(hub.log_text())
    for user, name in wanted:  # two more polls of each
        wait_polls(hub, f"{user}:{name}" if name else user, 2, polls_from, timeout=60)
    for (user, name), s in states.items():
        assert hub.ssh_state(user, name) == s
        assert proc_start_time(s["pid"]) == s["start_time"], f"{user}/{name} restarted or gone"
        assert hub.server_model(user, name)["ready"]
    log = hub.log_text()[log_before:]
    assert "stopped while the Hub was down" not in log
    assert log.count("still running") >= len(wanted), log.count("still running")
    _, errors = all_at_once(hub.stop_server, wanted, 120)
    assert not errors, "stop " + "\nstop ".join(errors)
    for (user, name), s in states.items():
        assert not group_members(s["pgid"]), f"{user}/{name}: process group left"
    assert not hub.my_procs()

    wait_scans(argv_watch)  # the /proc scanner has looked after the stops too
    argv_watch.stop()
    assert argv_watch.passes > 10
    assert not argv_watch.offending(tokens)


@pytest.mark.any_hub
def test_thirty_at_once_with_a_host_blackholed_all_ready_in_time_none_on_it_asked_twice(
    testbed, hub_factory
):
    """Monday 9 a.m.: a class of thirty (two users, fifteen named servers
    each) asks for servers at once while one of the three hosts is
    blackholed, with JupyterHub's default start_timeout (60 s) and the
    spawner's default connect_timeout (10 s), from a cold hub. Every server
    is ready within the start timeout, none is on the dead host, and the
    dead host is asked about once per user (it is then marked down for
    everyone: /hub/metrics says so, with since when), not once per spawn.

    The servers are JupyterHub's mock single-user server, as in the
    twenty-at-once test: the subject is thirty host choices and launches."""
    mocksu = "jupyterhub.tests.mocksu"
    dead = testbed["hosts"][-1]["name"]
    hub = hub_factory(
        {
            "Spawner.cmd": [testbed["venv"] + "/bin/python", "-m", mocksu],
            "JupyterHub.load_roles": [
                {"name": "e2e", "scopes": [*E2E_SCOPES, "read:metrics"], "services": ["e2e"]}
            ],
        }
    )
    assert hub.base_config()["Spawner.start_timeout"] == 60
    wanted = [(u, f"m{i}") for u in (ALICE, BOB) for i in range(15)]
    for u in (ALICE, BOB):
        hub.create_user(u)
    with host_cut(testbed, dead):
        t0 = time.monotonic()
        results, errors = all_at_once(lambda u, n: hub.spawn(u, n, timeout=60), wanted, 120)
        wall = time.monotonic() - t0
        assert not errors, "\n".join(errors)
        times = sorted(t for _, t in results.values())
        print(
            f"THIRTY_DEAD_HOST wall={wall:.2f} median={statistics.median(times):.2f} "
            f"max={times[-1]:.2f}"
        )
        hosts = {w: hub.ssh_state(*w)["host"] for w in wanted}
        assert dead not in hosts.values(), hosts
        text = hub.session.get(f"{hub.url}/hub/metrics", timeout=10).text
        lines = [x for x in text.splitlines() if x.startswith("ssh_spawner_") and dead in x]
        print("METRICS of the dead host\n" + "\n".join(lines))

        def sample(prefix: str) -> float:
            found = [x for x in lines if x.startswith(prefix + "{")]
            return sum(float(x.rsplit(" ", 1)[1]) for x in found)

        asked = sample("ssh_spawner_ssh_connect_attempts_total")
        assert 1 <= asked <= 4, f"the dead host was asked {asked} times for 30 spawns of 2 users"
        assert sample("ssh_spawner_host_up") == 0
        assert sample("ssh_spawner_host_down_since_seconds") > time.time() - 300
    # Healed: the background probe brings it back for new servers.
    wait_until(
        lambda: any(
            x.startswith("ssh_spawner_host_up{") and dead in x and x.endswith(" 1.0")
            for x in hub.session.get(f"{hub.url}/hub/metrics", timeout=10).text.splitlines()
        ),
        45,
        what=f"{dead} to be up again in /hub/metrics",
    )
    _, errors = all_at_once(hub.stop_server, wanted, 120)
    assert not errors, "stop " + "\nstop ".join(errors)
    assert not hub.my_procs()


@pytest.mark.any_hub
def test_blackholed_host_bounds_every_wait_and_spares_other_users(testbed, hub_factory):
    """Packets to alice's host are dropped: polls of her server stay bounded
    (unknown, kept), the API answers, and bob's spawn goes to a healthy host
    without waiting on the dead one beyond the connect timeout."""
    hub = hub_factory(
        {
            "Spawner.poll_interval": 1,
            "SSHSpawner.connect_timeout": 3.0,
            "SSHSpawner.command_timeout": 5.0,
            "SSHSpawner.facts_cache": 0.0,
        }
    )
    hub.spawn(ALICE)
    state = hub.ssh_state(ALICE)
    host = state["host"]
    with host_cut(testbed, host):
        log_before = len(hub.log_text())
        wait_until(
            lambda: "cannot reach the host" in hub.log_text()[log_before:],
            20,
            what="the poll of the blackholed host to give up",
        )
        t0 = time.monotonic()
        model, took = hub.spawn(BOB, timeout=30)
        bob = hub.ssh_state(BOB)
        print(f"BLACKHOLE bob spawned on {bob['host']} in {took:.2f} s (alice on {host})")
        assert bob["host"] != host
        assert took < 20, f"bob's spawn waited {took:.1f} s on the blackholed host"
        for _ in range(5):
            t1 = time.monotonic()
            r = hub.api("GET", f"/users/{ALICE}", timeout=10)
            assert r.status_code == 200
            assert time.monotonic() - t1 < 2, "the hub API stalls behind the blackholed host"
        assert hub.server_model(ALICE) is not None, "alice's server dropped within the grace"
        assert proc_start_time(state["pid"]) == state["start_time"]
        print(f"BLACKHOLE checks done {time.monotonic() - t0:.2f} s")
    wait_until(
        lambda: hub.proxy_get(f"/user/{ALICE}/api/status").status_code == 200,
        30,
        what="alice's server to answer after heal",
    )
    hub.stop_server(BOB)
    hub.stop_server(ALICE)
    assert read_proc(state["pid"]) is None or proc_start_time(state["pid"]) != state["start_time"]


def test_hostile_server_names_reach_the_server_exactly_and_run_nothing(testbed, hub_factory):
    """JupyterHub 6 refuses server names that are not safe slugs (400); one
    that gets through travels in the environment only (never in a path or a
    command line) and arrives byte-exact. Either way nothing of it runs."""
    canary = Path(testbed["homes"][ALICE]) / "e2e-pwned"
    canary.unlink(missing_ok=True)
    c = canary.name
    names = [
        f"x$(touch${{IFS}}{c})`touch${{IFS}}{c}`;touch${{IFS}}{c}&&touch${{IFS}}{c}",
        "ünï-✓-" + "ö" * 100,
    ]
    # A name the hub accepts may still break its routing (JupyterHub 5 puts
    # it in the server's URL): that fails the spawn, which is not ours to fix.
    hub = hub_factory({"Spawner.http_timeout": 10})
    for name in names:
        r = hub.request_spawn(ALICE, name)
        if r.status_code == 400:
            print(f"SERVER NAME {name[:40]!r}: refused by the hub: {r.text[:200]}")
            continue
        assert r.status_code in (201, 202), (name, r.status_code, r.text)
        try:
            hub.wait_ready(ALICE, name)
        except SpawnFailed as e:
            print(f"SERVER NAME {name[:40]!r}: accepted, but the spawn failed: {e}")
            assert not hub.my_procs()
            continue
        state = hub.ssh_state(ALICE, name)
        _, env = assert_server_process(testbed, state, ALICE)
        assert env["JUPYTERHUB_SERVER_NAME"] == name
        assert name not in state["dir"]
        hub.stop_server(ALICE, name)
    assert not canary.exists(), "a server name ran as a command"


def test_unwritable_journal_fails_the_spawn_before_anything_runs(testbed, hub_factory, tmp_path):
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    hub = hub_factory({"SSHSpawner.journal_dir": str(blocker / "journal")})
    r = hub.request_spawn(ALICE)
    failure = hub.progress_failure(ALICE)
    print(f"POST {r.status_code}; {failure}")
    assert "Spawn failed" in failure, failure
    assert "cannot write the start journal" in failure, failure
    assert str(blocker) in failure, failure
    assert not hub.user_model(ALICE)["servers"]
    assert not hub.my_procs()


@pytest.mark.any_hub
def test_sshd_restarted_under_pooled_connections_is_invisible(testbed, hub_factory):
    """sshd restarts on the server's host while the hub holds pooled
    connections there: polls go on over new connections, nothing is dropped,
    and stop still reaches the server. sshd is down for a moment while it
    restarts: a poll that lands in that window says the host did not answer
    (a warning, the server kept) and the next poll says it answers again."""
    hub = hub_factory({"Spawner.poll_interval": 1})
    hub.spawn(ALICE)
    state = hub.ssh_state(ALICE)
    assert_server_process(testbed, state, ALICE)
    wait_polls(hub, ALICE, 1, 0)  # a poll has gone over the pooled connection
    log_before = len(hub.log_text())
    bed_fault(testbed, "sshd-restart", state["host"])
    # Polls after the restart, over new connections (the first may land
    # while sshd is down; the next ones must answer).
    wait_polls(hub, ALICE, 3, log_before)
    log = hub.log_text()[log_before:]
    if "cannot reach the host" in log:
        wait_until(
            lambda: "host answers again" in hub.log_text()[log_before:],
            5,
            what="the next poll to reach the restarted sshd",
        )
        print("SSHD_RESTART: one poll landed while sshd was down; the next one answered")
    log = hub.log_text()[log_before:]
    assert "server is gone" not in log
    assert "reporting the server stopped" not in log
    assert hub.server_model(ALICE)["ready"]
    assert proc_start_time(state["pid"]) == state["start_time"]
    hub.stop_server(ALICE)
    assert proc_start_time(state["pid"]) != state["start_time"], "stop did not reach the server"
    assert not group_members(state["pgid"])

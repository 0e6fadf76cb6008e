"""Spawns that fail: the user gets the reason, the hosts keep nothing."""

from __future__ import annotations

import os
import time

from .conftest import all_procs, read_proc, wait_until

ALICE = "tb-alice"


def test_server_that_exits_at_once_reports_its_log_and_leaves_no_key(
    testbed, hub_factory, tmp_path
):
    hub = hub_factory(
        {
            "JupyterHub.internal_ssl": True,
            "JupyterHub.internal_certs_location": str(tmp_path / "internal-ssl"),
            "JupyterHub.trusted_alt_names": [f"IP:{testbed['hub_address']}"],
            "Spawner.cmd": ["/bin/sh", "-c", "echo e2e-boom-marker >&2; exit 3"],
        }
    )
    r = hub.request_spawn(ALICE)
    assert r.status_code >= 400, (r.status_code, r.text)
    failure = hub.progress_failure(ALICE)
    print(f"FAILURE {failure}")
    assert "Spawn failed" in failure
    assert "e2e-boom-marker" in failure, "the server's log tail should reach the user"
    assert "3" in failure
    assert not hub.user_model(ALICE)["servers"]
    assert not hub.my_procs()
    # Only the log (and exit status) may stay: no certificates, no private key.
    for base in hub.host_dirs():
        if not base.exists():
            continue
        for d in base.iterdir():
            left = set(os.listdir(d))
            assert left <= {"server.log", "exit_status"}, f"left in {d}: {left}"


def test_start_timeout_cancels_the_launch_and_nothing_starts_later(testbed, hub_factory):
    marker = "6.29"  # the prologue's sleep: unique, so it can be watched for
    hub = hub_factory({"Spawner.start_timeout": 3, "SSHSpawner.prologue": [f"sleep {marker}"]})
    t0 = time.monotonic()
    r = hub.request_spawn(ALICE)
    took = time.monotonic() - t0
    assert r.status_code >= 400, (r.status_code, r.text)
    assert took < 10, f"the start was not cut off after start_timeout: {took:.1f} s"
    assert "failed to start in 3 seconds" in hub.log_text()
    assert not hub.user_model(ALICE)["servers"]
    # Once the prologue is over (cut off, or run to its end) and the shell
    # that ran it is gone (it would have forked the server's wrapper before
    # exiting), nothing of this spawn runs and no per-server files stay.
    shells: set[int] = set()

    def prologue_over() -> bool:
        sleeps = [p for p in all_procs() if p.argv == ["sleep", marker]]
        shells.update(p.ppid for p in sleeps)
        return not sleeps and all(read_proc(pid) is None for pid in shells)

    wait_until(prologue_over, 20, what="the prologue and its shell to end")
    base = hub.state_dir.removeprefix("~/").encode()
    assert not [p.argv for p in all_procs() if base in p.cmdline]
    assert not hub.my_procs()
    for d in hub.host_dirs():
        if d.exists():
            for sub in d.iterdir():
                left = set(os.listdir(sub))
                assert left <= {"server.log", "exit_status"}, f"left in {sub}: {left}"

"""jupyterhub-idle-culler as a real hub service: an idle server is culled and
nothing of it is left on its host; a server in use is kept.

Short timeouts keep it quick: the culler looks every 3 s for servers idle
12 s, and the hub copies the proxy's activity every 2 s.
"""

from __future__ import annotations

import sys
import threading
from pathlib import Path

import pytest

from .conftest import (
    E2E_SCOPES,
    all_procs,
    group_members,
    proc_environ,
    proc_start_time,
    wait_until,
)

# The culler is a hub service speaking the REST API both versions share; the
# spawner's part (a stop that leaves nothing on the host) is the core's.
pytestmark = pytest.mark.any_hub  # see conftest.ANY_HUB

ALICE = "tb-alice"  # left idle
BOB = "tb.bob-2"  # in use
CULL_TIMEOUT = 12


def run_procs(run_id: str) -> list:
    """Every process of a server: its environment names the run."""
    out = []
    for p in all_procs():
        try:
            if proc_environ(p.pid).get("SSH_SPAWNER_RUN") == run_id:
                out.append(p)
        except OSError:
            continue
    return out


def test_idle_culler_culls_idle_server_and_keeps_active_one(testbed, hub_factory):
    pytest.importorskip("jupyterhub_idle_culler")
    hub = hub_factory(start=False)
    hub.start(
        **{
            "JupyterHub.last_activity_interval": 2,
            "SSHSpawner.keep_log": False,
            "JupyterHub.services": [
                {"name": "e2e", "api_token": hub.token},
                {
                    "name": "idle-culler",
                    "command": [
                        sys.executable,
                        "-m",
                        "jupyterhub_idle_culler",
                        f"--timeout={CULL_TIMEOUT}",
                        "--cull-every=3",
                    ],
                },
            ],
            "JupyterHub.load_roles": [
                {
                    "name": "e2e",
                    "scopes": list(E2E_SCOPES),
                    "services": ["e2e"],
                },
                {
                    "name": "idle-culler",
                    "scopes": [
                        "list:users",
                        "read:users:activity",
                        "read:servers",
                        "delete:servers",
                    ],
                    "services": ["idle-culler"],
                },
            ],
        }
    )

    # bob first: had his activity not counted, he would be culled first.
    hub.spawn(BOB)
    bob = hub.ssh_state(BOB)
    stop_use = threading.Event()

    def use_bob():
        while not stop_use.wait(1.0):
            try:
                hub.proxy_get(f"/user/{BOB}/api/status", timeout=5)
            except Exception:  # noqa: BLE001 -- keep using; asserted below
                pass

    user = threading.Thread(target=use_bob, daemon=True)
    user.start()
    try:
        hub.spawn(ALICE)
        alice = hub.ssh_state(ALICE)
        d = Path(alice["dir"])
        # A kernel and a terminal, then nobody touches the server.
        r = hub.session.post(f"{hub.url}/user/{ALICE}/api/kernels", json={}, timeout=30)
        assert r.status_code == 201, (r.status_code, r.text[:300])
        r = hub.session.post(f"{hub.url}/user/{ALICE}/api/terminals", timeout=10)
        assert r.status_code == 200, (r.status_code, r.text[:300])
        procs = wait_until(
            lambda: (lambda ps: ps if len(ps) >= 3 else None)(run_procs(alice["run_id"])),
            30,
            what="alice's server, kernel and terminal",
        )
        kernels = [p for p in procs if any("ipykernel" in a for a in p.argv)]
        assert kernels, [p.argv for p in procs]
        print("ALICE_PROCS " + "; ".join(f"{p.pid} {' '.join(p.argv)[-80:]}" for p in procs))

        culled = wait_until(
            lambda: hub.server_model(ALICE) is None,
            CULL_TIMEOUT + 60,
            what="the culler to stop alice's idle server",
        )
        assert culled
        log = hub.log_text()
        assert "idle-culler" in log, "the culler service never ran"

        # Nothing of alice's server is left on the host.
        wait_until(
            lambda: all(proc_start_time(p.pid) != p.start for p in procs),
            15,
            what="alice's processes to be gone",
        )
        assert not group_members(alice["pgid"])
        assert not run_procs(alice["run_id"])
        assert not d.exists(), f"{d} left: {sorted(p.name for p in d.iterdir())}"

        # bob, in use all along, is kept through two more culler rounds.
        # (The culler lists users with a query; the test's own calls name one.)
        rounds = log.count("/hub/api/users?")
        assert rounds, "no request of the culler in the hub's log"
        wait_until(
            lambda: hub.log_text().count("/hub/api/users?") >= rounds + 2,
            30,
            what="two more culler rounds",
        )
        model = hub.server_model(BOB)
        assert model is not None and model.get("ready"), model
        assert proc_start_time(bob["pid"]) == bob["start_time"], "bob's server was stopped"
    finally:
        stop_use.set()
        user.join(5)

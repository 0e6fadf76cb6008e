"""SSH tunnels: servers on hosts whose firewall lets in nothing but SSH.

The host's namespace firewall (``scripts/testbed firewall NODE on``) drops every
inbound TCP port but 22; ``isolate`` also keeps the host from opening
connections to the hub side. The hub reaches the server through a local port
carried over the pooled SSH connection (``tunnel``), and with ``hub_tunnel`` the
server reaches the hub API through a remote forward. Both must come back after
a hub restart and an sshd restart, and close when the server stops.
"""

from __future__ import annotations

import ast
import contextlib
import os
import signal
import socket
import subprocess
import threading
from urllib.parse import quote

import pytest
import requests

from .conftest import (
    E2E_SCOPES,
    REPO,
    assert_server_process,
    bed_fault,
    wait_polls,
    wait_until,
)

pytestmark = pytest.mark.any_hub  # see conftest.ANY_HUB

ALICE = "tb-alice"
BOB = "tb.bob-2"


# This checkout's script: the bed may have been brought up by an older one.
TESTBED_SCRIPT = str(REPO / "scripts" / "testbed")


@contextlib.contextmanager
def firewall(host: str, mode: str):
    subprocess.run([TESTBED_SCRIPT, "firewall", host, mode], check=True, timeout=120)
    try:
        yield
    finally:
        subprocess.run([TESTBED_SCRIPT, "firewall", host, "off"], check=True, timeout=120)


def can_connect(address: str, port: int, netns: str | None = None) -> bool:
    if netns is None:
        with contextlib.suppress(OSError), socket.create_connection((address, port), timeout=2):
            return True
        return False
    probe = subprocess.run(
        ["ip", "netns", "exec", netns, "timeout", "3", "bash", "-c", f"</dev/tcp/{address}/{port}"],
        capture_output=True,
        timeout=10,
        check=False,
    )
    return probe.returncode == 0


def host_config(tb: dict, name: str) -> list[dict]:
    return [{"address": h["address"], "name": h["name"]} for h in tb["hosts"] if h["name"] == name]


def fresh_token(hub, user: str) -> str:
    """A new token of the user: the server has never seen it, so it must ask
    the hub API (through whatever path the server has to the hub)."""
    r = hub.api("POST", f"/users/{quote(user, safe='')}/tokens", json={"expires_in": 600})
    assert r.status_code in (200, 201), (r.status_code, r.text)
    return r.json()["token"]


def status_with_fresh_token(hub, user: str) -> int:
    token = fresh_token(hub, user)
    with contextlib.suppress(requests.RequestException):
        r = requests.get(
            f"{hub.url}/user/{quote(user)}/api/status",
            headers={"Authorization": f"token {token}"},
            timeout=10,
            allow_redirects=False,
        )
        return r.status_code
    return -1


def status(hub, user: str) -> int:
    with contextlib.suppress(requests.RequestException):
        return hub.proxy_get(f"/user/{quote(user)}/api/status").status_code
    return -1


def test_tunnel_through_a_firewall_survives_hub_and_sshd_restarts(testbed, hub_factory):
    node = "node2"
    with firewall(node, "on"):
        hub = hub_factory(
            {
                "SSHSpawner.hosts": host_config(testbed, node),
                "SSHSpawner.tunnel": True,
                "JupyterHub.cleanup_servers": False,
                "Spawner.poll_interval": 2,
            }
        )
        hub.spawn(ALICE)
        state = hub.ssh_state(ALICE)
        local = state["tunnel_port"]
        assert can_connect("127.0.0.1", local)
        _, env = assert_server_process(testbed, state, ALICE)
        # The server listens on the host's loopback only, and the firewall
        # would drop the hub's direct connection anyway.
        assert env["JUPYTERHUB_SERVICE_URL"].startswith(f"http://127.0.0.1:{state['port']}/")
        assert not can_connect(state["address"], state["port"])
        assert status(hub, ALICE) == 200

        # Hub restart: the same local port listens again on the first poll.
        hub.stop()
        assert not can_connect("127.0.0.1", local), "tunnel outlived the hub process"
        hub.start()
        wait_until(lambda: status(hub, ALICE) == 200, 30, what="the server through the tunnel")
        assert hub.ssh_state(ALICE)["tunnel_port"] == local
        assert hub.ssh_state(ALICE)["pid"] == state["pid"]

        # sshd restarts under the pooled connection: a brief pause at most.
        bed_fault(testbed, "sshd-restart", node)
        wait_until(lambda: status(hub, ALICE) == 200, 15, what="the tunnel after sshd restart")

        hub.stop_server(ALICE)
        wait_until(
            lambda: not can_connect("127.0.0.1", local), 10, what="the tunnel to close on stop"
        )


def test_tunnel_port_taken_during_a_hub_restart_moves_the_route(testbed, hub_factory):
    """Another program takes the tunnel's local port while the hub is down:
    the restarted hub listens on another port, JupyterHub moves the server and
    its proxy route there (get_url), and nothing runs unknown to the hub."""
    node = "node2"
    hub = hub_factory(
        {
            "SSHSpawner.hosts": host_config(testbed, node),
            "SSHSpawner.tunnel": True,
            "JupyterHub.cleanup_servers": False,
        }
    )
    hub.spawn(ALICE)
    state = hub.ssh_state(ALICE)
    local = state["tunnel_port"]
    hub.stop()
    with socket.socket() as taker:
        taker.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        taker.bind(("127.0.0.1", local))
        taker.listen()
        log_before = len(hub.log_text())
        hub.start()
        wait_until(lambda: status(hub, ALICE) == 200, 30, what="the server on a new tunnel port")
        moved = hub.ssh_state(ALICE)
        assert moved["tunnel_port"] != local
        assert moved["pid"] == state["pid"] and moved["run_id"] == state["run_id"]
        assert hub.server_model(ALICE)["ready"]
        assert_server_process(testbed, moved, ALICE)
        log = hub.log_text()[log_before:]
        assert f"tunnel port {local} was taken by another program" in log
        assert "reporting the server stopped" not in log
        # The new port is what the database holds: a second restart uses it.
        hub.stop()
        hub.start()
        wait_until(lambda: status(hub, ALICE) == 200, 30, what="the server after a 2nd restart")
        assert hub.ssh_state(ALICE)["tunnel_port"] == moved["tunnel_port"]
    hub.stop_server(ALICE)
    wait_until(lambda: not hub.my_procs(), 15, what="no process of the server left")
    wait_until(
        lambda: not can_connect("127.0.0.1", moved["tunnel_port"]),
        10,
        what="the tunnel to close on stop",
    )


def test_hub_tunnel_for_a_host_that_cannot_reach_the_hub(testbed, hub_factory):
    node = "node3"
    with firewall(node, "isolate"):
        hub = hub_factory(
            {
                "SSHSpawner.hosts": host_config(testbed, node),
                "SSHSpawner.tunnel": True,
                "SSHSpawner.hub_tunnel": True,
                "JupyterHub.cleanup_servers": False,
                # the e2e service also makes tokens the server has never seen
                "JupyterHub.load_roles": [
                    {
                        "name": "e2e",
                        "scopes": [*E2E_SCOPES, "tokens"],
                        "services": ["e2e"],
                    }
                ],
                "Spawner.poll_interval": 2,
            }
        )
        ns = f"tb-{node}"
        # The host really cannot open a connection to the hub API.
        assert not can_connect(hub.hub_ip, hub.hub_port, netns=ns)

        hub.spawn(BOB)
        state = hub.ssh_state(BOB)
        remote = state["hub_forward_port"]
        assert state["hub_forward_to"] == f"{hub.hub_ip}:{hub.hub_port}"
        _, env = assert_server_process(testbed, state, BOB)
        for var in ("JUPYTERHUB_API_URL", "JUPYTERHUB_ACTIVITY_URL"):
            assert env[var].startswith(f"http://127.0.0.1:{remote}/hub/api"), (var, env[var])
        # A token the server has never seen is checked with the hub API,
        # through the remote forward.
        assert status_with_fresh_token(hub, BOB) == 200
        # Without internal_ssl, the admin is told once what that costs.
        warned = "hub_tunnel without internal_ssl: each server's hub API calls, its token included"
        assert hub.log_text().count(warned) == 1, hub.log_tail(4000)

        hub.stop()
        hub.start()
        wait_until(
            lambda: status_with_fresh_token(hub, BOB) == 200,
            30,
            what="the server to reach the hub API again after a hub restart",
        )
        assert hub.ssh_state(BOB)["hub_forward_port"] == remote

        bed_fault(testbed, "sshd-restart", node)
        wait_until(
            lambda: status_with_fresh_token(hub, BOB) == 200,
            15,
            what="the hub tunnel after sshd restart",
        )

        hub.stop_server(BOB)
        assert not can_connect("127.0.0.1", state["tunnel_port"])
        wait_until(
            lambda: not can_connect("127.0.0.1", remote, netns=ns),
            10,
            what="the hub tunnel to close on stop",
        )


def test_hub_tunnel_to_an_api_url_set_in_spawner_environment_survives_five_polls(
    testbed, hub_factory
):
    """JupyterHub's documented override, ``Spawner.environment`` setting
    JUPYTERHUB_API_URL, with ``hub_tunnel``: the tunnel carries to the
    overridden address, and every poll expects that address too (each poll
    used to expect the hub's own default instead, refuse the state at the
    first poll and report a running server stopped)."""
    hub = hub_factory(
        {
            "SSHSpawner.hosts": host_config(testbed, "node1"),
            "SSHSpawner.hub_tunnel": True,
            # The hub API on every address, announced on the bed's; the
            # override names the hub machine's loopback instead.
            "JupyterHub.hub_ip": "0.0.0.0",
            "JupyterHub.hub_connect_ip": testbed["hub_address"],
            "JupyterHub.load_roles": [
                {"name": "e2e", "scopes": [*E2E_SCOPES, "tokens"], "services": ["e2e"]}
            ],
            "Spawner.poll_interval": 1,
        },
        start=False,
    )
    api = f"http://127.0.0.1:{hub.hub_port}/hub/api"
    hub.start(**{"Spawner.environment": {"JUPYTERHUB_API_URL": api}})
    mark = len(hub.log_text())
    hub.spawn(BOB)
    state = hub.ssh_state(BOB)
    assert state["hub_forward_to"] == f"127.0.0.1:{hub.hub_port}", state
    wait_polls(hub, BOB, 5, mark)
    after = hub.log_text()[mark:]
    assert "refusing" not in after, after[-2000:]
    assert f"{BOB}: poll answered running" in after
    assert hub.ssh_state(BOB)["run_id"] == state["run_id"]
    # The server asks the hub API through the tunnel, at the overridden address.
    assert status_with_fresh_token(hub, BOB) == 200
    hub.stop_server(BOB)


# Another user of the host, bound to a port on its loopback: writes what each
# connection sent, as repr() lines, and answers nothing.
SQUATTER = """
import socket, sys, time
s = socket.socket()
# The forward's closed connections linger in TIME_WAIT on the port.
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
end = time.time() + 20
while True:
    try:
        s.bind(("127.0.0.1", int(sys.argv[1])))
        break
    except OSError:
        if time.time() > end:
            raise
        time.sleep(0.05)
s.listen(16)
s.settimeout(1)
print("bound", flush=True)
while time.time() < end + 100:  # never outlives the test for long
    try:
        c, _ = s.accept()
    except OSError:
        continue
    c.settimeout(2)
    data = b""
    try:
        while len(data) < 65536:
            b = c.recv(4096)
            if not b:
                break
            data += b
    except OSError:
        pass
    c.close()
    print(repr(data), flush=True)
"""


def test_internal_ssl_runs_end_to_end_through_both_tunnels_and_keeps_the_token_from_a_squatter(
    testbed, hub_factory, tmp_path
):
    """The tunnels carry bytes only: TLS is between the hub and the server (the
    server's certificate names 127.0.0.1, as does the hub's). While the hub is
    down, another user of the host binds the hub tunnel's port: the server's
    hub API calls reach them, but under TLS that they cannot finish, so its
    token never does; the restarted hub logs the port as taken, and once it is
    free again the server reaches the hub (docs/security.md, "The hub
    tunnel's port on a shared host")."""
    node = "node3"
    with firewall(node, "isolate"):
        hub = hub_factory(
            {
                "SSHSpawner.hosts": host_config(testbed, node),
                "SSHSpawner.tunnel": True,
                "SSHSpawner.hub_tunnel": True,
                "JupyterHub.internal_ssl": True,
                "JupyterHub.internal_certs_location": str(tmp_path / "internal-ssl"),
                "JupyterHub.cleanup_servers": False,
                "Spawner.poll_interval": 2,
                "Spawner.environment": {"JUPYTERHUB_ACTIVITY_INTERVAL": "1"},
                # the proxy reaches the hub at hub_ip: its certificate must name it
                "JupyterHub.trusted_alt_names": [f"IP:{testbed['hub_address']}"],
                "JupyterHub.load_roles": [
                    {
                        "name": "e2e",
                        "scopes": [*E2E_SCOPES, "tokens"],
                        "services": ["e2e"],
                    }
                ],
            }
        )
        hub.spawn(ALICE)
        assert "hub_tunnel without internal_ssl" not in hub.log_text()
        state = hub.ssh_state(ALICE)
        _, env = assert_server_process(testbed, state, ALICE)
        assert env["JUPYTERHUB_SERVICE_URL"].startswith(f"https://127.0.0.1:{state['port']}/")
        assert env["JUPYTERHUB_API_URL"].startswith(
            f"https://127.0.0.1:{state['hub_forward_port']}/hub/api"
        )
        assert status_with_fresh_token(hub, ALICE) == 200

        # The hub goes down; bob binds the hub tunnel's port on the host.
        remote = state["hub_forward_port"]
        token = env["JUPYTERHUB_API_TOKEN"].encode()
        hub.stop()
        squat = subprocess.Popen(
            ["ip", "netns", "exec", f"tb-{node}", "runuser", "-u", BOB, "--"]
            + ["/usr/bin/python3", "-c", SQUATTER, str(remote)],
            stdout=subprocess.PIPE,
            text=True,
            # runuser forks: the group is what is killed.
            start_new_session=True,
        )
        seen: list[str] = []
        reader = threading.Thread(target=lambda: seen.extend(squat.stdout), daemon=True)
        reader.start()
        try:
            wait_until(lambda: seen, 30, what="bob to bind the port")
            assert seen[0].strip() == "bound", seen
            # The server reports activity every second: it calls the port bob holds.
            wait_until(
                lambda: len(seen) >= 3,
                30,
                what="the server's hub API calls to reach the port bob holds",
            )
            hub.start()
            wait_until(
                lambda: "the hub tunnel's port is taken on the host" in hub.log_text(),
                30,
                what="the restarted hub to log the taken port",
            )
        finally:
            os.killpg(squat.pid, signal.SIGKILL)
            squat.wait()
            # A failure above leaves the hub down: up again, so the
            # teardown stops the server.
            if hub.proc is None or hub.proc.poll() is not None:
                hub.start()
        got = [ast.literal_eval(line) for line in seen[1:] if line.strip()]
        got = [data for data in got if data]
        assert got, seen
        for data in got:
            assert token not in data, "the token reached bob"
            assert b"Authorization" not in data and b"HTTP/1." not in data, data[:200]
            assert data[:1] == b"\x16", f"not a TLS handshake: {data[:40]!r}"  # a ClientHello
        wait_until(
            lambda: status_with_fresh_token(hub, ALICE) == 200,
            60,
            what="the server to reach the hub API once the port is free again",
        )
        hub.stop_server(ALICE)

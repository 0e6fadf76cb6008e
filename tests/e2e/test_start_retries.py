"""The hub's start is the core's one start loop (plan::retry): a port taken
between choosing and starting moves the server to another port on the same
host, a host that stops answering during the launch moves it to another host
and leaves a pending stop for what the launch may have left there."""

from __future__ import annotations

import json
import threading
import time

import pytest

from .conftest import bed_fault, wait_until

pytestmark = pytest.mark.any_hub  # see conftest.ANY_HUB

ALICE = "tb-alice"
BOB = "tb.bob-2"

# A spawner that, once per user, lets another program take the chosen port
# on the host right after the choice (what a busy host does by chance): the
# launch then finds it taken. Everything else is the real class.
SQUAT_MODULE = """
import asyncio
import json
import subprocess
import sys

from ssh_spawner import SSHSpawner

NETNS = {netns!r}
SQUATTERS = []


class PortTakenOnce(SSHSpawner):
    squatted = set()

    async def _prepare(self, exclude=()):
        await super()._prepare(exclude)
        if self.user.name in PortTakenOnce.squatted:
            return
        PortTakenOnce.squatted.add(self.user.name)
        port, host = self._prepared.port, self._prepared.host
        code = (
            "import socket,time; s=socket.socket(); "
            f"s.bind(('0.0.0.0',{{port}})); s.listen(); time.sleep(60)"
        )
        SQUATTERS.append(
            subprocess.Popen(["ip", "netns", "exec", NETNS[host], sys.executable, "-c", code])
        )
        address = self._prepared.address
        for _ in range(100):
            try:
                _, w = await asyncio.open_connection(address, port)
                w.close()
                break
            except OSError:
                await asyncio.sleep(0.1)
        with open("squatted.json", "w") as f:
            json.dump({{"host": host, "port": port}}, f)
"""


def progress_during(hub, user: str, name: str = "") -> tuple[list[str], dict]:
    """Spawn and read the progress stream while it is pending."""
    hub.create_user(user)
    result: dict = {}

    def spawn():
        result["model"] = hub.spawn(user, name)

    t = threading.Thread(target=spawn)
    t.start()
    events: list[dict] = []
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        events = hub.progress_events(user, name, timeout=60)
        first = events[0].get("message", "") if events else ""
        if not first.startswith(("progress: HTTP 400", "progress: HTTP 404")):
            break
        time.sleep(0.05)
    t.join(90)
    assert "model" in result, "spawn did not complete"
    return [e.get("message", "") for e in events], result["model"]


def test_a_port_taken_at_launch_moves_the_server_to_another_port(testbed, hub_factory):
    node = testbed["hosts"][0]
    hub = hub_factory(
        {
            "JupyterHub.spawner_class": "squat_spawner.PortTakenOnce",
            "SSHSpawner.hosts": [{"address": node["address"], "name": node["name"]}],
            # Keeps the spawn pending until the progress stream is read.
            "SSHSpawner.prologue": ["sleep 2"],
        },
        start=False,
    )
    netns = {h["name"]: h["netns"] for h in testbed["hosts"]}
    (hub.dir / "squat_spawner.py").write_text(SQUAT_MODULE.format(netns=netns))
    hub.start()

    messages, _ = progress_during(hub, ALICE)
    print(f"PROGRESS {messages}")
    taken = json.loads((hub.dir / "squatted.json").read_text())
    state = hub.ssh_state(ALICE)
    assert state["host"] == taken["host"] == node["name"]
    assert state["port"] != taken["port"]
    assert f"Port {taken['port']} was taken meanwhile; trying port {state['port']}" in messages
    # The server answers on its new port, through the proxy.
    r = hub.proxy_get(f"/user/{ALICE}/api/status")
    assert r.status_code == 200, r.text
    hub.stop_server(ALICE)


def test_a_host_cut_during_the_launch_moves_the_server_and_leaves_a_pending_stop(
    testbed, hub_factory
):
    one, two = testbed["hosts"][1], testbed["hosts"][2]
    hub = hub_factory(
        {
            "SSHSpawner.hosts": [{"address": h["address"], "name": h["name"]} for h in (one, two)],
            # In turn, and the facts read once: the hub still believes the
            # first host is fine when it is cut, so it is the launch that fails.
            "SSHSpawner.host_selection": "round-robin",
            "SSHSpawner.facts_cache": 600.0,
            "SSHSpawner.connect_timeout": 3.0,
            "SSHSpawner.command_timeout": 5.0,
            "SSHSpawner.pending_stop_retry": 2.0,
        }
    )
    hub.create_user(BOB)
    hub.spawn(BOB, "a")
    hub.spawn(BOB, "b")
    first, second = hub.ssh_state(BOB, "a")["host"], hub.ssh_state(BOB, "b")["host"]
    assert first != second
    hub.stop_server(BOB, "a")
    hub.stop_server(BOB, "b")
    # The next in turn is the first host again: cut it.
    bed_fault(testbed, "cut", first)
    try:
        t0 = time.monotonic()
        messages, _ = progress_during(hub, BOB, "c")
        took = time.monotonic() - t0
        print(f"FAILOVER_SPAWN_TO_READY seconds={took:.2f} progress={messages}")
        state = hub.ssh_state(BOB, "c")
        assert state["host"] == second
        assert any(m.startswith(f"{first} did not answer") for m in messages), messages
        assert any("trying another host" in m for m in messages), messages
        stops = hub.dir / "ssh-spawner-journal" / "stops"
        pending = sorted(p.name for p in stops.iterdir()) if stops.exists() else []
        assert len(pending) == 1, pending
        assert pending != [f"{state['run_id']}.json"]
        r = hub.proxy_get(f"/user/{BOB}/c/api/status")
        assert r.status_code == 200, r.text
    finally:
        bed_fault(testbed, "heal", first)
    wait_until(
        lambda: not any(stops.iterdir()),
        60,
        interval=0.5,
        what="the pending stop of the abandoned launch to finish once its host is back",
    )
    hub.stop_server(BOB, "c")

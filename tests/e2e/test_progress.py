"""The progress API shows the spawner's own messages, to every watcher."""

from __future__ import annotations

import threading
import time

ALICE = "tb-alice"


def test_progress_stream_shows_spawner_messages(testbed, hub_factory):
    # A prologue that sleeps keeps the spawn pending long enough for the
    # watchers to connect before it completes (they replay from the start).
    hub = hub_factory({"SSHSpawner.prologue": ["sleep 2"]})
    hub.create_user(ALICE)
    spawn_result = {}

    def spawn():
        spawn_result["model"] = hub.spawn(ALICE)

    spawner_thread = threading.Thread(target=spawn)
    spawner_thread.start()

    streams: dict[int, list[dict]] = {}

    def watch(i):
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            events = hub.progress_events(ALICE, timeout=60)
            first = events[0].get("message", "") if events else ""
            if first.startswith(("progress: HTTP 400", "progress: HTTP 404")):
                time.sleep(0.05)  # not pending yet
                continue
            streams[i] = events
            return

    watchers = [threading.Thread(target=watch, args=(i,)) for i in range(2)]
    for w in watchers:
        w.start()
    for w in watchers:
        w.join(90)
    spawner_thread.join(90)
    assert "model" in spawn_result, "spawn did not complete"

    assert set(streams) == {0, 1}, streams
    for i, events in streams.items():
        messages = [e.get("message", "") for e in events]
        print(f"PROGRESS watcher={i}: {messages}")
        chosen = [j for j, m in enumerate(messages) if "chosen" in m]
        started = [j for j, m in enumerate(messages) if "started on" in m]
        assert chosen, messages
        assert started, messages
        assert chosen[0] < started[0], messages
        assert events[-1].get("ready") is True, events[-1]
        state = hub.ssh_state(ALICE)
        assert any(state["host"] in m and str(state["port"]) in m for m in messages), messages
        assert any(f"pid {state['pid']}" in m for m in messages), messages
    # each watcher saw every event
    assert [e["message"] for e in streams[0]] == [e["message"] for e in streams[1]]

"""Ten servers spawned at once across the three hosts."""

from __future__ import annotations

import statistics
import threading
import time
from datetime import datetime

import pytest

from .conftest import assert_server_process, group_members, wait_scans

pytestmark = pytest.mark.any_hub  # see conftest.ANY_HUB

USERS = ("tb-alice", "tb.bob-2")
PER_USER = 5


def test_ten_servers_at_once(testbed, argv_watch, hub):
    wanted = [(u, f"s{i}") for u in USERS for i in range(PER_USER)]
    for u in USERS:
        hub.create_user(u)
    results, errors = {}, []
    go = threading.Barrier(len(wanted))

    def spawn(user, name):
        try:
            go.wait(10)
            results[(user, name)] = hub.spawn(user, name)
        except BaseException as e:  # noqa: BLE001
            errors.append(f"{user}/{name}: {e}")

    t0 = time.monotonic()
    threads = [threading.Thread(target=spawn, args=w) for w in wanted]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    wall = time.monotonic() - t0
    assert not errors, "\n".join(errors)
    assert len(results) == len(wanted)

    times = sorted(t for _, t in results.values())
    print(
        f"TEN_AT_ONCE wall={wall:.2f} min={times[0]:.2f} "
        f"median={statistics.median(times):.2f} max={times[-1]:.2f}"
    )

    # How much of that is the spawner (POST to "Server started", every launch
    # done) and how much the ten Python servers booting on the same CPUs.
    stamps = [
        datetime.strptime(" ".join(line.split()[1:3]), "%Y-%m-%d %H:%M:%S.%f")
        for line in hub.log_text().splitlines()
        if "Calling Spawner.start" in line or "[ssh_spawner::spawner] Server started on" in line
    ]
    launched = (max(stamps) - min(stamps)).total_seconds()
    print(f"TEN_AT_ONCE all launched {launched:.2f} s after the first start")

    states, tokens = {}, {"e2e service token": hub.token}
    for user, name in wanted:
        state = hub.ssh_state(user, name)
        states[(user, name)] = state
        _, env = assert_server_process(testbed, state, user)
        assert env["JUPYTERHUB_SERVER_NAME"] == name
        tokens[f"{user}/{name} API token"] = env["JUPYTERHUB_API_TOKEN"]
        r = hub.proxy_get(f"/user/{user}/{name}/api/status")
        assert r.status_code == 200, (user, name, r.status_code, r.text[:300])

    pairs = {(s["address"], s["port"]) for s in states.values()}
    assert len(pairs) == len(wanted), f"(host, port) pairs collide: {sorted(pairs)}"
    hosts = {s["host"] for s in states.values()}
    assert len(hosts) > 1, f"all ten servers on {hosts}"
    print("HOSTS " + " ".join(f"{h}={sum(s['host'] == h for s in states.values())}" for h in hosts))
    assert len(set(tokens.values())) == len(tokens), "API tokens are not distinct"

    # Stop them all at once too.
    errors.clear()

    def stop(user, name):
        try:
            hub.stop_server(user, name)
        except BaseException as e:  # noqa: BLE001
            errors.append(f"stop {user}/{name}: {e}")

    threads = [threading.Thread(target=stop, args=w) for w in wanted]
    for t in threads:
        t.start()
    for t in threads:
        t.join(90)
    assert not errors, "\n".join(errors)
    for (user, name), s in states.items():
        assert not group_members(s["pgid"]), f"{user}/{name}: process group left"

    wait_scans(argv_watch)  # the /proc scanner has looked after the stops too
    argv_watch.stop()
    assert argv_watch.passes > 10
    assert not argv_watch.offending(tokens)

"""Hostile inputs end in a clear error and leave nothing behind."""

from __future__ import annotations

import time
from urllib.parse import quote

ALICE = "tb-alice"


def test_unknown_host_key_fails_clearly(testbed, hub_factory, tmp_path):
    node1 = testbed["hosts"][0]
    others = [h for h in testbed["hosts"] if h["name"] != node1["name"]]
    known_hosts = tmp_path / "known_hosts_without_node1"
    known_hosts.write_text("".join(f"{h['address']} {h['host_key_pub_line']}\n" for h in others))
    hub = hub_factory(
        {
            "SSHSpawner.hosts": [{"address": node1["address"], "name": node1["name"]}],
            "SSHSpawner.known_hosts": str(known_hosts),
        }
    )
    for _attempt in range(3):
        r = hub.request_spawn(ALICE)
        assert r.status_code >= 400 or r.status_code == 202, (r.status_code, r.text)
        failure = hub.progress_failure(ALICE)
        # Another run sharing the bed may have node1 down for a moment.
        if not any(w in failure for w in ("timed out", "unreachable", "refused")):
            break
        print(f"node1 not answering, retrying: {failure}")
        time.sleep(3)
    print(f"POST {r.status_code} {r.text[:300]!r}\nPROGRESS {failure}")
    assert "Spawn failed" in failure, failure
    assert "host key unknown" in failure, failure
    assert node1["name"] in failure, failure
    model = hub.user_model(ALICE)
    assert not model["servers"], model["servers"]
    assert "host key unknown" in hub.log_text()
    assert not hub.my_procs()
    assert not any(d.exists() for d in hub.host_dirs())


HOSTILE = [
    "x$(id)",
    "x`id`",
    "-oproxycommand=id",
    "a;id",
    "x'\"<>|&",
    "ünïcödé-✓",
    "\u202eevil",
    "long" + "x" * 200,
]


def test_hostile_user_names_are_refused(testbed, hub_factory):
    users = {u["name"] for u in testbed["users"]} | set(HOSTILE)
    hub = hub_factory({"Authenticator.allowed_users": users})
    procs_before = {p.pid for p in hub.my_procs()}
    created = []
    for name in HOSTILE:
        r = hub.api("POST", f"/users/{quote(name, safe='')}")
        if r.status_code == 400:
            print(f"HOSTILE {name!r}: the hub refuses to create it: {r.text[:200]}")
            continue
        # 409: allowed_users already put it in the database at start-up
        assert r.status_code in (201, 409), (name, r.status_code, r.text)
        created.append(r.json()["name"] if r.status_code == 201 else name)
    assert created, "the hub refused every hostile name: nothing reached the spawner"
    for name in created:
        r = hub.api("POST", f"/users/{quote(name, safe='')}/server", timeout=60)
        failure = hub.progress_failure(name)
        print(f"HOSTILE {name!r}: POST {r.status_code}; {failure}")
        assert "Spawn failed" in failure, failure
        assert "user name" in failure, failure
        assert not hub.user_model(name)["servers"]
    assert {p.pid for p in hub.my_procs()} == procs_before == set()
    assert not any(d.exists() for d in hub.host_dirs())

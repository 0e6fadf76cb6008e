"""Running it in a lab: the hub's /hub/metrics and log lines that name the user.

One real hub: alice's named server is spawned with a GPU (the first host
gets the testbed's stand-in nvidia-smi printing two idle RTX 4090s, put back
to none however the test ends), polled and stopped (a child that ignores
SIGTERM makes the stop escalate to SIGKILL), and bob asks for a host that is
cut off. Then /hub/metrics is scraped with a token and every core log line
of the hub's log is checked for the user, server and host.
"""

from __future__ import annotations

import re

import pytest
from prometheus_client.parser import text_string_to_metric_families

from .conftest import E2E_SCOPES, host_cut, standin_gpus, wait_until

# The metrics are the core's, on prometheus_client's registry, which both hub
# versions serve at /hub/metrics; the log lines are the core's too.
pytestmark = pytest.mark.any_hub  # see conftest.ANY_HUB

ALICE = "tb-alice"
BOB = "tb.bob-2"
CORE_LINE = re.compile(r"\[ssh_spawner(::\w+)*\] ")


def scrape(hub) -> dict[tuple[str, tuple], float]:
    """/hub/metrics as {(sample name, sorted labels): value}."""
    r = hub.session.get(f"{hub.url}/hub/metrics", timeout=10)
    assert r.status_code == 200, (r.status_code, r.text[:300])
    out = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(samples, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def total(samples, name: str, **labels) -> float:
    """Sum of the samples of `name` whose labels include `labels`."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= set(ls))


def test_metrics_move_and_logs_name_the_user(testbed, hub_factory):
    hosts = [h["name"] for h in testbed["hosts"]]
    with standin_gpus(testbed, **{hosts[0]: "rtx4090x2-idle"}):
        metrics_move_and_logs_name_the_user(testbed, hub_factory, hosts)


def metrics_move_and_logs_name_the_user(testbed, hub_factory, hosts):
    cut = hosts[-1]
    venv = testbed["venv"]
    hub = hub_factory(
        {
            # A child that ignores SIGTERM: the stop needs SIGKILL.
            "Spawner.cmd": [
                "/bin/sh",
                "-c",
                f"(trap '' TERM; exec sleep 600) & exec {venv}/bin/jupyterhub-singleuser \"$@\"",
                "sh",
            ],
            "SSHSpawner.stop_grace": 1.0,
            "SSHSpawner.connect_timeout": 2.0,
            "Spawner.poll_interval": 1,
            "SSHSpawner.user_gpus_max": 1,
            "JupyterHub.load_roles": [
                {
                    "name": "e2e",
                    "scopes": [*E2E_SCOPES, "read:metrics"],
                    "services": ["e2e"],
                }
            ],
        }
    )
    before = scrape(hub)
    # Registered, and at zero, before anything happened.
    assert ("ssh_spawner_journal_swept_total", (("outcome", "stopped"),)) in before, sorted(before)

    # alice: a named server with a GPU on a host that is not cut.
    r = hub.request_spawn(ALICE, "lab", json={"host": hosts[0], "gpus": 1})
    assert r.status_code in (201, 202), (r.status_code, r.text)
    hub.wait_ready(ALICE, "lab")
    state = hub.ssh_state(ALICE, "lab")
    host = state["host"]
    assert host == hosts[0]

    # bob: a host that does not answer.
    with host_cut(testbed, cut):
        r = hub.request_spawn(BOB, json={"host": cut})
        if r.status_code in (201, 202):
            wait_until(lambda: hub.server_model(BOB) is None, 60, what="bob's spawn to fail")
        else:
            assert r.status_code >= 400, (r.status_code, r.text)

    def polled():
        return total(scrape(hub), "ssh_spawner_poll_round_duration_seconds_count", host=host) >= 1

    wait_until(polled, 30, what="a poll round to be counted")
    running = scrape(hub)
    text = hub.session.get(f"{hub.url}/hub/metrics", timeout=10).text
    print("SCRAPE\n" + "\n".join(line for line in text.splitlines() if "ssh_spawner_" in line))
    assert value(running, "ssh_spawner_spawn_duration_seconds_count", host=host, outcome="ok") == 1
    assert value(running, "ssh_spawner_servers_running", host=host) == 1
    assert value(running, "ssh_spawner_ssh_connections", host=host) >= 1
    assert total(running, "ssh_spawner_ssh_connect_attempts_total", host=host) >= 1
    assert total(running, "ssh_spawner_ssh_connect_failures_total", host=host) == 0
    # The cut host: a connection that failed, and a spawn that failed there.
    assert total(running, "ssh_spawner_ssh_connect_failures_total", host=cut) >= 1, [
        k for k in running if "failures" in k[0]
    ]
    failed = [
        (ls, v)
        for (n, ls), v in running.items()
        if n == "ssh_spawner_spawn_duration_seconds_count"
        and ("host", cut) in ls
        and ("outcome", "ok") not in ls
    ]
    assert failed and sum(v for _, v in failed) >= 1, failed
    assert value(running, "ssh_spawner_spawn_duration_seconds_count", host=cut, outcome="ok") == 0

    hub.stop_server(ALICE, "lab")
    stopped = scrape(hub)
    assert value(stopped, "ssh_spawner_servers_running", host=host) == 0
    assert value(stopped, "ssh_spawner_stops_escalated_total", host=host) == 1
    assert value(stopped, "ssh_spawner_host_gpus_held", host=host) == 0
    assert value(stopped, "ssh_spawner_host_gpus", host=host) == 2
    assert value(stopped, "ssh_spawner_ssh_sessions_in_use", host=host) == 0

    # The hub's log: every line of the core names the hub user and server,
    # and the host once one is chosen.
    lines = [line for line in hub.log_text().splitlines() if CORE_LINE.search(line)]
    assert lines, "no log line of the core in the hub's log"
    # A host's health is everyone's: the background probe of a down host
    # names the host, not a user (docs/reliability.md).
    health = [line for line in lines if "[ssh_spawner::ssh::health]" in line]
    assert all("host=" in line for line in health), "\n".join(health)
    unnamed = [line for line in lines if "user=" not in line and line not in health]
    assert not unnamed, "core log lines that name no user:\n" + "\n".join(unnamed)
    alice = [line for line in lines if f"user={ALICE} " in line + " "]
    assert all("server=lab" in line for line in alice), "\n".join(alice)
    chosen = [line for line in alice if f"Host {host} chosen" in line]
    assert chosen and all(f"host={host}" in line for line in chosen), "\n".join(alice)
    started = [line for line in alice if "Starting the server on" in line]
    assert started and all(f"host={host}" in line for line in started), "\n".join(alice)
    bob = [line for line in lines if f"user={BOB} " in line + " "]
    assert bob, "no core line names bob, whose spawn failed"
    assert not any("user=tb-alice" in line for line in bob)

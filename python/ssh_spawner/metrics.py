"""Prometheus metrics of the spawner, on the hub's own ``/hub/metrics``.

The Rust core counts (``_core.metrics_snapshot()``, each core's
``pool_by_host()``); this module turns a snapshot into metric families with
``prometheus_client`` at each scrape, through one collector registered on the
library's default registry, which JupyterHub serves. Every metric is listed in
docs/metrics.md.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable

from prometheus_client import REGISTRY
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)
from prometheus_client.registry import Collector

from . import _core

# Journal entries swept after a hub restart, by outcome (counted here: the
# journal is the Python side's).
JOURNAL_SWEPT: dict[str, int] = {"stopped": 0, "forgotten": 0, "failed": 0}

_REGISTERED: Collector | None = None


def journal_swept(outcome: str, n: int = 1) -> None:
    JOURNAL_SWEPT[outcome] = JOURNAL_SWEPT.get(outcome, 0) + n


def _buckets(h: dict) -> list[tuple[str, float]]:
    out, total = [], 0
    for bound, count in zip(h["bounds"], h["counts"]):
        total += count
        out.append((repr(float(bound)), total))
    out.append(("+Inf", h["count"]))
    return out


class SpawnerCollector(Collector):
    """Reads the core's counters at each scrape."""

    def __init__(self, cores: Callable[[], Iterable[_core.Core]]):
        self._cores = cores

    def collect(self):
        snap = json.loads(_core.metrics_snapshot())
        names = snap["host_names"]

        def host(label: str) -> str:
            return names.get(label, label)

        spawn = HistogramMetricFamily(
            "ssh_spawner_spawn_duration_seconds",
            "Seconds from the start of a spawn attempt until the server process"
            " was started on the host (outcome ok) or the attempt failed (outcome"
            " is the error kind)",
            labels=["host", "outcome"],
        )
        for h, outcome, hist in snap["spawn_duration"]:
            spawn.add_metric([h, outcome], _buckets(hist), hist["sum"])
        yield spawn

        yield _counter(
            "ssh_spawner_ssh_connect_attempts",
            "SSH connections attempted (TCP, key exchange, host key check, authentication)",
            ["host"],
            ((host(label), n) for label, n in snap["ssh_connect_attempts"]),
        )
        yield _counter(
            "ssh_spawner_ssh_connect_failures",
            "SSH connection attempts that failed, by error kind",
            ["host", "kind"],
            ((host(label), kind, n) for label, kind, n in snap["ssh_connect_failures"]),
        )

        conns = GaugeMetricFamily(
            "ssh_spawner_ssh_connections",
            "Pooled SSH connections held open",
            labels=["host"],
        )
        sessions = GaugeMetricFamily(
            "ssh_spawner_ssh_sessions_in_use",
            "SSH sessions (commands, uploads) in use on the pooled connections",
            labels=["host"],
        )
        # Every configured host is listed, at 0 when it has nothing.
        totals: dict[str, list[int]] = {n: [0, 0] for n in names.values()}
        for core in self._cores():
            for h, c, s in core.pool_by_host():
                row = totals.setdefault(host(h), [0, 0])
                row[0] += c
                row[1] += s
        for h, (c, s) in sorted(totals.items()):
            conns.add_metric([h], c)
            sessions.add_metric([h], s)
        yield conns
        yield sessions

        polls = HistogramMetricFamily(
            "ssh_spawner_poll_round_duration_seconds",
            "Seconds one poll round took: one command answering every poll"
            " waiting for that host and user",
            labels=["host"],
        )
        for label, hist in snap["poll_round_duration"]:
            polls.add_metric([host(label)], _buckets(hist), hist["sum"])
        yield polls

        running = GaugeMetricFamily(
            "ssh_spawner_servers_running",
            "Servers this hub process knows running (launched, or found running by a poll)",
            labels=["host"],
        )
        counts = {n: 0 for n in names.values()}
        counts.update(dict(snap["servers_running"]))
        for h, n in sorted(counts.items()):
            running.add_metric([h], n)
        yield running

        # Hosts that do not answer: every spawn skips them until a background
        # probe gets an answer (docs/reliability.md, "A host that does not answer").
        down = {host(label): since for label, since in snap["hosts_down"]}
        held = {host(label): until for label, until in snap["hosts_held"]}
        up = GaugeMetricFamily(
            "ssh_spawner_host_up",
            "1 when new servers may go to the host; 0 while it is marked down"
            " (a connection to it could not be made) or held down after flapping",
            labels=["host"],
        )
        for h in sorted(set(names.values()) | set(down) | set(held)):
            up.add_metric([h], 0 if h in down or h in held else 1)
        yield up
        since = GaugeMetricFamily(
            "ssh_spawner_host_down_since_seconds",
            "Unix time at which a host marked down stopped answering (only hosts down now)",
            labels=["host"],
        )
        for h, t in sorted(down.items()):
            since.add_metric([h], t)
        yield since
        until = GaugeMetricFamily(
            "ssh_spawner_host_held_until_seconds",
            "Unix time until which a host that flapped answers but takes no new servers",
            labels=["host"],
        )
        for h, t in sorted(held.items()):
            until.add_metric([h], t)
        yield until
        yield _counter(
            "ssh_spawner_host_probes",
            "Background probes of hosts marked down (a TCP connection and sshd's"
            " greeting, one at a time per host), by outcome: answered or no_answer",
            ["host", "outcome"],
            ((host(label), outcome, n) for label, outcome, n in snap["host_probes"]),
        )

        yield _counter(
            "ssh_spawner_stops_escalated",
            "Stops that sent SIGKILL because the server outlived SIGTERM by stop_grace",
            ["host"],
            snap["stops_escalated"],
        )
        yield _counter(
            "ssh_spawner_journal_swept",
            "Journal entries of starts in flight handled after a hub restart:"
            " stopped (orphan stopped), forgotten (its server is in the database),"
            " failed (host not answering; kept for the next restart)",
            ["outcome"],
            sorted(JOURNAL_SWEPT.items()),
        )


def _counter(name: str, doc: str, labels: list[str], rows: Iterable) -> CounterMetricFamily:
    """A counter family from rows of (label values..., count)."""
    family = CounterMetricFamily(name, doc, labels=labels)
    for *values, n in rows:
        family.add_metric(list(values), n)
    return family


def register(cores: Callable[[], Iterable[_core.Core]]) -> None:
    """Register the collector on the default registry, once per process."""
    global _REGISTERED
    if _REGISTERED is not None:
        return
    collector = SpawnerCollector(cores)
    try:
        REGISTRY.register(collector)
    except ValueError as e:  # names taken: say so, never break the spawner
        logging.getLogger(__name__).error("SSHSpawner metrics not registered: %s", e)
    _REGISTERED = collector

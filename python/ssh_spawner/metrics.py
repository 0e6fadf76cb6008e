"""Prometheus metrics of the spawner, on the hub's own ``/hub/metrics``.

The Rust core counts and shapes the metric families
(``_core.metric_families``, ``src/metrics/families.rs``); this module hands
them to ``prometheus_client`` at each scrape, through one collector
registered on the library's default registry, which JupyterHub serves.
Every metric is listed in docs/metrics.md.
"""

from __future__ import annotations

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

_KINDS = {
    "counter": CounterMetricFamily,
    "gauge": GaugeMetricFamily,
    "histogram": HistogramMetricFamily,
}
_REGISTERED: Collector | None = None


class SpawnerCollector(Collector):
    """Reads the core's counters, and every core's pool, at each scrape."""

    def __init__(self, cores: Callable[[], Iterable[_core.Core]]):
        self._cores = cores

    def collect(self):
        pool = [row for core in self._cores() for row in core.pool_by_host()]
        for kind, name, doc, labels, samples in _core.metric_families(pool):
            family = _KINDS[kind](name, doc, labels=labels)
            for values, buckets, value in samples:
                # A histogram's value is its sum, after its buckets.
                family.add_metric(values, *([buckets] if kind == "histogram" else []), value)
            yield family


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

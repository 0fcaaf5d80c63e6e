"""A small Prometheus text-format registry, one per daemon (no global registry).

Istio exports its counters without a `_total` suffix (its OpenTelemetry exporter runs with counter
suffixes disabled), so dashboards built for istiod query `citadel_server_csr_count`, not
`citadel_server_csr_count_total`. prometheus_client always appends `_total`; we render names as given.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterable


def _escape(value: str) -> str:
    return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")


def _fmt(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if value == int(value) and abs(value) < 1e15:
        return str(int(value))
    return repr(value)


LabelKey = tuple[tuple[str, str], ...]


class _Metric:
    kind = "untyped"

    def __init__(self, name: str, help: str) -> None:
        self.name = name
        self.help = help
        self._values: dict[LabelKey, float] = {}
        self._lock = threading.Lock()

    def _key(self, labels: dict[str, str]) -> LabelKey:
        return tuple(sorted(labels.items()))

    def value(self, **labels: str) -> float:
        with self._lock:
            return self._values.get(self._key(labels), 0.0)

    def samples(self) -> Iterable[tuple[LabelKey, float]]:
        with self._lock:
            return list(self._values.items())

    def render(self) -> str:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]
        for key, val in self.samples():
            label_text = ",".join(f'{k}="{_escape(v)}"' for k, v in key)
            lines.append(f"{self.name}{{{label_text}}} {_fmt(val)}" if label_text else f"{self.name} {_fmt(val)}")
        return "\n".join(lines)


class Counter(_Metric):
    kind = "counter"

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        if amount < 0:
            raise ValueError("counters only go up")
        key = self._key(labels)
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount

    def render(self) -> str:
        if not self._values:
            with self._lock:
                self._values.setdefault((), 0.0)
        return super().render()


class Gauge(_Metric):
    kind = "gauge"

    def set(self, value: float, **labels: str) -> None:
        with self._lock:
            self._values[self._key(labels)] = float(value)

    def replace(self, samples: Iterable[tuple[dict[str, str], float]]) -> None:
        """Exactly these labelled values from now on: label sets not given (a pod that went away) are dropped."""
        values = {self._key(labels): float(value) for labels, value in samples}
        with self._lock:
            self._values = values


class FunctionGauge(_Metric):
    """A gauge computed at scrape time (e.g. seconds until a certificate expires)."""

    kind = "gauge"

    def __init__(self, name: str, help: str, fn: Callable[[], float | None]) -> None:
        super().__init__(name, help)
        self._fn = fn

    def samples(self) -> Iterable[tuple[LabelKey, float]]:
        value = self._fn()
        return [] if value is None else [((), float(value))]


class Histogram(_Metric):
    kind = "histogram"

    def __init__(self, name: str, help: str, buckets: Iterable[float]) -> None:
        super().__init__(name, help)
        self._bounds = sorted(buckets)
        self._counts = [0] * (len(self._bounds) + 1)
        self._sum = 0.0

    def observe(self, value: float) -> None:
        with self._lock:
            self._sum += value
            for i, bound in enumerate(self._bounds):
                if value <= bound:
                    self._counts[i] += 1
                    break
            else:
                self._counts[-1] += 1

    def render(self) -> str:
        with self._lock:
            counts, total_sum = list(self._counts), self._sum
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        running = 0
        for bound, count in zip([*self._bounds, math.inf], counts, strict=True):
            running += count
            lines.append(f'{self.name}_bucket{{le="{_fmt(bound)}"}} {running}')
        lines.append(f"{self.name}_sum {_fmt(total_sum)}")
        lines.append(f"{self.name}_count {running}")
        return "\n".join(lines)


class Registry:
    """The metrics of one daemon, rendered in Prometheus text format 0.0.4."""

    content_type = "text/plain; version=0.0.4; charset=utf-8"

    def __init__(self) -> None:
        self._metrics: dict[str, _Metric] = {}

    def _add(self, metric: _Metric) -> None:
        if metric.name in self._metrics:
            raise ValueError(f"metric {metric.name} registered twice")
        self._metrics[metric.name] = metric

    def counter(self, name: str, help: str) -> Counter:
        metric = Counter(name, help)
        self._add(metric)
        return metric

    def gauge(self, name: str, help: str) -> Gauge:
        metric = Gauge(name, help)
        self._add(metric)
        return metric

    def function_gauge(self, name: str, help: str, fn: Callable[[], float | None]) -> FunctionGauge:
        metric = FunctionGauge(name, help, fn)
        self._add(metric)
        return metric

    def histogram(self, name: str, help: str, buckets: Iterable[float]) -> Histogram:
        metric = Histogram(name, help, buckets)
        self._add(metric)
        return metric

    def render(self) -> str:
        return "\n".join(m.render() for m in self._metrics.values()) + "\n"

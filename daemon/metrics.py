"""Metrics: a small registry rendered as Prometheus text (format 0.0.4).

No client library: the daemon needs counters, gauges, histograms and
scrape-time collectors, which fit in this module. Plugins get the registry as
``ic.metrics`` and declare their metrics in ``init``::

    pulls = ic.metrics.counter("berth_image_pulls_total", "Image pulls.", ["result"])
    pulls.inc(result="ok")
    seconds = ic.metrics.histogram("berth_image_pull_seconds", "Pull duration.")
    seconds.observe(3.2)

Declaring the same name again with the same definition returns the existing
metric (a plugin may re-register idempotently); any other definition raises
:class:`AlreadyExists`, because two meanings under one name corrupt every
dashboard silently.

Values that already live elsewhere (queue depths, plugin status, process
stats) are not copied into metrics: a *collector* is called at each scrape
and yields :class:`Sample`s. Collectors run on the event loop and must be
cheap and non-blocking. Metric updates are thread-safe (worker threads may
count what they do).

:class:`daemon.metricsserver.MetricsServer` serves it over HTTP.
"""

from __future__ import annotations

import bisect
import contextlib
import itertools
import math
import os
import re
import resource
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import structlog

from daemon.errors import AlreadyExists, InvalidArgument

log = structlog.get_logger("berth.metrics")

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
METRICS_PATH = "/v1/metrics"

#: Prometheus' default buckets: request latencies from 5 ms to 10 s.
DEFAULT_BUCKETS: tuple[float, ...] = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

_METRIC_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
_SAMPLE_TYPES = ("counter", "gauge", "untyped")


@dataclass(frozen=True)
class Sample:
    """One value a collector reports at scrape time.

    Samples with the same ``name`` form one metric family; its HELP and TYPE
    come from the first of them. ``type`` is "counter", "gauge" or "untyped".
    """

    name: str
    value: float
    labels: Mapping[str, str] = field(default_factory=dict)
    help: str = ""
    type: str = "gauge"


# -- text format -----------------------------------------------------------


def format_value(value: float) -> str:
    """A float as the text format writes it: integers without ".0", +Inf, NaN."""
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if value == int(value) and abs(value) < 1e15:
        return str(int(value))
    return repr(float(value))


def escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def escape_label_value(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _labels_text(pairs: Iterable[tuple[str, str]]) -> str:
    inner = ",".join(f'{k}="{escape_label_value(v)}"' for k, v in pairs)
    return f"{{{inner}}}" if inner else ""


def _header(name: str, help_text: str, type_: str) -> list[str]:
    return [f"# HELP {name} {escape_help(help_text)}", f"# TYPE {name} {type_}"]


# -- metrics ---------------------------------------------------------------


class _Metric:
    """Shared machinery: declared label names, series keyed by label values, a lock."""

    type: ClassVar[str]
    reserved_labels: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, name: str, help: str, labels: Sequence[str]) -> None:  # noqa: A002
        self.name = name
        self.help = help
        self.labelnames = tuple(labels)
        self._lock = threading.Lock()
        self._series: dict[tuple[str, ...], object] = {}
        if not self.labelnames:
            self._series[()] = self._new()

    def definition(self) -> tuple[object, ...]:
        return (self.type, self.help, self.labelnames)

    def _new(self) -> object:
        raise NotImplementedError

    def _key(self, labels: Mapping[str, object]) -> tuple[str, ...]:
        if len(labels) != len(self.labelnames) or set(labels) != set(self.labelnames):
            raise InvalidArgument(
                f'metric "{self.name}": labels {sorted(labels)} do not match '
                f"its labels {list(self.labelnames)}"
            )
        return tuple(str(labels[n]) for n in self.labelnames)

    def remove(self, **labels: object) -> None:
        """Forget one labelled series (e.g. for an object that no longer exists)."""
        key = self._key(labels)
        with self._lock:
            if key:
                self._series.pop(key, None)

    def clear(self) -> None:
        """Forget every labelled series."""
        with self._lock:
            self._series = {(): self._new()} if not self.labelnames else {}

    def render(self) -> list[str]:
        lines = _header(self.name, self.help, self.type)
        with self._lock:
            series = sorted(self._series.items())
            lines.extend(self._render_series(series))
        return lines

    def _render_series(self, series: list[tuple[tuple[str, ...], object]]) -> list[str]:
        return [
            f"{self.name}{_labels_text(zip(self.labelnames, key, strict=True))} {format_value(cell[0])}"
            for key, cell in series
            if isinstance(cell, list)
        ]


class Counter(_Metric):
    """A value that only goes up (restarts reset it; Prometheus handles that)."""

    type = "counter"

    def _new(self) -> list[float]:
        return [0.0]

    def inc(self, amount: float = 1.0, /, **labels: object) -> None:
        if amount < 0:
            raise InvalidArgument(f'metric "{self.name}": counters only go up (inc by {amount})')
        key = self._key(labels)
        with self._lock:
            cell = self._series.setdefault(key, [0.0])
            assert isinstance(cell, list)
            cell[0] += amount

    def value(self, **labels: object) -> float:
        key = self._key(labels)
        with self._lock:
            cell = self._series.get(key)
            return cell[0] if isinstance(cell, list) else 0.0


class Gauge(Counter):
    """A value that goes up and down."""

    type = "gauge"

    def inc(self, amount: float = 1.0, /, **labels: object) -> None:
        key = self._key(labels)
        with self._lock:
            cell = self._series.setdefault(key, [0.0])
            assert isinstance(cell, list)
            cell[0] += amount

    def dec(self, amount: float = 1.0, /, **labels: object) -> None:
        self.inc(-amount, **labels)

    def set(self, value: float, /, **labels: object) -> None:
        key = self._key(labels)
        with self._lock:
            self._series[key] = [float(value)]


@dataclass
class _HistogramCell:
    counts: list[int]  # per bucket, not cumulative; the last bucket is +Inf
    sum: float = 0.0
    count: int = 0


class Histogram(_Metric):
    """Observations counted into cumulative ``le`` buckets, with ``_sum`` and ``_count``."""

    type = "histogram"
    reserved_labels = frozenset({"le"})

    def __init__(self, name: str, help: str, labels: Sequence[str], buckets: Sequence[float]) -> None:  # noqa: A002
        bounds = [float(b) for b in buckets]
        if bounds and math.isinf(bounds[-1]) and bounds[-1] > 0:
            bounds.pop()
        if not bounds:
            raise InvalidArgument(f'metric "{name}": a histogram needs at least one finite bucket')
        if any(math.isnan(b) or math.isinf(b) for b in bounds) or any(
            a >= b for a, b in itertools.pairwise(bounds)
        ):
            raise InvalidArgument(
                f'metric "{name}": buckets must be finite and strictly increasing: {buckets}'
            )
        self.buckets = tuple(bounds)
        super().__init__(name, help, labels)

    def definition(self) -> tuple[object, ...]:
        return (*super().definition(), self.buckets)

    def _new(self) -> _HistogramCell:
        return _HistogramCell(counts=[0] * (len(self.buckets) + 1))

    def observe(self, value: float, /, **labels: object) -> None:
        key = self._key(labels)
        index = bisect.bisect_left(self.buckets, value)  # first bound >= value: "le"
        with self._lock:
            cell = self._series.get(key)
            if not isinstance(cell, _HistogramCell):
                cell = self._series[key] = self._new()
            cell.counts[index] += 1
            cell.sum += value
            cell.count += 1

    def snapshot(self, **labels: object) -> tuple[list[int], float, int]:
        """(cumulative bucket counts incl. +Inf, sum, count) of one series."""
        key = self._key(labels)
        with self._lock:
            cell = self._series.get(key)
            if not isinstance(cell, _HistogramCell):
                cell = self._new()
            return list(_cumulative(cell.counts)), cell.sum, cell.count

    def _render_series(self, series: list[tuple[tuple[str, ...], object]]) -> list[str]:
        lines: list[str] = []
        bounds = [*map(format_value, self.buckets), "+Inf"]
        for key, cell in series:
            assert isinstance(cell, _HistogramCell)
            pairs = list(zip(self.labelnames, key, strict=True))
            for le, n in zip(bounds, _cumulative(cell.counts), strict=True):
                lines.append(f"{self.name}_bucket{_labels_text([*pairs, ('le', le)])} {n}")
            lines.append(f"{self.name}_sum{_labels_text(pairs)} {format_value(cell.sum)}")
            lines.append(f"{self.name}_count{_labels_text(pairs)} {cell.count}")
        return lines


def _cumulative(counts: Iterable[int]) -> Iterable[int]:
    total = 0
    for n in counts:
        total += n
        yield total


# -- registry --------------------------------------------------------------

Collector = Callable[[], Iterable[Sample]]


class MetricsRegistry:
    """The daemon's metrics, rendered on scrape (see the module doc)."""

    def __init__(self) -> None:
        self._metrics: dict[str, _Metric] = {}
        self._collectors: list[Collector] = []
        self._lock = threading.Lock()

    def counter(self, name: str, help: str, labels: Sequence[str] = ()) -> Counter:  # noqa: A002
        metric = self._register(name, Counter(name, help, self._check(name, labels, Counter)))
        assert isinstance(metric, Counter)
        return metric

    def gauge(self, name: str, help: str, labels: Sequence[str] = ()) -> Gauge:  # noqa: A002
        metric = self._register(name, Gauge(name, help, self._check(name, labels, Gauge)))
        assert isinstance(metric, Gauge)
        return metric

    def histogram(
        self,
        name: str,
        help: str,  # noqa: A002 - Prometheus' word
        labels: Sequence[str] = (),
        buckets: Sequence[float] = DEFAULT_BUCKETS,
    ) -> Histogram:
        metric = self._register(name, Histogram(name, help, self._check(name, labels, Histogram), buckets))
        assert isinstance(metric, Histogram)
        return metric

    def _check(self, name: str, labels: Sequence[str], cls: type[_Metric]) -> tuple[str, ...]:
        if isinstance(labels, str):
            raise InvalidArgument(f'metric "{name}": labels must be a sequence of names, not a string')
        if not _METRIC_NAME.fullmatch(name):
            raise InvalidArgument(f'metric "{name}": invalid name (want [a-zA-Z_:][a-zA-Z0-9_:]*)')
        names = tuple(labels)
        for label in names:
            if not _LABEL_NAME.fullmatch(label) or label.startswith("__") or label in cls.reserved_labels:
                raise InvalidArgument(f'metric "{name}": invalid label name "{label}"')
        if len(set(names)) != len(names):
            raise InvalidArgument(f'metric "{name}": duplicate label names {list(names)}')
        return names

    def _register(self, name: str, metric: _Metric) -> _Metric:
        with self._lock:
            existing = self._metrics.get(name)
            if existing is None:
                self._metrics[name] = metric
                return metric
        if existing.definition() != metric.definition():
            raise AlreadyExists(
                f'metric "{name}": already registered as {existing.type} with labels '
                f"{list(existing.labelnames)} and help {existing.help!r}; "
                f"cannot register it as {metric.type} with labels {list(metric.labelnames)} "
                f"and help {metric.help!r}"
            )
        return existing

    def get(self, name: str) -> _Metric | None:
        return self._metrics.get(name)

    def add_collector(self, fn: Collector) -> None:
        """Call ``fn`` at every scrape; its samples are rendered after the registered metrics."""
        with self._lock:
            self._collectors.append(fn)

    def remove_collector(self, fn: Collector) -> None:
        with self._lock:
            if fn in self._collectors:
                self._collectors.remove(fn)

    def render(self) -> str:
        """The whole registry in text format 0.0.4.

        A collector that raises is logged and skipped: one broken plugin must
        not blank every other metric.
        """
        with self._lock:
            metrics = list(self._metrics.values())
            collectors = list(self._collectors)
        lines: list[str] = []
        for metric in metrics:
            lines.extend(metric.render())
        families: dict[str, list[Sample]] = {}
        for fn in collectors:
            try:
                samples = list(fn())
            except Exception:  # reported, the scrape goes on
                log.exception("metrics.collector_failed", collector=getattr(fn, "__qualname__", repr(fn)))
                continue
            for sample in samples:
                families.setdefault(sample.name, []).append(sample)
        for name, samples in families.items():
            lines.extend(self._render_family(name, samples))
        return "\n".join(lines) + "\n"

    def _render_family(self, name: str, samples: list[Sample]) -> list[str]:
        first = samples[0]
        if name in self._metrics or not _METRIC_NAME.fullmatch(name) or first.type not in _SAMPLE_TYPES:
            log.error("metrics.bad_collector_sample", name=name, type=first.type)
            return []
        lines = _header(name, first.help, first.type)
        seen: set[tuple[tuple[str, str], ...]] = set()
        for sample in samples:
            pairs = tuple(sorted((str(k), str(v)) for k, v in sample.labels.items()))
            if pairs in seen or any(not _LABEL_NAME.fullmatch(k) for k, _ in pairs):
                log.error("metrics.bad_collector_sample", name=name, labels=dict(pairs))
                continue
            seen.add(pairs)
            lines.append(f"{name}{_labels_text(pairs)} {format_value(float(sample.value))}")
        return lines


# -- process metrics -------------------------------------------------------


def process_collector() -> Collector:
    """The standard ``process_*`` metrics of this process, read from /proc/self at scrape."""
    page = os.sysconf("SC_PAGE_SIZE")
    ticks = os.sysconf("SC_CLK_TCK")
    start = _start_time(ticks)

    def collect() -> Iterable[Sample]:
        cpu = os.times()
        yield Sample(
            "process_cpu_seconds_total",
            cpu.user + cpu.system,
            help="Total user and system CPU time spent in seconds.",
            type="counter",
        )
        fields = _proc_stat()
        if fields:
            yield Sample(
                "process_resident_memory_bytes",
                float(int(fields[21]) * page),
                help="Resident memory size in bytes.",
            )
            yield Sample(
                "process_virtual_memory_bytes", float(fields[20]), help="Virtual memory size in bytes."
            )
            yield Sample("process_threads", float(fields[17]), help="Number of OS threads in the process.")
        with contextlib.suppress(OSError):
            fds = len(os.listdir("/proc/self/fd"))
            yield Sample("process_open_fds", float(fds), help="Number of open file descriptors.")
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft != resource.RLIM_INFINITY:
            yield Sample("process_max_fds", float(soft), help="Maximum number of open file descriptors.")
        yield Sample(
            "process_start_time_seconds",
            start,
            help="Start time of the process since unix epoch in seconds.",
        )

    return collect


def _proc_stat() -> list[str]:
    """/proc/self/stat fields from field 3 (state) on; the command name may hold spaces."""
    try:
        text = Path("/proc/self/stat").read_text()
    except OSError:
        return []
    return text.rpartition(")")[2].split()


def _start_time(ticks: int) -> float:
    fields = _proc_stat()
    try:
        for line in Path("/proc/stat").read_text().splitlines():
            if line.startswith("btime "):
                return int(line.split()[1]) + int(fields[19]) / ticks
    except (OSError, IndexError, ValueError):
        pass
    return time.time()

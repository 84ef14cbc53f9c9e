"""Metrics: registry semantics, text format 0.0.4 (parsed back), process metrics."""

from __future__ import annotations

import math
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import pytest

from daemon.errors import AlreadyExists, InvalidArgument
from daemon.metrics import (
    DEFAULT_BUCKETS,
    MetricsRegistry,
    Sample,
    format_value,
    process_collector,
)

# -- a small parser of the text format, independent of the renderer -----------

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\\n]|\\[\\"n])*)"(,|$)')


def _unescape(text: str) -> str:
    return re.sub(r"\\(.)", lambda m: {"n": "\n", "\\": "\\", '"': '"'}[m.group(1)], text)


def _parse_labels(text: str) -> dict[str, str]:
    labels: dict[str, str] = {}
    pos = 0
    while pos < len(text):
        m = _LABEL.match(text, pos)
        assert m, f"bad label text at {pos}: {text!r}"
        assert m.group(1) not in labels, f"duplicate label {m.group(1)}"
        labels[m.group(1)] = _unescape(m.group(2))
        pos = m.end()
    return labels


def _parse_value(text: str) -> float:
    return {"+Inf": math.inf, "-Inf": -math.inf, "NaN": math.nan}.get(text) or float(text)


@dataclass
class Family:
    help: str = ""
    type: str = ""
    samples: list[tuple[str, dict[str, str], float]] = field(default_factory=list)

    def value(self, name: str, **labels: str) -> float:
        found = [v for n, ls, v in self.samples if n == name and ls == labels]
        assert len(found) == 1, f"{name}{labels}: {found} in {self.samples}"
        return found[0]


def parse_exposition(text: str) -> dict[str, Family]:
    assert text.endswith("\n")
    families: dict[str, Family] = {}
    current = ""
    seen: set[tuple[str, tuple[tuple[str, str], ...]]] = set()
    for line in text.splitlines():
        if line.startswith("# HELP "):
            name, _, help_text = line[7:].partition(" ")
            assert name not in families, f"family {name} twice"
            families[name] = Family(help=_unescape(help_text))
            current = name
        elif line.startswith("# TYPE "):
            name, _, type_ = line[7:].partition(" ")
            assert name == current and type_ in ("counter", "gauge", "histogram", "untyped")
            families[name].type = type_
        else:
            m = _SAMPLE.match(line)
            assert m, f"bad sample line {line!r}"
            name, labels = m.group(1), _parse_labels(m.group(2) or "")
            suffixes = ("_bucket", "_sum", "_count") if families[current].type == "histogram" else ("",)
            assert name in {current + s for s in suffixes}, f"{name} outside its family {current}"
            key = (name, tuple(sorted(labels.items())))
            assert key not in seen, f"duplicate series {key}"
            seen.add(key)
            families[current].samples.append((name, labels, _parse_value(m.group(3))))
    return families


# -- registry ----------------------------------------------------------------


def test_counter_and_gauge_render_and_parse_back() -> None:
    reg = MetricsRegistry()
    pulls = reg.counter("berth_pulls_total", "Image pulls.", ["result", "registry"])
    pulls.inc(result="ok", registry="docker.io")
    pulls.inc(2.5, result="ok", registry="docker.io")
    pulls.inc(result="error", registry="ghcr.io")
    plain = reg.counter("berth_plain_total", "No labels.")
    up = reg.gauge("berth_up", "Up.", ["plugin"])
    up.set(1, plugin="a")
    up.set(5, plugin="b")
    up.dec(plugin="b")
    up.inc(0.5, plugin="b")

    fams = parse_exposition(reg.render())
    assert fams["berth_pulls_total"].type == "counter"
    assert fams["berth_pulls_total"].help == "Image pulls."
    assert fams["berth_pulls_total"].value("berth_pulls_total", result="ok", registry="docker.io") == 3.5
    assert fams["berth_pulls_total"].value("berth_pulls_total", result="error", registry="ghcr.io") == 1
    assert fams["berth_plain_total"].value("berth_plain_total") == 0  # unlabelled: present from the start
    assert fams["berth_up"].type == "gauge"
    assert fams["berth_up"].value("berth_up", plugin="a") == 1
    assert fams["berth_up"].value("berth_up", plugin="b") == 4.5
    assert pulls.value(result="ok", registry="docker.io") == 3.5
    assert plain.value() == 0


def test_label_values_and_help_are_escaped() -> None:
    reg = MetricsRegistry()
    nasty = 'a "quoted" \\ back\nslash, {x="y"}'
    reg.counter("berth_x_total", 'Help with \\ and\nnewline and "quotes".', ["v"]).inc(v=nasty)
    text = reg.render()
    assert '\\"quoted\\"' in text and "\\n" in text
    fams = parse_exposition(text)
    assert fams["berth_x_total"].help == 'Help with \\ and\nnewline and "quotes".'
    assert fams["berth_x_total"].value("berth_x_total", v=nasty) == 1


def test_histogram_buckets_are_cumulative_with_inf_sum_and_count() -> None:
    reg = MetricsRegistry()
    h = reg.histogram("berth_op_seconds", "Op time.", ["op"], buckets=[0.1, 1, 10])
    for v in (0.05, 0.1, 0.5, 2, 20, 30):
        h.observe(v, op="pull")
    h.observe(0.2, op="push")
    fams = parse_exposition(reg.render())
    fam = fams["berth_op_seconds"]
    assert fam.type == "histogram"
    buckets = {
        ls["le"]: v for n, ls, v in fam.samples if n == "berth_op_seconds_bucket" and ls["op"] == "pull"
    }
    assert buckets == {"0.1": 2, "1": 3, "10": 4, "+Inf": 6}  # le is inclusive: 0.1 falls in 0.1
    assert fam.value("berth_op_seconds_sum", op="pull") == pytest.approx(52.65)
    assert fam.value("berth_op_seconds_count", op="pull") == 6
    assert fam.value("berth_op_seconds_bucket", op="push", le="+Inf") == 1
    cumulative, total, count = h.snapshot(op="pull")
    assert (cumulative, count) == ([2, 3, 4, 6], 6) and total == pytest.approx(52.65)
    order = [ls["le"] for n, ls, _ in fam.samples if n.endswith("_bucket") and ls["op"] == "pull"]
    assert order == ["0.1", "1", "10", "+Inf"]


def test_histogram_default_buckets_and_unlabelled_zero() -> None:
    reg = MetricsRegistry()
    reg.histogram("berth_t_seconds", "T.")
    fam = parse_exposition(reg.render())["berth_t_seconds"]
    les = [ls["le"] for n, ls, _ in fam.samples if n == "berth_t_seconds_bucket"]
    assert les == [format_value(b) for b in DEFAULT_BUCKETS] + ["+Inf"]
    assert fam.value("berth_t_seconds_count") == 0 and fam.value("berth_t_seconds_sum") == 0


@pytest.mark.parametrize("buckets", [[], [1, 1], [2, 1], [1, math.nan], [math.inf]])
def test_histogram_rejects_bad_buckets(buckets: list[float]) -> None:
    with pytest.raises(InvalidArgument, match="berth_h"):
        MetricsRegistry().histogram("berth_h", "H.", buckets=buckets)


def test_explicit_inf_bucket_is_accepted() -> None:
    h = MetricsRegistry().histogram("berth_h", "H.", buckets=[1, math.inf])
    assert h.buckets == (1.0,)


def test_reregistering_the_same_definition_returns_the_existing_metric() -> None:
    reg = MetricsRegistry()
    a = reg.counter("berth_a_total", "A.", ["x"])
    assert reg.counter("berth_a_total", "A.", ["x"]) is a
    h = reg.histogram("berth_h", "H.", buckets=[1, 2])
    assert reg.histogram("berth_h", "H.", buckets=[1, 2]) is h
    with pytest.raises(AlreadyExists, match=r'"berth_a_total".*counter'):
        reg.gauge("berth_a_total", "A.", ["x"])
    with pytest.raises(AlreadyExists, match="berth_a_total"):
        reg.counter("berth_a_total", "A.", ["y"])
    with pytest.raises(AlreadyExists, match="berth_a_total"):
        reg.counter("berth_a_total", "Another meaning.", ["x"])
    with pytest.raises(AlreadyExists, match="berth_h"):
        reg.histogram("berth_h", "H.", buckets=[1, 3])
    assert reg.render().count("# TYPE berth_a_total") == 1


def test_label_mismatch_and_bad_names_are_invalid() -> None:
    reg = MetricsRegistry()
    c = reg.counter("berth_c_total", "C.", ["a"])
    with pytest.raises(InvalidArgument, match="berth_c_total"):
        c.inc(b="x")
    with pytest.raises(InvalidArgument, match="berth_c_total"):
        c.inc()
    with pytest.raises(InvalidArgument, match="only go up"):
        c.inc(-1, a="x")
    for bad_name in ("1abc", "a-b", ""):
        with pytest.raises(InvalidArgument, match="invalid name"):
            reg.counter(bad_name, "X.")
    for bad_labels in (["__x"], ["a-b"], ["a", "a"]):
        with pytest.raises(InvalidArgument, match="label"):
            reg.gauge("berth_g", "G.", bad_labels)
    with pytest.raises(InvalidArgument, match='"le"'):
        reg.histogram("berth_h", "H.", ["le"])
    with pytest.raises(InvalidArgument, match="not a string"):
        reg.gauge("berth_g", "G.", "plugin")


def test_positional_amount_leaves_any_label_name_free() -> None:
    reg = MetricsRegistry()
    g = reg.gauge("berth_g", "G.", ["value", "amount"])
    g.set(3, value="v", amount="a")
    g.inc(2, value="v", amount="a")
    assert g.value(value="v", amount="a") == 5


def test_remove_and_clear_series() -> None:
    reg = MetricsRegistry()
    g = reg.gauge("berth_g", "G.", ["id"])
    g.set(1, id="a")
    g.set(2, id="b")
    g.remove(id="a")
    fam = parse_exposition(reg.render())["berth_g"]
    assert [ls for _, ls, _ in fam.samples] == [{"id": "b"}]
    g.clear()
    assert parse_exposition(reg.render())["berth_g"].samples == []


def test_format_value() -> None:
    assert [format_value(v) for v in (1.0, 0.25, -3.0, math.inf, -math.inf, 1e20)] == [
        "1",
        "0.25",
        "-3",
        "+Inf",
        "-Inf",
        "1e+20",
    ]
    assert format_value(math.nan) == "NaN"


# -- collectors --------------------------------------------------------------


def test_collectors_are_called_at_each_scrape() -> None:
    reg = MetricsRegistry()
    depth = {"q": 1}

    def collect() -> Iterable[Sample]:
        yield Sample("berth_queue_depth", depth["q"], {"queue": "a"}, help="Depth.", type="gauge")
        yield Sample("berth_queue_depth", 7, {"queue": "b"})
        yield Sample("berth_plugins_total", 3, help="Plugins.", type="counter")

    reg.add_collector(collect)
    fams = parse_exposition(reg.render())
    assert fams["berth_queue_depth"].help == "Depth." and fams["berth_queue_depth"].type == "gauge"
    assert fams["berth_queue_depth"].value("berth_queue_depth", queue="a") == 1
    assert fams["berth_queue_depth"].value("berth_queue_depth", queue="b") == 7
    assert fams["berth_plugins_total"].type == "counter"
    depth["q"] = 42
    assert parse_exposition(reg.render())["berth_queue_depth"].value("berth_queue_depth", queue="a") == 42
    reg.remove_collector(collect)
    assert "berth_queue_depth" not in reg.render()


def test_a_broken_collector_does_not_break_the_scrape() -> None:
    reg = MetricsRegistry()
    reg.counter("berth_ok_total", "Ok.").inc()

    def broken() -> Iterable[Sample]:
        raise RuntimeError("boom")

    def clashing() -> Iterable[Sample]:
        yield Sample("berth_ok_total", 99)  # a registered name: skipped
        yield Sample("berth_dup", 1, {"a": "x"})
        yield Sample("berth_dup", 2, {"a": "x"})  # duplicate series: first wins
        yield Sample("berth_bad_type", 1, type="histogram")  # not a collector type: skipped

    reg.add_collector(broken)
    reg.add_collector(clashing)
    fams = parse_exposition(reg.render())
    assert fams["berth_ok_total"].value("berth_ok_total") == 1
    assert fams["berth_dup"].value("berth_dup", a="x") == 1
    assert "berth_bad_type" not in fams


def test_process_collector() -> None:
    reg = MetricsRegistry()
    reg.add_collector(process_collector())
    fams = parse_exposition(reg.render())
    for name in (
        "process_cpu_seconds_total",
        "process_resident_memory_bytes",
        "process_virtual_memory_bytes",
        "process_open_fds",
        "process_start_time_seconds",
        "process_threads",
    ):
        assert name in fams, name
    assert fams["process_cpu_seconds_total"].type == "counter"
    assert fams["process_cpu_seconds_total"].value("process_cpu_seconds_total") > 0
    assert fams["process_resident_memory_bytes"].value("process_resident_memory_bytes") > 1 << 20
    assert fams["process_open_fds"].value("process_open_fds") >= 3
    assert fams["process_threads"].value("process_threads") >= 1
    start = fams["process_start_time_seconds"].value("process_start_time_seconds")
    assert time.time() - 7 * 86400 < start <= time.time()

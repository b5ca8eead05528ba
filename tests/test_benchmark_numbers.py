"""Benchmark numbers carry their spread: repeats stop by a stated rule, a row whose spread stays
large is flagged noisy, an impossible throughput is reported as an error and never as a number,
and the committed result set says where it comes from. Synthetic timings: fast, no benchmark run."""
import csv
import json
import math
import os
import re
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import measure, report, run  # noqa: E402
from benchmarks.measure import Sampler, Timing, median_interval, stop_reason, throughput  # noqa: E402
from benchmarks.tasks import EAGER, Contender, Shape, Task  # noqa: E402

CPU = torch.device("cpu")


class FakeClock:
    """A clock that fn() advances by the next scripted duration (ms): timings without waiting."""

    def __init__(self, durations_ms):
        self.now, self.durations, self.calls = 0.0, list(durations_ms), 0

    def __call__(self):
        return self.now

    def run(self):
        self.now += self.durations[self.calls % len(self.durations)] / 1e3
        self.calls += 1


def sample(durations_ms, **kw):
    clock = FakeClock(durations_ms)
    sampler = Sampler(clock.run, CPU, warmup=0, clock=clock, **kw)
    return measure.measure_interleaved([sampler])[0]


def test_median_interval_is_the_order_statistics_interval():
    xs = [float(i) for i in range(1, 21)]
    assert median_interval(xs) == (6.0, 15.0)  # n = 20: ranks 6 and 15 (95.9%)
    assert median_interval([3.0, 1.0, 2.0, 5.0, 4.0]) == (1.0, 5.0)  # n < 6: [min, max]
    assert median_interval(list(range(100))) == (39, 60)  # ranks 40 and 61
    assert all(math.isnan(x) for x in median_interval([]))


def test_tight_timings_stop_as_soon_as_the_median_is_pinned_down():
    t = sample([10.0, 10.1, 9.9, 10.05, 9.95], min_repeats=5, target=0.03, time_cap_s=100)
    assert t.n == 5 and t.stop == "converged" and not t.noisy
    assert t.interval == pytest.approx((9.9, 10.1)) and t.min == pytest.approx(9.9) and t.max == pytest.approx(10.1)
    assert t.spread == pytest.approx(0.01)
    fields = t.fields()
    assert fields["ms"] == pytest.approx(10.0) and fields["spread_pct"] == pytest.approx(1.0)
    assert fields["noisy"] is False


def test_a_row_whose_spread_stays_large_is_flagged_noisy():
    # Alternating 10 and 30 ms: the median's interval never narrows to ±3%; the cap ends it.
    t = sample([10.0, 30.0, 10.0, 30.0, 31.0], min_repeats=5, target=0.03, time_cap_s=1.0)
    assert t.stop == "time cap" and t.noisy
    assert t.spread > 0.03 and 1.0 <= sum(t.samples) / 1e3 < 1.1
    row = dict(task="loss", dtype="float32", N=8, V=16, H=0, contender="x", role=EAGER, **t.fields())
    assert row["noisy"] is True and row["stop"] == "time cap"


def test_more_repeats_narrow_the_interval_until_it_converges():
    # One slow outlier in every ten runs: [min, max] is wide at 5 repeats, the median's interval is
    # narrow once there are enough repeats for the outliers to fall outside it.
    durations = [10.0, 10.1, 9.9, 10.0, 50.0, 10.05, 9.95, 10.0, 10.1, 9.9]
    t = sample(durations, min_repeats=5, target=0.03, time_cap_s=100)
    assert t.stop == "converged" and not t.noisy and t.n > 5 and t.max == pytest.approx(50.0)


def test_stop_rule_caps_and_unknown_spread():
    assert stop_reason([1.0] * 4, 0.0, min_repeats=5, max_repeats=10, target=0.03, time_cap_s=1) is None
    wide = [1.0, 2.0] * 5
    assert stop_reason(wide, 0.0, min_repeats=5, max_repeats=10, target=0.03, time_cap_s=1) == "repeat cap"
    assert stop_reason(wide[:6], 2.0, min_repeats=5, max_repeats=10, target=0.03, time_cap_s=1) == "time cap"
    assert stop_reason(wide[:6], 0.0, min_repeats=5, max_repeats=10, target=0.03, time_cap_s=1) is None
    one = Timing([5.0])  # one repeat says nothing of the spread: unknown, so noisy
    assert math.isnan(one.spread) and one.noisy
    assert stop_reason([5.0], 9.0, min_repeats=1, max_repeats=10, target=0.03, time_cap_s=1) == "time cap"


def test_interleaved_samplers_take_turns():
    order = []
    a = Sampler(lambda: order.append("a"), CPU, warmup=0, min_repeats=3, max_repeats=3, time_cap_s=0)
    b = Sampler(lambda: order.append("b"), CPU, warmup=0, min_repeats=3, max_repeats=3, time_cap_s=0)
    measure.measure_interleaved([a, b])
    assert order == ["a", "b"] * 3


def test_throughput_above_the_roofline_or_zero_is_an_error_not_a_number():
    ok = throughput(1e9, 100.0, 20.0, "GBps")  # 10 GB/s against 20
    assert ok == {"GBps": pytest.approx(10.0), "pct_roofline": pytest.approx(50.0)}
    over = throughput(1e9, 100.0, 8.8, "GBps")  # 10 GB/s against 8.8: 113.6%
    assert set(over) == {"measurement_error"} and "113.6% of the roofline" in over["measurement_error"]
    zero = throughput(0.0, 100.0, 0.2, "TFLOPs")
    assert set(zero) == {"measurement_error"} and "0 TFLOP/s" in zero["measurement_error"]
    assert set(throughput(1e12, 0.0, 0.2, "TFLOPs")) == {"measurement_error"}  # a 0 ms timing


@pytest.mark.skipif(not os.path.exists("/proc/stat"), reason="reads /proc/stat (Linux)")
def test_the_cpu_time_of_other_processes_is_measured():
    import subprocess
    import time

    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)
        with measure.OthersCpu() as others:
            time.sleep(1.0)
    finally:
        busy.kill()
        busy.wait()
    assert others.share is not None and 0.3 <= others.share <= 1.0  # one busy process of 2 CPUs: 0.5


def _fake_task(monkeypatch, **cost):
    task = Task("fake", lambda shape, device: {}, lambda device: [], lambda x: torch.tensor(1.0),
                tolerance=lambda s: 1e-6, **cost)
    monkeypatch.setitem(run.TASKS, "fake", task)
    return [Contender("eager", lambda x: torch.tensor(1.0), role=EAGER),
            Contender("ours", lambda x: torch.tensor(1.0))]


@pytest.mark.parametrize("cost, shown", [(dict(bytes_moved=lambda s: 1e15), "GB/s"),
                                         (dict(flops=lambda s: 0.0), "TFLOP/s")])
def test_the_runner_reports_an_impossible_throughput_as_a_measurement_error(monkeypatch, tmp_path, cost, shown):
    contenders = _fake_task(monkeypatch, **cost)
    roof = dict(copy_GBps=10.0, matmul_TFLOPs=0.1, matmul_dtype="float32", device="test", torch="x", mode="quick")
    rows = run.bench_shape(Shape("fake", 8, 16, dtype="float32"), CPU, roof, contenders, memory=False,
                           min_repeats=3, max_repeats=3, time_cap_s=0.0)
    for row in rows:
        assert row["measurement_error"] and "pct_roofline" not in row and "GBps" not in row and "TFLOPs" not in row
        assert row["repeats"] == 3 and row["ms_low"] <= row["ms"] <= row["ms_high"]
    report.write_markdown(rows, roof, [], str(tmp_path / "results.md"))
    text = (tmp_path / "results.md").read_text()
    table = text.split("## fake")[1].split("measurement error:")[0]
    assert "| measurement error | error |" in table and shown not in table
    assert "2 measurement error(s)" in text


def test_the_final_roofline_rejudges_every_row():
    # logprobs, N=1024, V=1000, fp32: 4.096 MB in 1 ms = 4.1 GB/s.
    row = dict(task="logprobs", dtype="float32", N=1024, V=1000, H=0, ms=1.0)
    run.add_throughput(row, dict(copy_GBps=3.0, matmul_TFLOPs=1.0))  # a roofline lowered by a load
    assert "measurement_error" in row and "GBps" not in row
    run.add_throughput(row, dict(copy_GBps=8.192, matmul_TFLOPs=1.0))  # the better one, measured at the end
    assert "measurement_error" not in row and row["pct_roofline"] == pytest.approx(50.0)


def _rows():
    base = dict(task="loss", dtype="float32", N=2048, V=32000, H=0)
    eager = dict(base, contender="eager PyTorch", role=EAGER, note="", GBps=2.3, pct_roofline=7.5, overhead_MiB=500.0,
                 **Timing([100.0, 101.0, 99.0, 100.5, 99.5], 0.03, "converged").fields())
    wide = Timing([40.0, 60.0, 50.0, 41.0, 59.0], 0.03, "time cap")
    ours = dict(base, contender="grpo_kernels[cpp]", role="ours", note="in-place backward", TFLOPs=0.0594,
                pct_roofline=32.9, overhead_MiB=0.0, **wide.fields())
    rows = [eager, ours]
    report.add_ratios(rows)
    return rows


def test_results_carry_the_spread_and_flag_noisy_rows(tmp_path):
    rows = _rows()
    ours = rows[1]
    assert ours["speedup_vs_eager"] == pytest.approx(2.0)
    assert ours["speedup_vs_eager_low"] == pytest.approx(99.0 / 60.0)
    assert ours["speedup_vs_eager_high"] == pytest.approx(101.0 / 40.0)
    report.write_csv(rows, str(tmp_path / "results.csv"))
    with open(tmp_path / "results.csv") as f:
        got = list(csv.DictReader(f))
    assert [r["noisy"] for r in got] == ["False", "True"]
    assert got[1]["ms_min"] == "40.0" and got[1]["ms_max"] == "60.0" and got[1]["stop"] == "time cap"
    assert float(got[1]["spread_pct"]) == pytest.approx(20.0)
    roof = dict(copy_GBps=31.0, matmul_TFLOPs=0.18, matmul_dtype="float32", device="test", torch="x", mode="quick",
                target_spread=0.03, time_cap_s=8.0, min_repeats=5, max_repeats=400,
                provenance=dict(machine="test", date="2026-12-05 05:00 UTC", commit="abc1234", torch="x",
                                python="3", cpus=2, load_before=1.0, load_after=2.0))
    report.write_markdown(rows, roof, [], str(tmp_path / "results.md"))
    text = (tmp_path / "results.md").read_text()
    assert "Measured on test, 2026-12-05 05:00 UTC, commit abc1234" in text
    assert "1 of 2 timed rows ⚠ noisy" in text
    line = next(x for x in text.splitlines() if x.startswith("| grpo_kernels[cpp]"))
    assert "| 50.000 | 40.000–60.000 | 40.000 – 60.000 | 5 | ±20.0% ⚠ noisy |" in line
    assert "0.0594 TFLOP/s" in line and "2.00x (1.65–2.52)" in line  # never "0.1" or "0.0 TFLOP/s"
    eager_line = next(x for x in text.splitlines() if x.startswith("| eager PyTorch"))
    assert "±1.0% |" in eager_line and "noisy" not in eager_line
    assert "`agreement` column of results.csv" in text and "fp64" in text


def test_plots_keep_equal_lines_visible(tmp_path):
    pytest.importorskip("matplotlib")
    styles = report.plot_styles(["a", "b", "c"])
    assert len({s["marker"] for s in styles.values()}) == 3
    assert len({s["linestyle"] for s in styles.values()}) == 3
    assert len({s["offset"] for s in styles.values()}) == 3 and styles["b"]["offset"] == 1.0
    assert styles["a"]["markersize"] > styles["c"]["markersize"]  # the later, smaller marker sits inside
    assert styles["a"]["linewidth"] > styles["c"]["linewidth"]  # and the later, thinner line
    rows = []
    for v in (16000, 32000):
        for name in ("a", "b"):  # equal in time and memory
            rows.append(dict(task="loss", dtype="float32", N=8, V=v, H=0, contender=name, overhead_MiB=0.0,
                             noisy=name == "b", **{k: val for k, val in Timing([1.0, 1.1, 0.9]).fields().items()
                                                   if k != "noisy"}))
    report.write_plots(rows, str(tmp_path))
    assert (tmp_path / "loss_float32_N8.png").stat().st_size > 10_000


def test_help_names_the_reference_as_it_is():
    text = run.__doc__
    assert "fp32 reference" not in text and "fp64" in text
    assert "--target-spread" in text and "noisy" in text


# ---- The committed set and the page rendered from it -------------------------------------------

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")
SETS = sorted(d for d in os.listdir(RESULTS) if os.path.isdir(os.path.join(RESULTS, d)))


def _read(path):
    with open(path) as f:
        return f.read()


@pytest.mark.parametrize("device", SETS)
def test_each_committed_file_says_where_when_and_from_which_commit(device):
    from benchmarks.readme_numbers import header_line

    directory = os.path.join(RESULTS, device)
    with open(os.path.join(directory, "roofline.json")) as f:
        origin = json.load(f)["provenance"]
    names = os.listdir(directory)
    for name in names:
        if name.endswith(".csv"):
            assert name[:-4] + ".md" in names, f"{name} has no .md beside it to say where it comes from"
        if name.endswith(".md"):
            line = header_line(os.path.join(directory, name))
            assert re.search(r"\d{4}-\d{2}-\d{2} \d{2}:\d{2} UTC", line) and re.search(r"commit [0-9a-f]{7,}", line)
            title = _read(os.path.join(directory, name)).split("\n")[0]
            assert origin["machine"] in line or origin["machine"] in title, name
    assert {"machine", "date", "commit", "load_before", "load_after"} <= set(origin)


@pytest.mark.parametrize("device", SETS)
def test_the_committed_quick_set_carries_its_spread_and_no_impossible_number(device):
    directory = os.path.join(RESULTS, device)
    with open(os.path.join(directory, "roofline.json")) as f:
        target = json.load(f)["target_spread"]
    rows = [r for r in report.read_csv(os.path.join(directory, "results.csv")) if "ms" in r]
    assert rows
    for r in rows:
        assert r["ms_min"] <= r["ms_low"] <= r["ms"] <= r["ms_high"] <= r["ms_max"], r["contender"]
        assert r["repeats"] >= 5 and r["stop"] in ("converged", "time cap", "repeat cap")
        assert r["noisy"] == (not r["spread_pct"] <= 100 * target), r["contender"]
        assert r.get("pct_roofline", 0) <= 100 and r.get("GBps", 1) > 0 and r.get("TFLOPs", 1) > 0
    text = _read(os.path.join(directory, "results.md"))
    assert "`agreement` column of results.csv" in text and "fp32 reference" not in text
    assert text.count("⚠ noisy") - 2 == sum(r["noisy"] for r in rows)  # the rule's text names the marker twice


def test_docs_benchmarks_md_equals_the_committed_results():
    from benchmarks.readme_numbers import check

    problem = check(os.path.join(ROOT, "docs", "benchmarks.md"))
    assert problem is None, problem


def test_readme_benchmark_section_equals_the_committed_results_once_it_has_one():
    from benchmarks.readme_numbers import BEGIN, check

    readme = os.path.join(ROOT, "README.md")
    if BEGIN not in _read(readme):
        pytest.skip("README.md has no generated benchmark section: it points to docs/benchmarks.md")
    problem = check(readme)
    assert problem is None, problem


def test_a_page_without_the_section_or_with_other_numbers_fails_with_what_to_run(tmp_path):
    from benchmarks.readme_numbers import BEGIN, END, check, render, write

    page = tmp_path / "page.md"
    page.write_text("# Benchmarks\n\nNo numbers yet.\n")
    problem = check(str(page))
    assert problem and "python -m benchmarks.readme_numbers --write" in problem and BEGIN in problem
    write(str(page))
    assert check(str(page)) is None and page.read_text().startswith("# Benchmarks\n")
    stale = page.read_text().replace(render().split("\n")[-3], "| log-probs | 13.5 ms |")
    page.write_text(stale)
    assert "differ from the committed results" in check(str(page))
    page.write_text(f"before\n{BEGIN}\nold\n{END}\nafter\n")
    write(str(page))
    text = page.read_text()
    assert text.startswith("before\n") and text.endswith(f"{END}\nafter\n") and "old" not in text

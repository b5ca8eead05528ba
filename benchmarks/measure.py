"""How the benchmarks measure: the device's roofline, time, and peak memory.

- Time: warm-up, then the median of repeats that go on until the median is pinned down: the
  distribution-free ~95% interval of the median within ±3% of it, or a time cap per contender
  and shape (8 s on CPU, 2 s on CUDA); a row still wider is flagged noisy. Every row keeps its
  interval, min, max and number of repeats. The contenders of a shape take turns, one repeat
  each per round, so a change of load hits them alike. On CUDA each repeat is timed with CUDA
  events after writing a 256 MiB buffer, so the L2 cache does not hold the inputs from the
  previous repeat. On CPU, wall clock.
- Peak memory above the inputs: on CUDA, max_memory_allocated − memory_allocated before the
  call. On CPU, the process's peak resident set (VmHWM, reset through /proc/self/clear_refs)
  minus the resident set before the call, measured in a fresh subprocess per contender
  (see memprobe.py) so earlier contenders leave nothing behind.
- Roofline: the device-to-device copy bandwidth (bytes read + written per second) and the
  matmul rate (bf16 on CUDA, fp32 on CPU), the best of their repeats, measured before and after
  the shapes (the better of the two counts: a load at either end does not lower it).
  A rate above 100% of it, or not a positive number, is a measurement error and reported as one.
"""
from __future__ import annotations

import functools
import json
import math
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = "cpu"
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "cpu")
    except OSError:
        pass
    return f"{model} ({os.cpu_count()} cores)"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---- Time: repeats until the median is pinned down, and its spread ----------------------------

# The stop rule (docs/benchmarks.md): at least `min_repeats` timed runs, then more until the
# ~95% interval of the median lies within ±target of it ("converged"), or the row has spent
# `time_cap_s` seconds of wall clock ("time cap") or made `max_repeats` runs ("repeat cap"). A
# row whose interval is still wider than ±target when it stops is flagged noisy.
DEFAULT_TARGET = 0.03  # ±3% of the median
DEFAULTS = {"cpu": dict(min_repeats=5, max_repeats=400, time_cap_s=8.0),
            "cuda": dict(min_repeats=20, max_repeats=2000, time_cap_s=2.0)}


@functools.lru_cache(maxsize=None)
def _median_rank(n: int) -> int:
    """The largest j >= 1 with P(Binomial(n, 1/2) <= j - 1) <= 2.5% and j <= n + 1 - j (1 if none)."""
    log_half_n = n * math.log(0.5)
    pmf = lambda k: math.exp(math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1) + log_half_n)  # noqa: E731
    j, tail = 1, pmf(0)  # tail = P(B <= j - 1)
    while 2 * (j + 1) <= n + 1:
        tail += pmf(j)  # now P(B <= j): the tail of rank j + 1
        if tail > 0.025:
            break
        j += 1
    return j


def median_interval(samples: Sequence[float]) -> Tuple[float, float]:
    """Distribution-free ~95% confidence interval of the median: order statistics x_(j), x_(n+1-j).

    j is the largest rank with P(Binomial(n, 1/2) < j) <= 2.5%, at least 1: below 6 samples no
    rank reaches 95% and the interval is [min, max] (93.8% at n = 5). Empty: (nan, nan).
    """
    xs = sorted(samples)
    if not xs:
        return math.nan, math.nan
    j = _median_rank(len(xs))
    return xs[j - 1], xs[len(xs) - j]


@dataclass
class Timing:
    """The timed repeats of one row (milliseconds) and why they stopped."""
    samples: List[float]
    target: float = DEFAULT_TARGET
    stop: str = ""

    @property
    def n(self) -> int:
        return len(self.samples)

    @property
    def median(self) -> float:
        return statistics.median(self.samples) if self.samples else math.nan

    @property
    def min(self) -> float:
        return min(self.samples) if self.samples else math.nan

    @property
    def max(self) -> float:
        return max(self.samples) if self.samples else math.nan

    @property
    def interval(self) -> Tuple[float, float]:
        return median_interval(self.samples)

    @property
    def spread(self) -> float:
        """Half-width of the median's interval relative to the median: the row is median ± spread.

        NaN below 2 samples (no spread can be known from one)."""
        if self.n < 2 or not self.median > 0:
            return math.nan
        lo, hi = self.interval
        return max(self.median - lo, hi - self.median) / self.median

    @property
    def noisy(self) -> bool:
        """The interval is wider than ±target (or unknown) where the repeats stopped."""
        return not self.spread <= self.target

    def fields(self, prefix: str = "ms") -> Dict:
        """The row's columns: median, interval, min, max, repeats, spread (%), noisy, stop."""
        lo, hi = self.interval
        return {prefix: self.median, f"{prefix}_low": lo, f"{prefix}_high": hi, f"{prefix}_min": self.min,
                f"{prefix}_max": self.max, "repeats": self.n, "spread_pct": 100 * self.spread,
                "noisy": self.noisy, "stop": self.stop}


def stop_reason(samples: Sequence[float], spent_s: float, *, min_repeats: int, max_repeats: int,
                target: float, time_cap_s: float) -> Optional[str]:
    """Why a row's repeats stop now, or None to go on (the rule above)."""
    if len(samples) < max(1, min_repeats):
        return None
    if Timing(list(samples), target).spread <= target:
        return "converged"
    if len(samples) >= max_repeats:
        return "repeat cap"
    if spent_s >= time_cap_s:
        return "time cap"
    return None


def cache_flush(device: torch.device) -> Optional[torch.Tensor]:
    """A 256 MiB buffer written before each CUDA repeat, so L2 does not hold the previous inputs."""
    return torch.empty(256 * 1024 * 1024, dtype=torch.int8, device=device) if device.type == "cuda" else None


class Sampler:
    """Times fn() one repeat at a time (`step`), so that the contenders of a shape can take turns.

    `before()` runs ahead of every run, untimed (it puts back inputs an in-place run overwrote).
    `clock` is injectable for tests; on CUDA the repeat is timed with CUDA events instead.
    """

    def __init__(self, fn: Callable[[], object], device: torch.device, *, before: Optional[Callable[[], None]] = None,
                 warmup: int = 1, min_repeats: Optional[int] = None, max_repeats: Optional[int] = None,
                 target: float = DEFAULT_TARGET, time_cap_s: Optional[float] = None,
                 flush: Optional[torch.Tensor] = None, clock: Callable[[], float] = time.perf_counter):
        defaults = DEFAULTS["cuda" if device.type == "cuda" else "cpu"]
        self.fn, self.device, self.before, self.clock = fn, device, before or (lambda: None), clock
        self.min_repeats = defaults["min_repeats"] if min_repeats is None else min_repeats
        self.max_repeats = max(self.min_repeats, defaults["max_repeats"] if max_repeats is None else max_repeats)
        self.time_cap_s = defaults["time_cap_s"] if time_cap_s is None else time_cap_s
        self.target, self.flush, self.warmup = target, flush, warmup
        self.samples: List[float] = []
        self.spent_s = 0.0
        self.stop: Optional[str] = None
        self._warm = False

    def warm_up(self) -> None:
        for _ in range(self.warmup):
            self.before()
            self.fn()
        sync(self.device)
        self._warm = True

    @property
    def done(self) -> bool:
        return self.stop is not None

    def step(self) -> None:
        if not self._warm:
            self.warm_up()
        t0 = self.clock()
        self.before()
        if self.device.type == "cuda":
            if self.flush is None:
                self.flush = cache_flush(self.device)
            self.flush.zero_()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            self.fn()
            end.record()
            end.synchronize()
            self.samples.append(start.elapsed_time(end))
        else:
            t1 = self.clock()
            self.fn()
            self.samples.append((self.clock() - t1) * 1e3)
        self.spent_s += self.clock() - t0
        self.stop = stop_reason(self.samples, self.spent_s, min_repeats=self.min_repeats,
                                max_repeats=self.max_repeats, target=self.target, time_cap_s=self.time_cap_s)

    def timing(self) -> Timing:
        return Timing(list(self.samples), self.target, self.stop or "")


def measure_interleaved(samplers: Sequence[Sampler]) -> List[Timing]:
    """Round-robin over the samplers, one repeat each per round, until every one has stopped:
    a change of load during the shape hits every contender alike, so their ratios stay fair."""
    for s in samplers:
        s.warm_up()
    while not all(s.done for s in samplers):
        for s in samplers:
            if not s.done:
                s.step()
    return [s.timing() for s in samplers]


def measure_checked(runs: Sequence[Tuple[str, Callable[[], object], Callable[[object], float]]],
                    device: torch.device, tolerance: float) -> Tuple[List[Timing], List[float], "OthersCpu"]:
    """Each (label, run, error) checked first (error(run()) <= tolerance, else AssertionError), then
    all timed in interleaved rounds under the stop rule. Returns (timings, errors, the other
    processes' CPU share during the timing)."""
    samplers, errors = [], []
    for label, run, error in runs:
        errors.append(error(run()))
        assert errors[-1] <= tolerance, f"{label} disagrees with its oracle by {errors[-1]:.2e}"
        samplers.append(Sampler(run, device, warmup=1))
    others = OthersCpu()
    with others:
        timings = measure_interleaved(samplers)
    return timings, errors, others


def measure(fn: Callable[[], object], device: torch.device, **kw) -> Timing:
    """Repeats of fn() under the stop rule (Sampler's keywords), as a Timing."""
    return measure_interleaved([Sampler(fn, device, **kw)])[0]


def time_ms(fn: Callable[[], object], device: torch.device, *, warmup: int = 3, repeats: int = 20,
            before: Optional[Callable[[], None]] = None) -> float:
    """Median milliseconds of exactly `repeats` runs of fn(); `before()` runs ahead of each, untimed."""
    return fixed_repeats(fn, device, warmup=warmup, repeats=repeats, before=before).median


def fixed_repeats(fn: Callable[[], object], device: torch.device, *, warmup: int = 3, repeats: int = 20,
                  before: Optional[Callable[[], None]] = None) -> Timing:
    """Exactly `repeats` timed runs (no stop rule), with their spread."""
    sampler = Sampler(fn, device, before=before, warmup=warmup, min_repeats=repeats, max_repeats=repeats,
                      target=math.inf, time_cap_s=0.0)
    timing = measure_interleaved([sampler])[0]
    timing.target, timing.stop = DEFAULT_TARGET, "fixed"
    return timing


class OthersCpu:
    """The share of the machine's CPU time that other processes used while the block ran (Linux;
    None elsewhere): on a shared machine, the interference behind a noisy or slow row.

    From /proc/stat (busy time of all CPUs) minus this process's own time and its waited
    children's (/proc/self/stat), over all CPUs' time, idle included.
    """

    share: Optional[float] = None

    @staticmethod
    def _machine():
        with open("/proc/stat") as f:
            ticks = [int(x) for x in f.readline().split()[1:9]]  # user nice system idle iowait irq softirq steal
        return sum(ticks) - ticks[3] - ticks[4], sum(ticks)

    @staticmethod
    def _own():
        with open("/proc/self/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return sum(int(x) for x in fields[11:15])  # utime stime cutime cstime

    def __enter__(self):
        try:
            self._start = (*self._machine(), self._own())
        except (OSError, ValueError, IndexError):
            self._start = None
        return self

    def __exit__(self, *exc):
        if self._start is None:
            return False
        try:
            busy, total, own = (*self._machine(), self._own())
        except (OSError, ValueError, IndexError):
            return False
        span = total - self._start[1]
        if span > 0:
            self.share = min(1.0, max(0.0, (busy - self._start[0] - (own - self._start[2])) / span))
        return False


# ---- Throughput against the roofline ------------------------------------------------------------

def throughput(amount: float, ms: float, peak: float, unit: str) -> Dict:
    """Achieved rate (`unit` 'GBps': amount in bytes; 'TFLOPs': amount in FLOPs) and its % of the
    measured peak, or {'measurement_error': why} where the numbers cannot be right: a rate that
    is not a positive finite number, or above 100% of the roofline (the roofline or the time was
    measured wrong, e.g. under a passing load), is an error and not a result."""
    scale = {"GBps": 1e9, "TFLOPs": 1e12}[unit]
    label = {"GBps": "GB/s", "TFLOPs": "TFLOP/s"}[unit]
    rate = amount / (ms * 1e-3) / scale if ms > 0 else math.inf
    if not (math.isfinite(rate) and rate > 0):
        return {"measurement_error": f"{rate:g} {label} from {amount:g} in {ms:g} ms: not a rate; not reported"}
    pct = 100 * rate / peak
    if not pct <= 100:
        return {"measurement_error": f"{pct:.1f}% of the roofline ({rate:.3g} {label} against a measured "
                                     f"{peak:.3g}): impossible, the roofline or this time is wrong; not reported"}
    return {unit: rate, "pct_roofline": pct}


def cuda_peak_extra_bytes(fn: Callable[[], object], device: torch.device) -> int:
    """Peak bytes allocated during fn() above what was allocated before it (results freed after)."""
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    result = fn()
    sync(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    del result
    return peak


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def cpu_peak_extra_bytes_in_process(fn: Callable[[], object]) -> int:
    """Peak resident bytes during fn() above the resident set before it (Linux only)."""
    import gc

    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current resident set
    base = _status_kib("VmRSS")
    result = fn()
    peak = _status_kib("VmHWM")
    del result
    return (peak - base) * 1024


def cpu_peak_extra_bytes(spec: Dict) -> int:
    """Run one contender in a fresh interpreter (benchmarks.memprobe) and return its peak extra bytes."""
    # A fixed mmap threshold makes glibc return every freed large block to the OS, so the
    # resident-set peak measures the program's allocations rather than malloc's caching.
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", MALLOC_TRIM_THRESHOLD_="131072")
    out = subprocess.run([sys.executable, "-m", "benchmarks.memprobe", json.dumps(spec)], capture_output=True,
                         text=True, check=False, env=env,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if out.returncode != 0:
        raise RuntimeError(f"memprobe failed for {spec}: {out.stderr[-2000:]}")
    return int(json.loads(out.stdout.strip().splitlines()[-1])["peak_extra_bytes"])


def roofline(device: torch.device) -> Dict[str, float]:
    """Measured copy bandwidth (GB/s) and matmul rate (TFLOP/s) of this device: the best of the
    repeats (the fastest run), since a roofline is the most the device did, and a passing load
    should not lower it (a lowered roofline shows up as % roofline above 100)."""
    cuda = device.type == "cuda"
    size = (1 << 30) if cuda else (256 << 20)
    src = torch.empty(size, dtype=torch.uint8, device=device).random_()
    dst = torch.empty_like(src)
    copy = fixed_repeats(lambda: dst.copy_(src), device, warmup=3, repeats=20 if cuda else 10)
    src = dst = None  # free the buffers before the matmul
    n, dtype = (8192, torch.bfloat16) if cuda else (2048, torch.float32)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    mm = fixed_repeats(lambda: a @ b, device, warmup=3, repeats=20 if cuda else 6)
    return {"copy_GBps": 2 * size / (copy.min * 1e-3) / 1e9, "matmul_TFLOPs": 2 * n ** 3 / (mm.min * 1e-3) / 1e12,
            "matmul_dtype": str(dtype).replace("torch.", ""),
            "copy_GBps_median": 2 * size / (copy.median * 1e-3) / 1e9,
            "matmul_TFLOPs_median": 2 * n ** 3 / (mm.median * 1e-3) / 1e12}

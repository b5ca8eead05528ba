"""How the benchmarks measure: the device's roofline, time, and peak memory.

- Time: warm-up, then the median of many repeats. On CUDA each repeat is timed with CUDA
  events after writing a 256 MiB buffer, so the L2 cache does not hold the inputs from the
  previous repeat. On CPU, wall clock.
- Peak memory above the inputs: on CUDA, max_memory_allocated − memory_allocated before the
  call. On CPU, the process's peak resident set (VmHWM, reset through /proc/self/clear_refs)
  minus the resident set before the call, measured in a fresh subprocess per contender
  (see memprobe.py) so earlier contenders leave nothing behind.
- Roofline: the device-to-device copy bandwidth (bytes read + written per second) and the
  matmul rate (bf16 on CUDA, fp32 on CPU), measured once per run.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from typing import Callable, Dict, Optional

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


def time_ms(fn: Callable[[], object], device: torch.device, *, warmup: int = 3, repeats: int = 20,
            before: Optional[Callable[[], None]] = None) -> float:
    """Median milliseconds of fn() over `repeats` runs; `before()` runs ahead of each, untimed."""
    before = before or (lambda: None)
    for _ in range(warmup):
        before()
        fn()
    sync(device)
    samples = []
    if device.type == "cuda":
        flush = torch.empty(256 * 1024 * 1024, dtype=torch.int8, device=device)
        for _ in range(repeats):
            before()
            flush.zero_()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end))
    else:
        for _ in range(repeats):
            before()
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples)


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
    """Measured copy bandwidth (GB/s) and matmul rate (TFLOP/s) of this device."""
    size = (1 << 30) if device.type == "cuda" else (256 << 20)
    src = torch.empty(size, dtype=torch.uint8, device=device).random_()
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device, warmup=3, repeats=20 if device.type == "cuda" else 5)
    copy_gbs = 2 * size / (ms * 1e-3) / 1e9
    src = dst = None  # free the buffers before the matmul
    if device.type == "cuda":
        n, dtype = 8192, torch.bfloat16
    else:
        n, dtype = 2048, torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    ms = time_ms(lambda: a @ b, device, warmup=3, repeats=20 if device.type == "cuda" else 3)
    return {"copy_GBps": copy_gbs, "matmul_TFLOPs": 2 * n ** 3 / (ms * 1e-3) / 1e12,
            "matmul_dtype": str(dtype).replace("torch.", "")}

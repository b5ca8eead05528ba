"""Every kernel variant our dispatch launches, compiled for Hopper (sm_90) without a GPU, and its resources.

    python -m benchmarks.kernel_resources --write    # compile, check, write benchmarks/results/kernels_sm90.{csv,md}
    python -m benchmarks.kernel_resources --check    # compile, check, compare with the committed csv (the CI test)

Triton: the variants are not listed by hand. `record_variants` runs the real launch wrappers (the
public API over tests/cases.py's option cases, every logit dtype, both vocabulary alignments, each
objective BLOCK_T bucket, every advantage mode) on small CPU tensors under TRITON_INTERPRET=1, with
a hook on every kernel launch that notes the kernel, its argument types, Triton's 16-divisibility
specialisation of each argument, its constexpr values and num_warps. A kernel or constexpr added
later is therefore picked up with no change here. Each distinct variant is then compiled by
`triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32))`, and its cubin read with the
cuobjdump that triton ships: registers, stack frame (spills: triton kernels have no local
arrays, so any stack is spilled registers), shared memory, and the widths of its global loads.

CUDA: csrc/cuda/*.cu compiled with nvcc -arch=sm_90 and read the same way (skipped without nvcc).

Recording needs the interpreter and compiling needs real @triton.jit functions, and triton decides
which at import, so the recording runs in a child process with TRITON_INTERPRET=1 and the
compiles in a process without it (`main` re-executes itself without it when needed).
"""
from __future__ import annotations

import argparse
import csv
import functools
import glob
import hashlib
import importlib
import inspect
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")
CSV_PATH = os.path.join(RESULTS, "kernels_sm90.csv")
MD_PATH = os.path.join(RESULTS, "kernels_sm90.md")
VERSIONS_PATH = os.path.join(RESULTS, "kernels_triton_versions.csv")  # one summary row per triton version
VERSION_COLUMNS = ("triton", "torch", "python", "ptxas", "archs", "variants", "compiled", "compile_errors",
                   "spilling", "spills", "max_registers", "seconds")
TRITON_PACKAGE = "grpo_kernels.ops.triton"
COLUMNS = ("source", "kernel", "variant", "arch", "num_warps", "registers", "spills", "shared_bytes",
           "max_blocks_per_sm", "logits_128bit_loads", "compiler")

# Hopper (sm_90) per SM: 64K 32-bit registers allocated per warp in units of 256, 228 KiB of shared
# memory of which 1 KiB per resident block is reserved by the system, 2048 threads, 32 blocks; at
# most 227 KiB of shared memory per block. Blackwell (sm_100) has the same limits.
REGS_PER_SM = 65536
REG_ALLOC_UNIT = 256
SMEM_PER_SM = 228 * 1024
SMEM_RESERVED_PER_BLOCK = 1024
SMEM_PER_BLOCK_MAX = 227 * 1024
THREADS_PER_SM = 2048
BLOCKS_PER_SM = 32


# ----------------------------------------------------------------------------------------------
# Recording: which variants the dispatch launches (runs under TRITON_INTERPRET=1)
# ----------------------------------------------------------------------------------------------

def _is_constexpr(param: inspect.Parameter) -> bool:
    # `from __future__ import annotations` leaves the annotation as the string "tl.constexpr".
    return param.annotation is not inspect.Parameter.empty and "constexpr" in str(param.annotation)


_TORCH_TYPES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "float64": "fp64", "int64": "i64",
                "int32": "i32", "int16": "i16", "int8": "i8", "uint8": "u8", "bool": "i1"}


def _arg_type(value, specialise: bool = True):
    """(triton type, divisible by 16) of a runtime argument, as triton's launcher specialises it: a
    pointer to the tensor's element type (aligned when its address is a multiple of 16 bytes), an
    integer as i32 or i64 (a multiple of 16 is specialised; the value 1 becomes a constant; neither
    for an argument the kernel names in do_not_specialize), fp32."""
    import torch

    if isinstance(value, torch.Tensor):
        return "*" + _TORCH_TYPES[str(value.dtype).replace("torch.", "")], specialise and value.data_ptr() % 16 == 0
    if isinstance(value, bool):
        return "i1", False
    if isinstance(value, int):
        if value == 1 and specialise:
            return "constexpr", False
        return ("i32" if -2 ** 31 <= value < 2 ** 31 else "i64"), specialise and value % 16 == 0
    if isinstance(value, float):
        return "fp32", False
    raise TypeError(f"unrecorded kernel argument type {type(value).__name__}")


def _plain(value):
    """A constexpr value as JSON keeps it (an IntEnum option code as its int)."""
    if isinstance(value, bool) or value is None or isinstance(value, (float, str)):
        return value
    return int(value)


def variant_of(fn, args, kwargs, unspecialised=()) -> dict:
    """The compile-relevant description of one launch of the kernel whose Python function is `fn`
    (unspecialised: the argument names of its do_not_specialize)."""
    kwargs = dict(kwargs)
    launch = {key: kwargs.pop(key) for key in ("num_warps", "num_stages", "num_ctas") if key in kwargs}
    bound = inspect.signature(fn).bind(*args, **kwargs)
    bound.apply_defaults()
    signature, constexprs, aligned = {}, {}, []
    for name, param in inspect.signature(fn).parameters.items():
        value = bound.arguments[name]
        if _is_constexpr(param):
            signature[name], constexprs[name] = "constexpr", _plain(value)
            continue
        kind, divisible = _arg_type(value, name not in unspecialised)
        signature[name] = kind
        if kind == "constexpr":
            constexprs[name] = 1
        if divisible:
            aligned.append(name)
    return dict(kernel=f"{fn.__module__}:{fn.__name__}", signature=signature, constexprs=constexprs,
                aligned=aligned, num_warps=int(launch.get("num_warps", 4)), num_stages=launch.get("num_stages"))


def variant_key(v: dict) -> str:
    return json.dumps([v["kernel"], v["signature"], v["constexprs"], v["aligned"], v["num_warps"], v["num_stages"]],
                      sort_keys=True)


class LaunchRecorder:
    """Notes every launch of a @triton.jit kernel of grpo_kernels.ops.triton, without running it.

    The outputs of a launch are left as the wrapper allocated them: the workload runs with
    validate=False, which reads no value on the host, so only the launch arguments matter (and the
    interpreter's ~0.1 s per call would make the full cross product take minutes)."""

    def __init__(self):
        self.variants = {}

    def __enter__(self):
        from triton.runtime.interpreter import InterpretedFunction

        # `kernel[grid](*args)` goes through __getitem__ in every triton from 3.2 on (3.2 has no run method).
        self._cls, self._own = InterpretedFunction, InterpretedFunction.__dict__.get("__getitem__")
        recorder, original = self, InterpretedFunction.__getitem__

        def getitem(kernel, grid):
            if not kernel.fn.__module__.startswith(TRITON_PACKAGE):
                return original(kernel, grid)

            # the jit decorator's options, kept by the interpreter's rewriter in every triton from 3.2 on
            names = list(inspect.signature(kernel.fn).parameters)
            unspecialised = {names[p] if isinstance(p, int) else p
                             for p in kernel.rewriter.kwargs.get("do_not_specialize") or ()}

            def launch(*args, **kwargs):
                variant = variant_of(kernel.fn, args, kwargs, unspecialised)
                recorder.variants.setdefault(variant_key(variant), variant)

            return launch

        InterpretedFunction.__getitem__ = getitem
        return self

    def __exit__(self, *exc):
        if self._own is None:
            del self._cls.__getitem__
        else:
            self._cls.__getitem__ = self._own
        return False


# Vocabulary sizes: a multiple of 16 (most models: 32000, 128256, 151936), where triton can load
# logits 16 bytes at a time, and one that is not (50257); both past 4096, the kernels' largest
# BLOCK_V, as every real vocabulary is; and the tests' toy vocabulary.
ALIGNED_VOCAB, ODD_VOCAB, TOY_VOCAB = 4160, 4103, 37
LOGIT_DTYPES = ("float32", "bfloat16", "float16")


def _objective_lengths():
    """Sequence lengths whose pass reaches each of the objective's BLOCK_T buckets."""
    from grpo_kernels.ops.triton.objective import BLOCK_T_BUCKETS

    return [max(2, b // 2 + 1) for b in BLOCK_T_BUCKETS]


def exercise_dispatch():
    """Run every launch path of the triton backend once per option combination, on small CPU tensors."""
    import torch

    import grpo_kernels as gk
    from grpo_kernels.ops.dispatch import backend_module
    from grpo_kernels.options import AdvantageMode

    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from cases import OPTION_IDS, make_case

    triton_ops = backend_module("triton")
    for option in OPTION_IDS:
        for dtype in LOGIT_DTYPES:  # log-prob kernels: every logit dtype with every option's flags
            case = make_case(option, b=2, t=2, v=ALIGNED_VOCAB, dtype=getattr(torch, dtype))
            logits = case.logits.clone().requires_grad_(True)
            out = gk.grpo_loss(logits, case.ids, case.advantages, backend="triton", validate=False, **case.kwargs())
            out.loss.backward()
        for length in _objective_lengths():  # the objective at each BLOCK_T bucket
            case = make_case(option, b=2, t=length, v=2)  # only its options and inputs
            logps = torch.randn(2, length).clamp(max=-0.01).requires_grad_(True)
            entropy = torch.rand(2, length).requires_grad_(True)
            kw = case.kwargs()
            kw["old_logps"] = (logps.detach() + 0.1 * torch.randn(2, length))
            for name in ("ref_logps", "sampling_logps"):
                if kw[name] is not None:
                    kw[name] = logps.detach() + 0.1 * torch.randn(2, length)
            out = gk.grpo_loss_from_logprobs(logps, case.advantages, entropy=entropy, backend="triton",
                                              validate=False, **kw)
            out.loss.backward()
    for dtype in LOGIT_DTYPES:  # log-probs alone: without entropy, with a softcap, odd and toy vocabularies
        for vocab in (ALIGNED_VOCAB, ODD_VOCAB, TOY_VOCAB):
            for entropy in (False, True):
                for softcap in (None, 3.0):
                    for inplace in (False, True):
                        logits = torch.randn(2, 3, vocab, dtype=getattr(torch, dtype)).requires_grad_(True)
                        ids = torch.randint(0, vocab, (2, 3))
                        out = gk.selective_logprobs(logits.clone() if inplace else logits, ids,
                                                    final_logit_softcapping=softcap, return_entropy=entropy,
                                                    backend="triton", inplace_backward=inplace,
                                                    validate=False)
                        logp = out[0] if entropy else out
                        loss = logp.sum() + (out[1].sum() if entropy else 0)
                        if not inplace:
                            loss.backward()
    from grpo_kernels.transform import KernelTransform
    from grpo_kernels.truncation import Truncation

    # truncated sampling: every combination of the three settings (the search's constexpr flags),
    # with and without entropy, Σπ² and a softcap, and the given-threshold mode of the
    # vocabulary-parallel path (one process here: the backend op with threshold= given)
    settings = [Truncation(k, p, m) for k in (0, 5) for p in (1.0, 0.8) for m in (0.0, 0.05)][1:]  # all but 'off'
    for dtype in LOGIT_DTYPES:
        logits = torch.randn(2, 3, ALIGNED_VOCAB, dtype=getattr(torch, dtype))
        ids = torch.randint(0, ALIGNED_VOCAB, (6,))
        for softcap in (0.0, 3.0):
            transform = KernelTransform(1.0 / 3.0 if softcap else 1.0, softcap)
            for entropy in (False, True):
                for sum_pi_sq in (False, True):
                    for truncation in settings:
                        out = triton_ops.logprobs_forward(logits, ids, transform, entropy, truncation=truncation,
                                                          with_sum_pi_sq=sum_pi_sq)
                    triton_ops.logprobs_forward(logits, ids, transform, entropy, threshold=out[3],
                                                with_sum_pi_sq=sum_pi_sq)
            out = triton_ops.logprobs_forward(logits, ids, transform, True, truncation=settings[-1])
            grad = torch.ones(6)
            triton_ops.logprobs_backward(logits, ids, out[2], out[1], grad, grad, transform,
                                         torch.empty_like(logits), threshold=out[3])
    for dtype in LOGIT_DTYPES:  # fused linear: logits made a chunk at a time from hidden states
        hidden = torch.randn(2, 3, 16, dtype=getattr(torch, dtype)).requires_grad_(True)
        weight = torch.randn(ALIGNED_VOCAB, 16, dtype=getattr(torch, dtype)).requires_grad_(True)
        ids = torch.randint(0, ALIGNED_VOCAB, (2, 3))
        for entropy in (False, True):
            out = gk.fused_linear_selective_logprobs(hidden, weight, ids, return_entropy=entropy, backend="triton",
                                                     validate=False)
            (out[0].sum() + out[1].sum() if entropy else out.sum()).backward()
        for option in OPTION_IDS:
            case = make_case(option, b=2, t=3, v=2)  # its options and per-token inputs
            kw = case.kwargs()
            out = gk.fused_linear_grpo_loss(hidden, weight, ids, case.advantages, backend="triton", validate=False,
                                            **kw)
            out.loss.backward()
    rewards = torch.randn(8)
    for mode in AdvantageMode:
        for group_size in (4, None):
            triton_ops.group_advantages(rewards, torch.arange(8) // 4, 2, mode.public, 1e-4, group_size)


def record_variants() -> list:
    """The distinct kernel variants exercise_dispatch launches, sorted (run under TRITON_INTERPRET=1)."""
    with LaunchRecorder() as recorder:
        exercise_dispatch()
    return sorted(recorder.variants.values(), key=variant_key)


def recorded_variants() -> list:
    """record_variants() in a child process with TRITON_INTERPRET=1 (this one may import real kernels)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "variants.json")
        env = dict(os.environ, TRITON_INTERPRET="1")
        subprocess.run([sys.executable, "-m", "benchmarks.kernel_resources", "--record", path], cwd=ROOT, env=env,
                       check=True)
        with open(path) as f:
            return json.load(f)


# ----------------------------------------------------------------------------------------------
# Compiling: each variant for sm_90 / sm_100, read back from the cubin (runs without the interpreter)
# ----------------------------------------------------------------------------------------------

def _triton_tool(name: str) -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def bundled_archs() -> list:
    """sm_90, and sm_100 where the ptxas that triton ships knows it."""
    archs = [90]
    ptxas = _triton_tool("ptxas-blackwell")
    if not os.path.exists(ptxas):
        ptxas = _triton_tool("ptxas")
    try:
        help_text = subprocess.run([ptxas, "--help"], capture_output=True, text=True).stdout
    except OSError:
        return archs
    return archs + ([100] if "sm_100" in help_text else [])


def cubin_resources(cubin: bytes) -> dict:
    """registers, stack and shared bytes of the one kernel in a cubin, and its global loads' widths.
    cuobjdump takes most of a second a call, so its reading is kept by the cubin's hash beside
    triton's own cache: a rerun with unchanged kernels reads neither compiler nor cuobjdump."""
    cache_dir = os.path.join(os.environ.get("TRITON_CACHE_DIR") or os.path.expanduser("~/.triton/cache"),
                             "grpo_kernels_resources")
    path = os.path.join(cache_dir, hashlib.sha256(cubin).hexdigest() + ".json")
    if os.path.exists(path):
        with open(path) as f:
            res = json.load(f)
        return res | {"loads": {int(bits): n for bits, n in res["loads"].items()}}  # JSON keys are strings
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([_triton_tool("cuobjdump"), "--dump-resource-usage", "--dump-sass", f.name],
                              capture_output=True, text=True, check=True).stdout
    res = _parse_usage(text)[0] | {"loads": _load_widths(text)}
    os.makedirs(cache_dir, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=cache_dir, delete=False) as f:
        json.dump(res, f)
    os.replace(f.name, path)  # atomic: parallel workers never read half a file
    return res


def _parse_usage(text: str) -> list:
    """cuobjdump --dump-resource-usage: one dict per `Function` entry."""
    out = []
    for name, body in re.findall(r"Function ([^\s:]+):\s*\n\s*(REG:.*)", text):
        fields = dict(re.findall(r"([A-Z]+(?:\[\d+\])?):(\d+)", body))
        out.append(dict(function=name, registers=int(fields["REG"]), stack=int(fields["STACK"]),
                        shared=int(fields["SHARED"]), local=int(fields["LOCAL"])))
    return out


def _load_widths(sass: str) -> dict:
    """How many global loads of each width (bits) the SASS has: LDG.E.128 -> 128, LDG.E.U16 -> 16."""
    widths = {}
    for suffix in re.findall(r"\bLDG\.E((?:\.[A-Z0-9]+)*)", sass):
        parts = suffix.split(".")
        bits = next((int(p.lstrip("SU")) for p in parts if p.lstrip("SU").isdigit()), 32)
        widths[bits] = widths.get(bits, 0) + 1
    return widths


def _ast_source(fn, variant):
    """The ASTSource of a recorded variant, in this triton's form."""
    from triton.compiler import ASTSource

    names = list(inspect.signature(fn.fn).parameters)
    aligned = [names.index(n) for n in variant["aligned"]]
    try:  # triton 3.2: constexprs outside the signature, specialisations in an AttrsDescriptor
        from triton.backends.compiler import AttrsDescriptor
    except ImportError:
        attrs = {(i,): [["tt.divisibility", 16]] for i in aligned}
        return ASTSource(fn, dict(variant["signature"]), dict(variant["constexprs"]), attrs)
    params = inspect.signature(fn.fn).parameters
    ones = [n for n, kind in variant["signature"].items() if kind == "constexpr" and not _is_constexpr(params[n])]
    signature = {n: ("i32" if n in ones else kind) for n, kind in variant["signature"].items()
                 if not _is_constexpr(params[n])}
    hints = {i: 16 for i in aligned} | {names.index(n): 1 for n in ones}
    return ASTSource(fn, signature, dict(variant["constexprs"]), AttrsDescriptor.from_hints(hints))


def compile_variant(job) -> dict:
    """Compile one (variant, arch); its resources, or the compiler's error."""
    variant, arch = job
    import warnings

    import triton
    from triton.backends.compiler import GPUTarget

    module, name = variant["kernel"].split(":")
    fn = getattr(importlib.import_module(module), name)
    options = {"num_warps": variant["num_warps"]}
    if variant["num_stages"] is not None:
        options["num_stages"] = variant["num_stages"]
    started = time.perf_counter()
    warnings.filterwarnings("ignore", message="TRITON_DEFAULT_FP_FUSION")  # triton 3.9's notice, once per compile
    try:
        kernel = triton.compile(_ast_source(fn, variant), target=GPUTarget("cuda", arch, 32), options=options)
    except Exception as exc:  # noqa: BLE001 - every compiler failure is a result to report
        cause = f" (caused by {exc.__cause__!r})" if exc.__cause__ is not None else ""
        return dict(error=f"{type(exc).__name__}: {str(exc)[-2000:]}{cause}")
    res = cubin_resources(kernel.asm["cubin"])
    res["shared"] = max(res["shared"], int(kernel.metadata.shared))  # dynamic shared memory triton asks for
    res["seconds"] = round(time.perf_counter() - started, 2)
    return res


def max_blocks_per_sm(registers: int, threads: int, shared: int) -> int:
    """Resident blocks per SM on sm_90, limited by registers, threads, shared memory and the block cap."""
    warps = -(-threads // 32)
    regs_per_warp = -(-registers * 32 // REG_ALLOC_UNIT) * REG_ALLOC_UNIT
    by_regs = REGS_PER_SM // max(1, regs_per_warp * warps)
    by_smem = SMEM_PER_SM // (shared + SMEM_RESERVED_PER_BLOCK)
    return min(by_regs, by_smem, THREADS_PER_SM // threads, BLOCKS_PER_SM)


def variant_labels(variants: list) -> list:
    """A short label per variant: the argument types, alignments and constexprs that differ among
    the variants of the same kernel (everything else is the same for all of them)."""
    by_kernel = {}
    for v in variants:
        by_kernel.setdefault(v["kernel"], []).append(v)
    labels = []
    for v in variants:
        peers = by_kernel[v["kernel"]]
        parts = []
        for name, kind in v["signature"].items():
            if name in v["constexprs"]:
                values = {json.dumps(p["constexprs"].get(name)) for p in peers}
                if len(values) > 1:
                    parts.append(f"{name}={_short(v['constexprs'][name])}")
            else:
                if len({p["signature"].get(name) for p in peers}) > 1:
                    parts.append(f"{name}:{kind.lstrip('*')}")
                if len({name in p["aligned"] for p in peers}) > 1:
                    parts.append(f"{name}%16{'=0' if name in v['aligned'] else '!=0'}")
        labels.append(" ".join(parts) or "-")
    return labels


def _short(value):
    return int(value) if isinstance(value, bool) else value


def triton_rows(variants: list, archs: list, workers: int) -> tuple:
    """(rows, failures): one row per variant and arch; failures name compile errors, spills, smem overflows."""
    jobs = [(v, arch) for arch in archs for v in variants]
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            results = list(pool.map(compile_variant, jobs))
    else:
        results = [compile_variant(job) for job in jobs]
    labels = dict(zip(map(variant_key, variants), variant_labels(variants)))
    compiler = "triton " + _environment()["triton"]
    rows, failures = [], []
    for (variant, arch), res in zip(jobs, results):
        kernel = variant["kernel"].split(":")[1]
        label = labels[variant_key(variant)]
        where = f"{kernel} [{label}] sm_{arch}"
        if "error" in res:
            failures.append(f"{where}: compile error: {res['error']}")
            continue
        spills = res["stack"] + res["local"]
        if spills:
            failures.append(f"{where}: {spills} bytes of local memory (register spills), {res['registers']} registers")
        if res["shared"] > SMEM_PER_BLOCK_MAX:
            failures.append(f"{where}: {res['shared']} bytes of shared memory > {SMEM_PER_BLOCK_MAX}")
        rows.append(dict(source="triton", kernel=kernel, variant=label, arch=f"sm_{arch}",
                         num_warps=variant["num_warps"], registers=res["registers"], spills=spills,
                         shared_bytes=res["shared"],
                         max_blocks_per_sm=max_blocks_per_sm(res["registers"], 32 * variant["num_warps"],
                                                             res["shared"]),
                         logits_128bit_loads=_logits_loads(variant, res["loads"]), compiler=compiler,
                         seconds=res["seconds"]))
    return rows, failures


def _logits_loads(variant, loads: dict) -> str:
    """For a kernel that reads logits: whether its global loads include 128-bit vector loads."""
    if "logits_ptr" not in variant["signature"]:
        return ""
    return "yes" if loads.get(128) else "no (" + ", ".join(f"{n}x{b}bit" for b, n in sorted(loads.items())) + ")"


# ----------------------------------------------------------------------------------------------
# CUDA: csrc/cuda/*.cu with nvcc
# ----------------------------------------------------------------------------------------------

def cuda_rows() -> list:
    """One row per kernel (template instantiation) of csrc/cuda/*.cu for sm_90; [] without nvcc."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return []
    cuobjdump = shutil.which("cuobjdump") or _triton_tool("cuobjdump")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for source in sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu"))):
            obj = os.path.join(tmp, os.path.basename(source) + ".cubin")
            subprocess.run([nvcc, "-std=c++17", "-O3", "-arch=sm_90", "-cubin", source, "-o", obj], check=True,
                           capture_output=True)
            usage = _parse_usage(subprocess.run([cuobjdump, "--dump-resource-usage", obj], capture_output=True,
                                                text=True, check=True).stdout)
            threads = _max_threads(cuobjdump, obj)
            sass = _sass_by_function(subprocess.run([cuobjdump, "-sass", obj], capture_output=True, text=True,
                                                    check=True).stdout)
            for res in usage:
                kernel, template = _kernel_and_template(_demangle(res["function"]))
                block = threads.get(res["function"])
                rows.append(dict(
                    source=f"cuda/{os.path.basename(source)}", kernel=kernel, variant=template or "-", arch="sm_90",
                    num_warps=block // 32 if block else "", registers=res["registers"],
                    spills=res["stack"] + res["local"], shared_bytes=res["shared"],
                    max_blocks_per_sm=max_blocks_per_sm(res["registers"], block, res["shared"]) if block else "",
                    logits_128bit_loads=("yes" if _load_widths(sass.get(res["function"], "")).get(128) else "no")
                    if "logprobs" in source else "", compiler="nvcc " + _environment()["nvcc"]))
    return rows


def _max_threads(cuobjdump: str, obj: str) -> dict:
    """__launch_bounds__ per mangled kernel name, from the cubin's EIATTR_MAX_THREADS."""
    elf = subprocess.run([cuobjdump, "-elf", obj], capture_output=True, text=True, check=True).stdout
    out = {}
    for section in re.split(r"\n(?=\.nv\.info\.)", elf):
        m = re.match(r"\.nv\.info\.(\S+)", section)
        t = re.search(r"EIATTR_MAX_THREADS\s*\n?\s*Format:.*?\n?\s*Value:\s*0x([0-9a-f]+)", section, re.S)
        if m and t:
            out[m.group(1)] = int(t.group(1), 16)
    return out


def _sass_by_function(sass: str) -> dict:
    return {m.group(1): m.group(2) for m in re.finditer(r"Function : (\S+)\n(.*?)(?=\n\s*Function : |\Z)", sass, re.S)}


def _kernel_and_template(demangled: str) -> tuple:
    """("forward_kernel", "<2, false>") from "void gk::cuda::(anonymous namespace)::forward_kernel<2, false>(...)"."""
    name = demangled.replace("(anonymous namespace)::", "")
    m = re.match(r"(?:void )?([\w:]+)(<[^()]*>)?\(", name)
    return (m.group(1).split("::")[-1], m.group(2) or "") if m else (name, "")


def _demangle(name: str) -> str:
    filt = shutil.which("cu++filt") or shutil.which("c++filt")
    if filt is None:
        return name
    return subprocess.run([filt, name], capture_output=True, text=True).stdout.strip() or name


# ----------------------------------------------------------------------------------------------
# The table
# ----------------------------------------------------------------------------------------------

def to_csv(rows: list) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def read_committed_csv(path: str = CSV_PATH) -> list:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def compare_with_committed(rows: list, sources=("triton",)) -> tuple:
    """(differences, note): the differences between `rows` and the committed csv for rows of `sources`
    and of the archs compiled (`--archs 90` compares the sm_90 rows alone), or none and a note when
    the table was compiled by another triton (its numbers differ by version)."""
    fresh = [r for r in csv.DictReader(io.StringIO(to_csv(rows))) if r["source"] in sources]
    archs = {r["arch"] for r in fresh}
    committed = [r for r in read_committed_csv() if r["source"] in sources and r["arch"] in archs]
    versions = {r["compiler"] for r in committed}, {r["compiler"] for r in fresh}
    if versions[0] != versions[1]:
        return [], f"the committed table was compiled by {sorted(versions[0])}, this run by {sorted(versions[1])}"
    key = lambda r: (r["source"], r["kernel"], r["variant"], r["arch"])  # noqa: E731
    a, b = {key(r): r for r in fresh}, {key(r): r for r in committed}
    diffs = [f"missing from the committed table: {k}" for k in a.keys() - b.keys()]
    diffs += [f"in the committed table but no longer produced: {k}" for k in b.keys() - a.keys()]
    diffs += [f"{k}: committed {b[k]} but regenerated {a[k]}" for k in a.keys() & b.keys() if a[k] != b[k]]
    return sorted(diffs), ""


@functools.lru_cache(maxsize=None)
def _environment() -> dict:
    import torch
    import triton

    ptxas = subprocess.run([_triton_tool("ptxas"), "--version"], capture_output=True, text=True).stdout
    nvcc = shutil.which("nvcc")
    nvcc_version = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout if nvcc else ""
    last = lambda text: (re.findall(r"release [\d.]+, V([\d.]+)", text) or ["-"])[-1]  # noqa: E731
    return dict(python=sys.version.split()[0], torch=torch.__version__, triton=triton.__version__,
                ptxas=last(ptxas), nvcc=last(nvcc_version))


def to_markdown(rows: list, env: dict) -> str:
    kernels = sorted({(r["source"], r["kernel"], r["arch"]) for r in rows})
    lines = [
        "# Kernel resources on Hopper (sm_90) and Blackwell (sm_100), compiled without a GPU",
        "",
        "Generated by `python -m benchmarks.kernel_resources --write` (do not edit; the csv beside it is",
        "the data, and tests/test_kernels_sm90.py checks that a regeneration matches its Triton rows).",
        f"Compiled with python {env['python']}, torch {env['torch']}, triton {env['triton']} "
        f"(ptxas {env['ptxas']}), nvcc {env['nvcc']}.",
        "",
        "- **Triton** rows: every variant the dispatch launched while running the public API over",
        "  tests/cases.py's option cases (see the module docstring), compiled for sm_90 and, where the",
        "  bundled ptxas has it, sm_100. `variant` lists only what differs between a kernel's variants.",
        "- **CUDA** rows: csrc/cuda/*.cu, `nvcc -O3 -arch=sm_90 -cubin`, one row per template instantiation.",
        "- `spills`: bytes of local memory (stack frame + local); 0 everywhere is checked in CI.",
        "- `max_blocks_per_sm`: resident blocks per SM from registers (64K per SM, 256 per warp granularity),",
        "  threads (2048), shared memory (228 KiB, +1 KiB reserved per block) and the 32-block cap.",
        "- `logits_128bit_loads`: whether the kernel's global loads include 128-bit vector loads",
        "  (LDG.E.128 in the SASS); for the other widths, how many loads of each. With a vocabulary that",
        "  is not a multiple of 16 (`V%16!=0`) triton cannot prove alignment and loads element by element.",
        "",
        "## Summary",
        "",
        "| source | kernel | arch | variants (rows) | registers (max) | spills | min blocks/SM |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for source, kernel, arch in kernels:
        mine = [r for r in rows if (r["source"], r["kernel"], r["arch"]) == (source, kernel, arch)]
        occupancy = [r["max_blocks_per_sm"] for r in mine if r["max_blocks_per_sm"] != ""]
        lines.append(f"| {source} | {kernel} | {arch} | {len(mine)} | {max(r['registers'] for r in mine)} | "
                     f"{sum(r['spills'] for r in mine)} | {min(occupancy) if occupancy else '-'} |")
    lines += ["", "## Other triton versions", "",
              "`python -m benchmarks.kernel_resources --versions` run under each triton (a scratch virtual",
              "environment each; the recording and the compiles both use that triton) adds a row to",
              "kernels_triton_versions.csv: the same variants, compiled, with the errors and spills found;",
              "`seconds` is that run's recording and compiling with an empty triton cache (2 cores, 2 workers).",
              ""]
    if os.path.exists(VERSIONS_PATH):
        with open(VERSIONS_PATH, newline="") as f:
            versions = list(csv.DictReader(f))
        lines += ["| " + " | ".join(VERSION_COLUMNS) + " |", "|" + " --- |" * len(VERSION_COLUMNS)]
        lines += ["| " + " | ".join(v[c] for c in VERSION_COLUMNS) + " |" for v in versions]
    lines += ["", "## Every variant", "", "| " + " | ".join(COLUMNS) + " |", "|" + " --- |" * len(COLUMNS)]
    lines += ["| " + " | ".join(str(r[c]) for c in COLUMNS) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def run(mode: str, workers: int, archs=None, json_path=None) -> int:
    """Record, compile and check; then write the table ("write"), compare with it ("check"), or record
    this triton version's summary in VERSIONS_PATH ("versions")."""
    started = time.perf_counter()
    variants = recorded_variants()
    rows, failures = triton_rows(variants, archs or bundled_archs(), workers)
    seconds = time.perf_counter() - started
    print(f"{len(variants)} triton variants, {len(rows)} compiled in {seconds:.0f} s", file=sys.stderr)
    mismatches, note = [], ""
    if mode == "write":
        rows += cuda_rows()
        os.makedirs(RESULTS, exist_ok=True)
        with open(CSV_PATH, "w") as f:
            f.write(to_csv(rows))
        with open(MD_PATH, "w") as f:
            f.write(to_markdown(rows, _environment()))
        print(f"wrote {CSV_PATH} and {MD_PATH}", file=sys.stderr)
    elif mode == "check":
        mismatches, note = compare_with_committed(rows)
    elif mode == "versions":
        _record_version(variants, rows, failures, seconds)
    if json_path:
        with open(json_path, "w") as f:
            json.dump(dict(variants=variants, rows=rows, failures=failures, mismatches=mismatches, note=note), f)
    for failure in failures + mismatches:
        print("FAIL", failure)
    return 1 if failures or mismatches else 0


def _spill_summary(rows) -> str:
    """Which kernels spill, in how many variants, with the largest local-memory frame: "-" for none."""
    by_kernel = {}
    for r in rows:
        if r["spills"]:
            count, most = by_kernel.get(r["kernel"], (0, 0))
            by_kernel[r["kernel"]] = (count + 1, max(most, r["spills"]))
    return "; ".join(f"{k} x{n} (<= {b} B)" for k, (n, b) in sorted(by_kernel.items())) or "-"


def _record_version(variants, rows, failures, seconds):
    """One summary row per triton version in VERSIONS_PATH (replacing this version's earlier row)."""
    env = _environment()
    row = dict(triton=env["triton"], torch=env["torch"], python=env["python"], ptxas=env["ptxas"],
               archs=" ".join(sorted({r["arch"] for r in rows})), variants=len(variants), compiled=len(rows),
               compile_errors=sum("compile error" in f for f in failures),
               spilling=sum(r["spills"] > 0 for r in rows), spills=_spill_summary(rows),
               max_registers=max((r["registers"] for r in rows), default=0),
               seconds=round(seconds))
    old = []
    if os.path.exists(VERSIONS_PATH):
        with open(VERSIONS_PATH, newline="") as f:
            old = [r for r in csv.DictReader(f) if r["triton"] != row["triton"]]
    with open(VERSIONS_PATH, "w") as f:
        writer = csv.DictWriter(f, fieldnames=VERSION_COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(sorted(old + [row], key=lambda r: [int(x) for x in re.findall(r"\d+", r["triton"])]))
    print(f"recorded triton {row['triton']} in {VERSIONS_PATH}", file=sys.stderr)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--write", action="store_true", help="compile and write benchmarks/results/kernels_sm90.*")
    mode.add_argument("--check", action="store_true", help="compile and compare with the committed table")
    mode.add_argument("--versions", action="store_true",
                      help="compile and record this triton version's summary in benchmarks/results/")
    mode.add_argument("--record", metavar="JSON", help="(internal) record the launched variants into JSON")
    mode.add_argument("--list", action="store_true", help="print the recorded variants")
    parser.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--archs", type=lambda text: [int(a) for a in text.split(",")],
                        help="compute capabilities to compile for, e.g. 90,100 (default: sm_90, and sm_100 where "
                             "the bundled ptxas has it)")
    parser.add_argument("--json", metavar="PATH", help="also write the variants, rows and failures as JSON")
    args = parser.parse_args(argv)
    if args.record:
        with open(args.record, "w") as f:
            json.dump(record_variants(), f, indent=1)
        return 0
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        return subprocess.run([sys.executable, "-m", "benchmarks.kernel_resources", *sys.argv[1:]], cwd=ROOT,
                              env=env).returncode
    if args.list:
        for v in recorded_variants():
            print(json.dumps(v))
        return 0
    mode = "write" if args.write else "versions" if args.versions else "check"
    return run(mode, args.workers, args.archs, args.json)


if __name__ == "__main__":
    sys.exit(main())

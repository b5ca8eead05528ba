"""Per-call host overhead at N=256 tokens: `python -m benchmarks.host_overhead`.

At 256 tokens and a small vocabulary the kernels take microseconds and a call is its Python
glue, argument checks and host syncs. For every backend of ours on the device this times, with
validate=True (every data-dependent check, read with one host sync) and validate=False (no check,
no sync):

  grpo_loss               logits (B, T, V), forward + backward, dapo at TRL 1.16's defaults
  selective_logprobs      return_entropy=True, backward of logp.sum() + entropy.sum()
  fused_linear_grpo_loss  hidden (B, T, H) and weight (V, H), forward + backward, same loss
  group_advantages        rewards (B·T,) in groups of 8, no backward

and, beside them, the eager PyTorch a user runs today, written as TRL 1.16 writes it (see the
trl_* functions below; TRL's own selective_log_softmax too where trl is installed). Per row: µs
per call (median, min and max over --repeats calls, timed in --rounds interleaved rounds so
that a slow spell of a shared machine hits every row alike; wall clock, with a device
synchronisation after each call on CUDA), host reads of tensor values per call (.item(), bool(),
.tolist(): each a device sync on a GPU), Python calls per call into grpo_kernels and the number
of its files they run in (count_python_calls). A section after the table lists, for one
grpo_loss call, the calls file by file and the deepest chain of nested calls (its layers).

Run it under another checkout of grpo_kernels to get a "before" set: copy benchmarks/ to a
scratch folder and run `python -m benchmarks.host_overhead` there with PYTHONPATH=<checkout>; a
version without `validate` is timed with its defaults. `--before FILE` (a markdown file this
script wrote) adds a table of those numbers beside today's. Writes host_overhead.md (--filename)
into a fresh runs/benchmarks/<device>-<date>-<time>/ (or --out; --update-committed for
benchmarks/results/<device>/).
"""
from __future__ import annotations

import argparse
import collections
import gc
import inspect
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, FrozenSet, List, Optional, Tuple

import torch

import grpo_kernels as gk

from . import output
from .measure import device_name, sync

HOST_READERS = ("item", "tolist", "__bool__", "__int__", "__float__")
OPS = ("grpo_loss", "selective_logprobs", "fused_linear_grpo_loss", "group_advantages")
EAGER = "eager PyTorch (TRL 1.16's lines)"
TRL = "TRL 1.16 selective_log_softmax + its lines"
TABLE_HEADER = "| op | implementation | checks | µs per call (median) | min | max | host reads | Python calls | files |"
_GENERATOR_FLAGS = inspect.CO_GENERATOR | inspect.CO_COROUTINE | inspect.CO_ASYNC_GENERATOR


def count_host_reads(fn) -> int:
    """Host reads of tensor values during one fn() call."""
    count = [0]
    originals = {name: getattr(torch.Tensor, name) for name in HOST_READERS}

    def counting(original):
        def reader(tensor, *args, **kwargs):
            count[0] += 1
            return original(tensor, *args, **kwargs)
        return reader

    try:
        for name, original in originals.items():
            setattr(torch.Tensor, name, counting(original))
        fn()
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)
    return count[0]


# ----------------------------------------------------------------------------------------- Python calls

@dataclass
class CallProfile:
    """The Python calls into one package during one fn() call (see profile_python_calls)."""
    calls: int = 0  # function invocations, lambdas and comprehensions included; generator resumes not
    resumes: int = 0  # re-entries of a generator already started (profile 'call' events, not counted in calls)
    per_file: Dict[str, int] = field(default_factory=dict)  # calls by file, relative to the package
    depth: int = 0  # the deepest nesting of the package's frames (frames of other code in between not counted)
    deepest: Tuple[str, ...] = ()  # that chain, outermost first, as "file:function"

    @property
    def files(self) -> FrozenSet[str]:
        return frozenset(self.per_file)

    @property
    def events(self) -> int:
        """The profiler's raw 'call' events in the package: calls + resumes."""
        return self.calls + self.resumes


def profile_python_calls(fn: Callable[[], object], package_dir: Optional[str] = None) -> CallProfile:
    """Run fn() once under sys.setprofile and record the calls of Python functions whose code lies
    in `package_dir` (default: the grpo_kernels package, os.path.dirname(grpo_kernels.__file__)).

    Counted: every 'call' event of such a code object: functions, methods, lambdas, and the
    comprehensions and generator expressions Python runs as frames of their own (3.11 does for
    all of them; 3.12 inlines list/dict/set comprehensions, so compare counts on one Python
    version). A generator counts once, when it starts: its later resumptions (one 'call' event
    per item pulled) are counted apart, in `resumes`. Not counted: C functions, and calls made
    on other threads (sys.setprofile is per thread: on CUDA the backward of an autograd.Function
    runs on the autograd engine's device thread, whose Python calls are missed).
    """
    root = os.path.join(os.path.abspath(package_dir or os.path.dirname(os.path.abspath(gk.__file__))), "")
    where: Dict[object, Optional[str]] = {}  # code object -> path relative to root, or None when outside
    per_file: collections.Counter = collections.Counter()
    started: Dict[int, object] = {}  # generator frames seen (kept alive, so an id is never reused meanwhile)
    stack: List[str] = []
    result = CallProfile()

    def place(code) -> Optional[str]:
        try:
            return where[code]
        except KeyError:
            path = os.path.abspath(code.co_filename)
            where[code] = os.path.relpath(path, root).replace(os.sep, "/") if path.startswith(root) else None
            return where[code]

    def profiler(frame, event, arg):
        if event == "call":
            code = frame.f_code
            rel = place(code)
            if rel is None:
                return
            if code.co_flags & _GENERATOR_FLAGS and id(frame) in started:
                result.resumes += 1
            else:
                if code.co_flags & _GENERATOR_FLAGS:
                    started[id(frame)] = frame
                per_file[rel] += 1
            stack.append(f"{rel}:{code.co_name}")
            if len(stack) > len(result.deepest):
                result.deepest = tuple(stack)
        elif event == "return" and stack and place(frame.f_code) is not None:
            stack.pop()

    previous = sys.getprofile()
    sys.setprofile(profiler)
    try:
        fn()
    finally:
        sys.setprofile(previous)
        started.clear()
    result.per_file = dict(sorted(per_file.items()))
    result.calls = sum(per_file.values())
    result.depth = len(result.deepest)
    return result


def count_python_calls(fn: Callable[[], object]) -> Tuple[int, FrozenSet[str]]:
    """(calls, files): Python function calls into grpo_kernels during one fn() call, and the distinct
    files (relative to the package directory) they run in. See profile_python_calls for what counts."""
    profile = profile_python_calls(fn)
    return profile.calls, profile.files


# ----------------------------------------------------------------------------------------- TRL 1.16's eager lines

def trl_selective_log_softmax(logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """trl.trainer.utils.selective_log_softmax without its Triton branch (temperature 1, no row mask)."""
    index = index.unsqueeze(-1)
    if logits.dtype in (torch.float32, torch.float64):
        selected_logits = torch.gather(logits, dim=-1, index=index)
        logsumexp_values = torch.stack([torch.logsumexp(lg, dim=-1) for lg in logits])  # TRL's row loop
        per_token_logps = selected_logits - logsumexp_values.unsqueeze(-1)
    else:
        per_token_logps = torch.stack([torch.log_softmax(row_logits, dim=-1).gather(dim=-1, index=row_labels)
                                       for row_logits, row_labels in zip(logits, index)])
    return per_token_logps.squeeze(-1)


def trl_dapo_loss(per_token_logps, old_per_token_logps, advantages, mask, num_items_in_batch,
                  epsilon_low: float = 0.2, epsilon_high: float = 0.2) -> torch.Tensor:
    """GRPOTrainer._compute_loss at TRL 1.16's defaults: dapo, token-level ratio, β = 0 (no KL term),
    ε = 0.2 both sides, one process, no gradient accumulation (normalizer = num_items_in_batch)."""
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(1)
    log_ratio = per_token_logps - old_per_token_logps
    coef_1 = torch.exp(log_ratio)
    coef_2 = torch.clamp(coef_1, 1 - epsilon_low, 1 + epsilon_high)
    per_token_loss1 = coef_1 * advantages
    per_token_loss2 = coef_2 * advantages
    per_token_loss = -torch.min(per_token_loss1, per_token_loss2)
    normalizer = num_items_in_batch.clamp(min=1.0) / 1  # / accelerator.num_processes
    normalizer = normalizer * 1 / 1  # * current_gradient_accumulation_steps / steps_per_generation
    return (per_token_loss * mask).sum() / normalizer


def trl_nanstd(tensor: torch.Tensor, dim: int) -> torch.Tensor:
    """trl.trainer.utils.nanstd (keepdim=False)."""
    mean = torch.nanmean(tensor, dim=dim, keepdim=True)
    variance = torch.nanmean((tensor - mean) ** 2, dim=dim, keepdim=True)
    count = torch.sum(~torch.isnan(tensor), dim=dim, keepdim=True)
    correction = count / (count - 1)
    correction = torch.where(count > 1, correction, torch.full_like(correction, float("nan")))
    variance *= correction
    return torch.sqrt(variance).squeeze(dim)


def trl_group_advantages(rewards: torch.Tensor, num_generations: int) -> torch.Tensor:
    """GRPOTrainer's advantages for one reward function at its defaults (scale_rewards="group")."""
    mean_grouped_rewards = torch.nanmean(rewards.view(-1, num_generations), dim=1)
    mean_grouped_rewards = mean_grouped_rewards.repeat_interleave(num_generations, dim=0)
    std_rewards = trl_nanstd(rewards.view(-1, num_generations), dim=1)
    std_rewards = std_rewards.repeat_interleave(num_generations, dim=0)
    advantages = rewards - mean_grouped_rewards
    return advantages / (std_rewards + 1e-4)


# ----------------------------------------------------------------------------------------- the calls timed

@dataclass
class Row:
    op: str
    implementation: str
    checks: str
    call: Callable[[], torch.Tensor]  # one call, forward (+ backward); returns the forward value
    backend: Optional[str] = None  # ours: the backend; None for a baseline
    samples: List[float] = field(default_factory=list)  # seconds
    reads: Optional[int] = None
    profile: Optional[CallProfile] = None

    def key(self) -> Tuple[str, str, str]:
        return self.op, self.implementation, self.checks


def _validate_modes(fn) -> Tuple[Optional[bool], ...]:
    return (True, False) if "validate" in inspect.signature(fn).parameters else (None,)


def _checks(validate: Optional[bool]) -> str:
    return "default" if validate is None else f"validate={validate}"


def _inputs(device: torch.device, b: int, t: int, v: int, h: int) -> Dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(b, t, v, generator=g) * 2
    ids = torch.randint(0, v, (b, t), generator=g)
    hidden = torch.randn(b, t, h, generator=g)
    weight = torch.randn(v, h, generator=g) / h ** 0.5
    with torch.no_grad():  # old log-probs near the current ones, as after one optimizer step
        logp = trl_selective_log_softmax(logits, ids)
        logp_linear = trl_selective_log_softmax(hidden @ weight.T, ids)
    x = dict(logits=logits, ids=ids, mask=torch.rand(b, t, generator=g) > 0.1, advantages=torch.randn(b, generator=g),
             old_logps=logp + 0.2 * torch.randn(b, t, generator=g), hidden=hidden, weight=weight,
             old_logps_linear=logp_linear + 0.2 * torch.randn(b, t, generator=g),
             rewards=torch.randint(0, 3, (b * t,), generator=g).float() + 0.1 * torch.randn(b * t, generator=g))
    x = {k: value.to(device) for k, value in x.items()}
    x["num_items_in_batch"] = x["mask"].sum()  # TRL computes it once per generation batch, not per loss call
    return x


def _rows(device: torch.device, x: Dict[str, torch.Tensor], ops, group_size: int) -> List[Row]:
    """Every (op, implementation, checks) row: ours per backend and validate mode, then the baselines."""
    trl_utils = None
    try:
        from trl.trainer import utils as trl_utils
    except Exception:  # noqa: BLE001 - TRL absent or broken: its rows are left out
        pass
    dapo = dict(loss_type="dapo")  # TRL 1.16's defaults: β = 0, ε = 0.2 both sides
    rows: List[Row] = []

    def leaf(name):
        return x[name].detach().requires_grad_(True)

    def ours(op, fn, make):
        for backend in gk.available_backends(device):
            for validate in _validate_modes(fn):
                extra = {} if validate is None else {"validate": validate}
                rows.append(Row(op, f"grpo_kernels[{backend}]", _checks(validate), make(backend, extra), backend))

    def baseline(op, name, call):
        rows.append(Row(op, name, "—", call))

    if "grpo_loss" in ops:
        def make_loss(backend, extra):
            def call():
                logits = leaf("logits")
                out = gk.grpo_loss(logits, x["ids"], x["advantages"], mask=x["mask"], old_logps=x["old_logps"],
                                   backend=backend, **dapo, **extra)
                out.loss.backward()
                return out.loss.detach()
            return call

        def eager_loss(selective_log_softmax):
            def call():
                logits = leaf("logits")
                logp = selective_log_softmax(logits, x["ids"])
                loss = trl_dapo_loss(logp, x["old_logps"], x["advantages"], x["mask"], x["num_items_in_batch"])
                loss.backward()
                return loss.detach()
            return call

        ours("grpo_loss", gk.grpo_loss, make_loss)
        baseline("grpo_loss", EAGER, eager_loss(trl_selective_log_softmax))
        if trl_utils is not None:
            baseline("grpo_loss", TRL, eager_loss(trl_utils.selective_log_softmax))

    if "selective_logprobs" in ops:
        def make_logprobs(backend, extra):
            def call():
                logits = leaf("logits")
                logp, entropy = gk.selective_logprobs(logits, x["ids"], return_entropy=True, backend=backend, **extra)
                (logp.sum() + entropy.sum()).backward()
                return torch.stack([logp.detach(), entropy.detach()])
            return call

        def eager_logprobs():
            logits = leaf("logits")
            logps = torch.log_softmax(logits.float(), dim=-1)
            logp = logps.gather(-1, x["ids"].unsqueeze(-1)).squeeze(-1)
            entropy = -(torch.exp(logps) * logps).sum(-1)
            (logp.sum() + entropy.sum()).backward()
            return torch.stack([logp.detach(), entropy.detach()])

        ours("selective_logprobs", gk.selective_logprobs, make_logprobs)
        baseline("selective_logprobs", "eager PyTorch (log_softmax + gather + entropy)", eager_logprobs)
        both = getattr(trl_utils, "selective_log_softmax_and_entropy", None)
        if both is not None:
            def trl_logprobs():
                logits = leaf("logits")
                logp, entropy = both(logits, x["ids"])
                (logp.sum() + entropy.sum()).backward()
                return torch.stack([logp.detach(), entropy.detach()])
            baseline("selective_logprobs", "TRL 1.16 selective_log_softmax_and_entropy", trl_logprobs)

    if "fused_linear_grpo_loss" in ops:
        def make_linear(backend, extra):
            def call():
                hidden, weight = leaf("hidden"), leaf("weight")
                out = gk.fused_linear_grpo_loss(hidden, weight, x["ids"], x["advantages"], mask=x["mask"],
                                                old_logps=x["old_logps_linear"], backend=backend, **dapo, **extra)
                out.loss.backward()
                return out.loss.detach()
            return call

        def eager_linear():
            hidden, weight = leaf("hidden"), leaf("weight")
            logp = trl_selective_log_softmax(hidden @ weight.T, x["ids"])
            loss = trl_dapo_loss(logp, x["old_logps_linear"], x["advantages"], x["mask"], x["num_items_in_batch"])
            loss.backward()
            return loss.detach()

        ours("fused_linear_grpo_loss", gk.fused_linear_grpo_loss, make_linear)
        baseline("fused_linear_grpo_loss", "eager PyTorch (hidden @ weight.T, then TRL 1.16's lines)", eager_linear)

    if "group_advantages" in ops:
        def make_advantages(backend, extra):
            return lambda: gk.group_advantages(x["rewards"], group_size=group_size, backend=backend,
                                               **extra).advantages
        ours("group_advantages", gk.group_advantages, make_advantages)
        baseline("group_advantages", EAGER, lambda: trl_group_advantages(x["rewards"], group_size))
    return rows


def _disagreements(rows: List[Row]) -> List[str]:
    """Every row against its op's first baseline, TRL 1.16's eager lines (all fp32: 1e-4 relative)."""
    notes = []
    for row in rows:
        reference = next(r for r in rows if r.op == row.op and r.backend is None)
        if row is reference:
            continue
        expected, value = reference.call(), row.call()
        scale = max(1.0, float(expected.abs().max()))
        error = float((value.float() - expected.float()).abs().max()) / scale
        if not error <= 1e-4:
            notes.append(f"{row.op} {row.implementation} {row.checks}: differs from the baseline by {error:.2e}")
    return notes


def _measure(rows: List[Row], device: torch.device, repeats: int, rounds: int, warmup: int) -> None:
    for row in rows:
        for _ in range(warmup):
            row.call()
        row.reads = count_host_reads(row.call)
        if row.backend is not None:
            row.profile = profile_python_calls(row.call)
    per_round = max(1, repeats // rounds)
    for _ in range(rounds):
        for row in rows:
            gc.collect()
            row.call()
            sync(device)
            for _ in range(per_round):
                t0 = time.perf_counter()
                row.call()
                sync(device)
                row.samples.append(time.perf_counter() - t0)


# ----------------------------------------------------------------------------------------- the tables

def _us(seconds: float) -> str:
    return f"{seconds * 1e6:.0f}"


def _table(rows: List[Row]) -> List[str]:
    lines = [TABLE_HEADER, "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        calls = str(r.profile.calls) if r.profile else "—"
        files = str(len(r.profile.files)) if r.profile else "—"
        lines.append(f"| {r.op} | {r.implementation} | {r.checks} | {_us(statistics.median(r.samples))} | "
                     f"{_us(min(r.samples))} | {_us(max(r.samples))} | {r.reads} | {calls} | {files} |")
    return lines


def read_table(path: str) -> Tuple[str, Dict[Tuple[str, str, str], Dict[str, str]]]:
    """(title, rows by (op, implementation, checks)) of the main table of a file this script wrote."""
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    title = next((line.lstrip("# ").strip() for line in lines if line.startswith("# ")), path)
    start = lines.index(TABLE_HEADER)
    names = [c.strip() for c in TABLE_HEADER.strip("|").split("|")]
    rows = {}
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        cells = dict(zip(names, (c.strip() for c in line.strip().strip("|").split("|"))))
        rows[(cells["op"], cells["implementation"], cells["checks"])] = cells
    return title, rows


def _change(before, now) -> str:
    return "—" if before == str(now) == "—" else f"{before} → {now}"


def _before_table(rows: List[Row], path: str) -> List[str]:
    title, before = read_table(path)
    lines = [f"## Against the before run ({os.path.basename(path)}: {title})", "",
             "Medians in µs; reads, Python calls and files per call. One run each: on a shared machine the eager "
             "rows, whose code did not change, show how far the two runs' conditions differ.", "",
             "| op | implementation | checks | µs before | µs now | now / before | host reads before → now | "
             "Python calls before → now | files before → now |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        old = before.get(r.key()) or before.get((r.op, r.implementation, "default"))
        if old is None:
            continue
        now = statistics.median(r.samples) * 1e6
        try:
            ratio = f"{now / float(old['µs per call (median)']):.2f}"
        except (ValueError, ZeroDivisionError):
            ratio = "—"
        calls = str(r.profile.calls) if r.profile else "—"
        files = str(len(r.profile.files)) if r.profile else "—"
        lines.append(f"| {r.op} | {r.implementation} | {r.checks} | {old['µs per call (median)']} | {now:.0f} | "
                     f"{ratio} | {_change(old['host reads'], r.reads)} | {_change(old['Python calls'], calls)} | "
                     f"{_change(old['files'], files)} |")
    return lines


def _layers(rows: List[Row], x: Dict[str, torch.Tensor]) -> List[str]:
    """One grpo_loss call, file by file, for each backend (validate=False where there is the choice)."""
    loss_rows = [r for r in rows if r.op == "grpo_loss" and r.backend is not None and r.checks != "validate=True"]
    if not loss_rows:
        return []
    lines = ["## One grpo_loss call: files and layers", "",
             "Python calls into grpo_kernels during one forward + backward (the grpo_loss rows above), file by file. "
             "Nesting: the deepest chain of grpo_kernels frames inside each other (frames of torch and of other "
             "code between them not counted), outermost first.", ""]
    for r in loss_rows:
        p = r.profile
        lines += [f"### {r.implementation}, {r.checks}: {p.calls} calls in {len(p.files)} files, nesting {p.depth}",
                  "", "| file | calls |", "|---|---|"]
        lines += [f"| {name} | {n} |" for name, n in p.per_file.items()]
        lines += ["", "Deepest chain: " + " → ".join(f"`{frame}`" for frame in p.deepest), ""]
    # The configuration the issue counted in: options as keywords, β = 0.04 with ref_logps.
    backend = next((r.backend for r in loss_rows if r.backend == "cpp"), loss_rows[0].backend)
    extra = {"validate": False} if _validate_modes(gk.grpo_loss) == (True, False) else {}

    def issue_call():
        logits = x["logits"].detach().requires_grad_(True)
        out = gk.grpo_loss(logits, x["ids"], x["advantages"], mask=x["mask"], old_logps=x["old_logps"],
                           ref_logps=x["old_logps"], loss_type="dapo", beta=0.04, backend=backend, **extra)
        out.loss.backward()

    issue_call()
    p = profile_python_calls(issue_call)
    lines += [f"As the issue counted (grpo_kernels[{backend}], {_checks(extra.get('validate'))}, loss_type=\"dapo\", "
              f"beta=0.04 as keywords, ref_logps given): {p.calls} calls and {p.resumes} generator resumptions "
              f"({p.events} profiler 'call' events) in {len(p.files)} files, nesting {p.depth}.", ""]
    return lines


def _package_origin() -> str:
    """Where grpo_kernels was imported from, with its git commit when it is a checkout."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(gk.__file__)))
    try:
        commit = subprocess.run(["git", "-C", root, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--", "grpo_kernels"], capture_output=True,
                               text=True, check=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return root
    return f"{root}, commit {commit}" + (" with uncommitted changes to grpo_kernels/" if dirty else "")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.host_overhead", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sequences", type=int, default=8, help="B (default: %(default)s)")
    parser.add_argument("--length", type=int, default=32, help="T; N = B·T (default: %(default)s)")
    parser.add_argument("--vocab", type=int, default=256, help="V (default: %(default)s)")
    parser.add_argument("--hidden", type=int, default=64, help="H of fused_linear_grpo_loss (default: %(default)s)")
    parser.add_argument("--group-size", type=int, default=8, help="group_advantages' groups (default: %(default)s)")
    parser.add_argument("--ops", default=",".join(OPS), help="comma-separated subset of %(default)s")
    parser.add_argument("--repeats", type=int, default=400, help="timed calls per row (default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=10, help="interleaved rounds they are split into "
                        "(default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=10, help="untimed calls per row first (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default: %(default)s: "
                        "at this size a second thread only adds a barrier per op, and stalls on a busy machine)")
    parser.add_argument("--label", default=f"grpo_kernels {gk.__version__}", help="the version's name in the title")
    parser.add_argument("--before", metavar="FILE", help="a markdown file this script wrote under the old code: "
                        "adds a table of its numbers beside these")
    parser.add_argument("--filename", default="host_overhead.md", help="the file written (default: %(default)s)")
    output.add_arguments(parser)
    args = parser.parse_args(argv)
    ops = [op for op in args.ops.split(",") if op]
    unknown = set(ops) - set(OPS)
    if unknown:
        parser.error(f"--ops: unknown {sorted(unknown)}; choose from {list(OPS)}")
    if args.before and not os.path.exists(args.before):
        parser.error(f"--before: no file {args.before}")
    if (args.sequences * args.length) % args.group_size:
        parser.error("--group-size must divide N = sequences × length")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]
    b, t, v, h = args.sequences, args.length, args.vocab, args.hidden
    x = _inputs(device, b, t, v, h)
    rows = _rows(device, x, ops, args.group_size)
    notes = _disagreements(rows)
    for note in notes:
        print(f"warning: {note}", file=sys.stderr)
    _measure(rows, device, args.repeats, args.rounds, args.warmup)
    load_after = os.getloadavg()[0]

    name = device_name(device)
    per_round = max(1, args.repeats // args.rounds)
    lines = [f"# Per-call host overhead ({name}, torch {torch.__version__}, {args.label})", "",
             f"Run on {time.strftime('%Y-%m-%d %H:%M %Z')} with Python {sys.version.split()[0]}; grpo_kernels "
             f"{gk.__version__} from {_package_origin()}; {torch.get_num_threads()} torch thread(s); load average "
             f"{load_before:.1f} before the run and {load_after:.1f} after it ({os.cpu_count()} CPUs).", "",
             f"N = {b}×{t} = {b * t} tokens, V = {v}, H = {h}, fp32. Losses at TRL 1.16's defaults (dapo, β = 0, "
             f"ε = 0.2 both sides), forward + backward; selective_logprobs with return_entropy=True, backward of "
             f"logp.sum() + entropy.sum(); group_advantages of {b * t} rewards in groups of {args.group_size}, "
             f"no backward. µs per call: wall clock of {per_round * args.rounds} calls per row in {args.rounds} "
             "interleaved rounds" + (", a device synchronisation after each" if device.type == "cuda" else "")
             + ". Host reads: .item(), bool(), int(), float(), .tolist() of a tensor per call. Python calls and "
             "files: calls into grpo_kernels per call and the files they run in (count_python_calls: generator "
             "resumptions not counted; on CUDA the backward's calls on autograd's device thread are missed).", ""]
    lines += _table(rows) + [""]
    if notes:
        lines += ["Disagreements with the baseline (these rows compute something else):", ""]
        lines += [f"- {note}" for note in notes] + [""]
    lines += _layers(rows, x)
    if args.before:
        lines += _before_table(rows, args.before) + [""]
    text = "\n".join(lines).rstrip("\n") + "\n"
    output.publish_texts({args.filename: text}, output.directory(args, name), text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

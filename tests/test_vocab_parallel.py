"""Vocabulary-parallel ops on 2 and 3 gloo ranks against the single-process result.

Each rank holds a contiguous slice of the vocabulary (logits (..., V_local) or lm_head rows
(V_local, H)); ids stay global. On every rank the loss, log-probs, entropy, per-token loss and
metrics must equal the single-process call on the whole vocabulary, and the gradient of the
rank's slice must equal that slice of the single-process gradient: every option case, padded
and packed, on every backend that runs here. One spawn per (world, backend) runs all the cases,
and reports each mismatch by case name.
"""
import pytest
import torch

import grpo_kernels as gk
from cases import OPTION_IDS, make_case
from conftest import BACKENDS
from distributed import run_ranks

H = 8
LAYOUTS = ("padded", "packed")
# Options the Triton interpreter runs (it is slow on the CPU): one of each kind of objective.
TRITON_OPTIONS = ("dapo", "gspo", "everything")


def slices(vocab: int, world: int, even: bool):
    """(start, size) per rank: Megatron's even split (V divisible), or sizes differing by one."""
    if even:
        assert vocab % world == 0
        return [(k * (vocab // world), vocab // world) for k in range(world)]
    sizes = [vocab // world + (1 if k < vocab % world else 0) for k in range(world)]
    return [(sum(sizes[:k]), sizes[k]) for k in range(world)]


def packed(case):
    """The case with its unmasked tokens packed into (N,) with cu_seqlens (one sequence is empty)."""
    m = case.mask
    lengths = m.sum(1)
    cu = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    take = lambda x: None if x is None else (x[m] if x.shape == m.shape else x)  # noqa: E731
    inputs = dict(ids=case.ids[m], advantages=take(case.advantages), old_logps=take(case.old_logps),
                  ref_logps=take(case.ref_logps), sampling_logps=take(case.sampling_logps),
                  is_weights=take(case.is_weights), cu_seqlens=cu)
    return case.logits[m], inputs


def inputs_of(case, layout):
    """(logits, keyword inputs) of the loss in the layout."""
    if layout == "packed":
        logits, inputs = packed(case)
        return logits, dict(inputs, num_items_in_batch=case.num_items_in_batch, config=case.config)
    return case.logits, dict(ids=case.ids, advantages=case.advantages, **case.kwargs())


def linear_of(logits, seed):
    g = torch.Generator().manual_seed(seed)
    v = logits.shape[-1]
    hidden = torch.randn(*logits.shape[:-1], H, generator=g, dtype=torch.float64)
    return hidden.to(logits.dtype), (torch.randn(v, H, generator=g, dtype=torch.float64) * 0.7).to(logits.dtype), \
        torch.randn(v, generator=g, dtype=torch.float64).to(logits.dtype)


class Mismatches:
    """Collects every mismatch of a worker as 'case: name: difference' lines.

    Log-probs and entropies must agree to `tol` relative to their scale; the loss, metrics and
    gradients, which options such as VESPO's exponential weights amplify, to `loss_tol`."""

    def __init__(self, tol: float, loss_tol: float):
        self.tol, self.loss_tol, self.lines = tol, loss_tol, []

    def check(self, where: str, name: str, got, want):
        tol = self.tol if name in ("logps", "logp", "entropy") else self.loss_tol
        got, want = torch.as_tensor(got).detach().double(), torch.as_tensor(want).detach().double()
        if got.shape != want.shape:
            self.lines.append(f"{where}: {name}: shape {tuple(got.shape)} != {tuple(want.shape)}")
            return
        if not torch.isfinite(got).all():
            self.lines.append(f"{where}: {name}: non-finite values")
            return
        scale = max(1.0, float(want.abs().max())) if want.numel() else 1.0
        diff = float((got - want).abs().max()) if want.numel() else 0.0
        if diff > tol * scale:
            self.lines.append(f"{where}: {name}: max difference {diff:.3g} (scale {scale:.3g})")

    def outputs(self, where, got, want):
        for name in ("loss", "logps", "entropy", "per_token_loss"):
            self.check(where, name, getattr(got, name), getattr(want, name))
        if set(got.metrics) != set(want.metrics):
            self.lines.append(f"{where}: metric names differ")
        for key in want.metrics:
            self.check(where, f"metric {key}", got.metrics.get(key, float("nan")), want.metrics[key])


def _leaf(x):
    return x.detach().clone().requires_grad_(True)


def parity_worker(rank, world, backend, dtype_name, options, vocab, even, seed):
    """Every option x layout on this rank's slice against the whole vocabulary; the mismatches."""
    import torch.distributed as dist

    group = dist.group.WORLD
    dtype = getattr(torch, dtype_name)
    start, size = slices(vocab, world, even)[rank]
    # Megatron's default vocab_start on even splits; explicit starts on uneven ones.
    where_kw = {} if even else {"vocab_start": start}
    # fp64: to rounding; fp32: the log-probs to ~1e-6, and what the objective amplifies to 1e-5
    # (the tolerance of the fp32 kernels against the fp64 reference elsewhere in the suite).
    found = Mismatches(1e-12, 1e-12) if dtype == torch.float64 else Mismatches(2e-6, 1e-5)
    for i, option in enumerate(options):
        case = make_case(option, b=4, t=5, v=vocab, dtype=dtype, seed=seed + i)
        for layout in LAYOUTS:
            where = f"{option}/{layout}"
            logits, kw = inputs_of(case, layout)
            ids, adv = kw.pop("ids"), kw.pop("advantages")
            common = dict(backend=backend, **kw)

            full = _leaf(logits)
            want = gk.grpo_loss(full, ids, adv, **common)
            want.loss.backward()
            mine = _leaf(logits[..., start:start + size])
            got = gk.grpo_loss(mine, ids, adv, process_group=group, **where_kw, **common)
            got.loss.backward()
            found.outputs(f"{where}/grpo_loss", got, want)
            found.check(f"{where}/grpo_loss", "d_logits slice", mine.grad, full.grad[..., start:start + size])

            hidden, weight, bias = linear_of(logits, seed + i)
            h_full, w_full, b_full = _leaf(hidden), _leaf(weight), _leaf(bias)
            want = gk.fused_linear_grpo_loss(h_full, w_full, ids, adv, bias=b_full, chunk_size=3, **common)
            want.loss.backward()
            # The partial d_hidden (reduce_hidden_grad=False) on every 5th option, padded.
            for reduce in (True, False) if i % 5 == 0 and layout == "padded" else (True,):
                h, w, b = _leaf(hidden), _leaf(weight[start:start + size]), _leaf(bias[start:start + size])
                got = gk.fused_linear_grpo_loss(h, w, ids, adv, bias=b, chunk_size=3, process_group=group,
                                                reduce_hidden_grad=reduce, **where_kw, **common)
                got.loss.backward()
                tag = f"{where}/fused_linear_grpo_loss(reduce_hidden_grad={reduce})"
                found.outputs(tag, got, want)
                d_hidden = h.grad if reduce else _summed(h.grad, group)  # partial sums add up to the whole
                found.check(tag, "d_hidden", d_hidden, h_full.grad)
                found.check(tag, "d_weight slice", w.grad, w_full.grad[start:start + size])
                found.check(tag, "d_bias slice", b.grad, b_full.grad[start:start + size])
        _logprob_parity(found, option, case, start, size, where_kw, group, backend, seed + i)
    return found.lines


def _summed(x, group):
    import torch.distributed as dist

    x = x.clone()
    dist.all_reduce(x, group=group)
    return x


def _logprob_parity(found, option, case, start, size, where_kw, group, backend, seed):
    """selective_logprobs and its fused-linear form, with random upstream gradients on logp and H."""
    cfg = case.config
    transform = dict(temperature=cfg.temperature, logit_scale=cfg.logit_scale,
                     final_logit_softcapping=cfg.final_logit_softcapping)
    g = torch.Generator().manual_seed(seed)
    up_logp = torch.randn(case.ids.shape, generator=g, dtype=torch.float64)
    up_ent = torch.randn(case.ids.shape, generator=g, dtype=torch.float64)

    def run(fn, tensors, **kw):
        logp, ent = fn(*tensors, case.ids, mask=case.mask, return_entropy=True, backend=backend, **transform, **kw)
        ((logp.double() * up_logp).sum() + (ent.double() * up_ent).sum()).backward()
        return logp, ent

    full = _leaf(case.logits)
    want = run(gk.selective_logprobs, (full,))
    mine = _leaf(case.logits[..., start:start + size])
    got = run(gk.selective_logprobs, (mine,), process_group=group, **where_kw)
    where = f"{option}/selective_logprobs"
    found.check(where, "logp", got[0], want[0])
    found.check(where, "entropy", got[1], want[1])
    found.check(where, "d_logits slice", mine.grad, full.grad[..., start:start + size])

    hidden, weight, bias = linear_of(case.logits, seed)
    h_full, w_full, b_full = _leaf(hidden), _leaf(weight), _leaf(bias)
    want = run(gk.fused_linear_selective_logprobs, (h_full, w_full), bias=b_full, chunk_size=4)
    h, w, b = _leaf(hidden), _leaf(weight[start:start + size]), _leaf(bias[start:start + size])
    got = run(gk.fused_linear_selective_logprobs, (h, w), bias=b, chunk_size=4, process_group=group, **where_kw)
    where = f"{option}/fused_linear_selective_logprobs"
    found.check(where, "logp", got[0], want[0])
    found.check(where, "entropy", got[1], want[1])
    found.check(where, "d_hidden", h.grad, h_full.grad)
    found.check(where, "d_weight slice", w.grad, w_full.grad[start:start + size])
    found.check(where, "d_bias slice", b.grad, b_full.grad[start:start + size])


def _assert_no_mismatch(per_rank):
    lines = [f"rank {rank}: {line}" for rank, found in enumerate(per_rank) for line in found]
    assert not lines, "\n".join(lines[:40]) + (f"\n... {len(lines) - 40} more" if len(lines) > 40 else "")


# (world, vocab, even split): 2 ranks with Megatron's default vocab_start; 3 ranks with uneven
# slices of V=1000 (334, 333, 333).
GEOMETRIES = [(2, 1000, True), (3, 1000, False)]


@pytest.mark.parametrize("world,vocab,even", GEOMETRIES, ids=["2ranks_V1000", "3ranks_V1000_uneven"])
@pytest.mark.parametrize("backend,dtype", [("torch", "float64"), ("torch", "float32"), ("cpp", "float32")])
def test_every_option_matches_single_process(world, vocab, even, backend, dtype):
    if backend not in BACKENDS:
        pytest.skip(f"backend {backend} is not available here")
    _assert_no_mismatch(run_ranks(world, parity_worker, backend, dtype, OPTION_IDS, vocab, even, 11))


@pytest.mark.parametrize("world", [2, 3])
def test_gpt2_sized_odd_vocabulary(world):
    """V = 50257 (GPT-2's), split unevenly over 2 or 3 ranks."""
    _assert_no_mismatch(run_ranks(world, parity_worker, "torch", "float64", ("dapo", "everything"), 50257, False, 3))


def test_triton_interpreted_on_tiny_shapes():
    if "triton" not in BACKENDS:
        pytest.skip("triton is not available here")
    _assert_no_mismatch(run_ranks(2, parity_worker, "triton", "float32", TRITON_OPTIONS, 64, True, 5))


def layout_error_worker(rank, world, mode):
    """One bad vocabulary layout on this rank; returns the error text, or 'no error'."""
    import torch.distributed as dist

    case = make_case("dapo", b=2, t=3, v=9, seed=1)
    sizes = {"overlap": [5, 4], "gap": [4, 4], "rows": [5, 4]}[mode]
    starts = {"overlap": None, "gap": [0, 5], "rows": [0, 5]}[mode]  # overlap: default starts 0 and 4
    logits = case.logits[..., :sizes[rank]]
    ids, adv = case.ids, case.advantages
    if mode == "rows" and rank == 1:
        logits, ids = logits[:, :2], ids[:, :2]
    kw = {} if starts is None else {"vocab_start": starts[rank]}
    try:
        gk.grpo_loss(logits, ids, adv, process_group=dist.group.WORLD, **kw)
    except ValueError as exc:
        return f"ValueError: {exc}"
    return "no error"


@pytest.mark.parametrize("mode,words", [
    ("overlap", "ids [4, 5) belong to two ranks"),  # V_local 5 and 4, default vocab_start = rank·V_local
    ("gap", "ids [4, 5) belong to no rank"),
    ("rows", "number of token rows"),
])
def test_bad_layout_raises_on_every_rank_without_hanging(mode, words):
    errors = run_ranks(2, layout_error_worker, mode, timeout=60)
    for rank, text in enumerate(errors):
        assert text.startswith("ValueError") and words in text, f"rank {rank}: {text}"


def sharded_weight_worker(rank, world):
    """A DTensor lm_head (FSDP2 / TP sharded) must not be read as if its local rows were all of it."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    case = make_case("dapo", b=2, t=3, v=8, seed=1)
    hidden, weight, _ = linear_of(case.logits, 1)
    sharded = distribute_tensor(weight, init_device_mesh("cpu", (world,)), [Shard(0)])
    try:
        gk.fused_linear_grpo_loss(hidden, sharded, case.ids, case.advantages)
    except TypeError as exc:
        return str(exc)
    return "no error"


def test_dtensor_lm_head_is_refused():
    for text in run_ranks(2, sharded_weight_worker, timeout=60):
        assert "DTensor" in text and "full_tensor" in text, text


def test_single_process_argument_errors():
    case = make_case("dapo", b=2, t=3, v=8, seed=1)
    with pytest.raises(ValueError, match="vocab_start is only meaningful with process_group"):
        gk.grpo_loss(case.logits, case.ids, case.advantages, vocab_start=4)
    with pytest.raises(TypeError, match="process_group must be a torch.distributed ProcessGroup"):
        gk.grpo_loss(case.logits, case.ids, case.advantages, process_group="tp")


def auto_chunk_worker(rank, world, validate):
    """chunk_size="auto" on uneven slices (334, 333, 333 rows of the lm_head) with a budget that
    gives the wider slice fewer rows per chunk: the ranks must still cut the same chunks."""
    from grpo_kernels import fused_linear

    fused_linear.AUTO_CHUNK_BYTES["cpu"] = 333 * 8 * 5  # 4 rows per chunk for 334 fp64 columns, 5 for 333
    import torch.distributed as dist

    start, size = slices(1000, world, even=False)[rank]
    case = make_case("gspo", b=4, t=5, v=1000, dtype=torch.float64, seed=2)
    hidden, weight, bias = linear_of(case.logits, 2)
    want = gk.fused_linear_grpo_loss(hidden, weight, case.ids, case.advantages, bias=bias, **case.kwargs())
    got = gk.fused_linear_grpo_loss(hidden, weight[start:start + size], case.ids, case.advantages,
                                    bias=bias[start:start + size], process_group=dist.group.WORLD, vocab_start=start,
                                    validate=validate, **case.kwargs())
    return float((got.loss - want.loss).abs())


@pytest.mark.parametrize("validate", [True, False])
def test_auto_chunks_line_up_on_uneven_slices(validate):
    for rank, diff in enumerate(run_ranks(3, auto_chunk_worker, validate, timeout=60)):
        assert diff < 1e-12, f"rank {rank}: loss differs by {diff}"


def compiled_worker(rank, world):
    """grpo_loss on a vocabulary slice inside torch.compile: the eager loss and gradient."""
    import torch.distributed as dist

    case = make_case("trl_defaults_kl", b=2, t=4, v=40, seed=4)
    group = dist.group.WORLD
    start, size = slices(40, world, even=True)[rank]

    def step(x):
        return gk.grpo_loss(x, case.ids, case.advantages, process_group=group, validate=False, **case.kwargs()).loss

    eager_x, compiled_x = (_leaf(case.logits[..., start:start + size]) for _ in range(2))
    eager = step(eager_x)
    eager.backward()
    compiled = torch.compile(step, backend="aot_eager")(compiled_x)
    compiled.backward()
    return float((compiled - eager).abs()), float((compiled_x.grad - eager_x.grad).abs().max())


def test_vocab_parallel_loss_under_torch_compile():
    for rank, (loss_diff, grad_diff) in enumerate(run_ranks(2, compiled_worker, timeout=120)):
        assert loss_diff < 1e-6 and grad_diff < 1e-6, f"rank {rank}: {loss_diff}, {grad_diff}"

"""Truncated sampling (top-k, top-p, min-p) and Σπ² on every backend.

Against the fp64 sort-based oracle (reference.truncation_kept / logprobs_and_entropy): log-probs,
entropies, Σπ² and gradients, each setting alone and combined, with a temperature and a softcap,
ties (bf16-rounded logits, in fp32 and bf16), targets outside the kept set, k >= V and top_p = 1,
padded and packed; the fused-linear path (hidden, weight and bias gradients); grpo_loss and its
module through GRPOLossConfig; the vocabulary-parallel path on 2 and 3 ranks with uneven slices
(one spawn per rank count); and an independent oracle written the way vLLM V1 writes its sampler
(sort-based apply_top_k_top_p and the min-p processor; vLLM itself is not importable here: its
sampler module imports vllm's platform and CUDA machinery), on tie-free inputs.
"""
import pytest
import torch

import grpo_kernels as gk
from conftest import BACKENDS, DEVICE
from distributed import run_ranks
from grpo_kernels import reference as R
from grpo_kernels.ops.dispatch import backend_module
from grpo_kernels.transform import LogitTransform
from grpo_kernels.truncation import make_truncation
from helpers import assert_close, assert_grad_close

V, H = 40, 8
# The interpreted Triton kernels are slow on the CPU: they run each setting once, spread over the
# dtype x layout combinations, and fewer cases elsewhere (SLOW gives the share they run).
SLOW = ("triton",)
# Each setting is paired with one logit transform (the pairs cycle through all three), so every
# backend sees every setting once and every transform several times without a product of both.
TRANSFORMS = {"plain": {}, "temperature": dict(temperature=0.7),
              "softcap": dict(logit_scale=1.3, final_logit_softcapping=3.0)}
SETTINGS = [
    ("min_p", dict(min_p=0.1), "temperature"),
    ("top_k", dict(top_k=6), "softcap"),
    ("top_p", dict(top_p=0.7), "plain"),
    ("combined", dict(top_k=15, top_p=0.85, min_p=0.02), "temperature"),
    ("combined_tight", dict(top_k=4, top_p=0.5, min_p=0.2), "softcap"),
    ("k_at_least_V", dict(top_k=V + 5), "plain"),
    ("top_p_one", dict(top_p=1.0, top_k=V), "softcap"),
    ("off", dict(), "temperature"),
]


def tied_logits(shape, dtype, seed):
    """bf16-rounded logits (values repeat) with explicit ties at the top and a few −inf entries."""
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(*shape, generator=g, dtype=torch.float64) * 2.5).bfloat16().double()
    logits[..., 1] = logits[..., 0]
    top = logits.amax(-1)
    logits[..., 2], logits[..., 3] = top, top  # a tie at the maximum: top_k=1 keeps all three
    logits[..., 7] = float("-inf")
    return logits.to(dtype)


def layout_inputs(layout, dtype, seed):
    """(logits, ids, extra keywords, mask over the flat rows or None) of a padded (B, T, V) batch with
    a mask, or a packed (N, V) one with cu_seqlens."""
    g = torch.Generator().manual_seed(seed + 1)
    if layout == "padded":
        logits = tied_logits((3, 4, V), dtype, seed)
        ids = torch.randint(0, V, (3, 4), generator=g)
        mask = torch.rand(3, 4, generator=g) > 0.3
        mask[0] = True
        ids[ids == 7] = 8
        ids[0, 0] = 7  # a −inf target: never kept by the threshold, kept as the target (log-prob −inf)
        ids = torch.where(mask, ids, -100)  # masked rows may hold any id
        mask[0, 0] = False  # ... but a −inf log-prob must be masked
        return logits, ids, dict(mask=mask.to(DEVICE)), mask
    logits = tied_logits((10, V), dtype, seed)
    ids = torch.randint(0, V, (10,), generator=g)
    ids[ids == 7] = 8
    cu = torch.tensor([0, 3, 3, 10], dtype=torch.int32)
    return logits, ids, dict(cu_seqlens=cu.to(DEVICE)), None


def oracle(logits, ids, setting, transform, mask=None):
    """fp64 reference log-prob, entropy, Σπ² (0 where masked) and the leaf for its gradient."""
    leaf = logits.detach().double().cpu().requires_grad_(True)
    safe = ids.cpu().clamp(0, logits.shape[-1] - 1)
    logp, entropy, sum_pi_sq = R.logprobs_and_entropy(leaf, safe, **_reference_transform(transform),
                                                      with_sum_pi_squared=True, **setting)
    if mask is not None:
        logp, entropy, sum_pi_sq = (torch.where(mask.cpu(), x, 0.0) for x in (logp, entropy, sum_pi_sq))
    return logp, entropy, sum_pi_sq, leaf


def _reference_transform(transform):
    kw = TRANSFORMS[transform]
    return dict(temperature=kw.get("temperature", 1.0), logit_scale=kw.get("logit_scale", 1.0),
                softcap=kw.get("final_logit_softcapping"))


def kept_set(logits, ids, setting, transform):
    """The oracle's kept set (the target included)."""
    z = R.transformed_logits(logits.double().cpu(), **_reference_transform(transform))
    return R.truncation_kept(z, ids.cpu().clamp(0, logits.shape[-1] - 1), **setting)


def upstream(shape, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64), torch.randn(shape, generator=g, dtype=torch.float64))


def tolerances(dtype):
    """(statistics, gradient) tolerances: fp32 kernels to ~1e-5; bf16 gradients are rounded to bf16."""
    return (2e-5, 2e-5) if dtype != torch.bfloat16 else (2e-5, 1e-2)


@pytest.mark.parametrize("layout", ["padded", "packed"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_selective_logprobs_against_the_oracle(backend, dtype, layout):
    stat_tol, grad_tol = tolerances(dtype)
    outside = 0
    combo = [torch.float32, torch.bfloat16].index(dtype) * 2 + ["padded", "packed"].index(layout)
    for i, (name, setting, transform) in enumerate(SETTINGS):
        if backend in SLOW and i % 4 != combo:
            continue
        logits, ids, kw, mask = layout_inputs(layout, dtype, seed=i)
        want_logp, want_ent, want_sq, leaf = oracle(logits, ids, setting, transform, mask)
        x = logits.clone().to(DEVICE).requires_grad_(True)
        logp, entropy, sum_pi_sq = gk.selective_logprobs(
            x, ids.to(DEVICE), return_entropy=True, return_sum_pi_squared=True, backend=backend,
            **TRANSFORMS[transform], **setting, **kw)
        g_logp, g_ent = upstream(ids.shape, seed=i)
        ((logp.double().cpu() * g_logp).sum() + (entropy.double().cpu() * g_ent).sum()).backward()
        ((want_logp * g_logp).sum() + (want_ent * g_ent).sum()).backward()
        where = f"{backend}/{layout}/{name}"
        assert_close(logp, want_logp, rtol=stat_tol, atol=stat_tol, name=f"{where}: logp")
        assert_close(entropy, want_ent, rtol=stat_tol, atol=stat_tol, name=f"{where}: entropy")
        assert_close(sum_pi_sq, want_sq, rtol=stat_tol, atol=stat_tol, name=f"{where}: sum_pi_squared")
        assert sum_pi_sq.dtype == torch.float32 and not sum_pi_sq.requires_grad
        assert_grad_close(x.grad.double().cpu(), leaf.grad, rel=grad_tol, name=f"{where}: d_logits")
        kept = kept_set(logits, ids, setting, transform)
        dropped = ~kept if mask is None else ~kept & mask.cpu().unsqueeze(-1)
        assert torch.equal(x.grad.cpu()[dropped], torch.zeros_like(x.grad.cpu()[dropped])), \
            f"{where}: gradient outside the kept set"
        undrawable = ~_kept_without_target(logits, setting, transform).gather(-1, ids.clamp(0, V - 1).unsqueeze(-1))
        outside += int((undrawable.squeeze(-1) & (True if mask is None else mask)).sum())
    assert outside > 0, "some targets must lie outside the sampler's kept set"


def _kept_without_target(logits, setting, transform):
    """The sampler's kept set alone (the oracle's, with the target id moved to a column it keeps anyway)."""
    z = R.transformed_logits(logits.double().cpu(), **_reference_transform(transform))
    return R.truncation_kept(z, z.argmax(-1), **setting)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_linear_against_the_oracle(backend):
    """fused_linear_selective_logprobs: logp, entropy, Σπ² and the hidden, weight and bias gradients
    (chunks of 5 rows, each finding its rows' thresholds), padded with a mask."""
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(3, 4, H, generator=g, dtype=torch.float64)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64) * 0.8
    bias = torch.randn(V, generator=g, dtype=torch.float64)
    ids = torch.randint(0, V, (3, 4), generator=g)
    mask = torch.rand(3, 4, generator=g) > 0.3
    for i, (name, setting, transform) in enumerate(SETTINGS[:5]):
        if backend in SLOW and name not in ("combined", "combined_tight"):
            continue
        leaves = [t.clone().requires_grad_(True) for t in (hidden, weight, bias)]
        logits = leaves[0] @ leaves[1].T + leaves[2]
        logp, entropy, sum_pi_sq = R.logprobs_and_entropy(logits, ids, **_reference_transform(transform),
                                                          with_sum_pi_squared=True, **setting)
        ours = [t.float().to(DEVICE).requires_grad_(True) for t in (hidden, weight, bias)]
        got = gk.fused_linear_selective_logprobs(ours[0], ours[1], ids.to(DEVICE), bias=ours[2], mask=mask.to(DEVICE),
                                                 return_entropy=True, return_sum_pi_squared=True, chunk_size=5,
                                                 backend=backend, **TRANSFORMS[transform], **setting)
        g_logp, g_ent = upstream(ids.shape, seed=10 + i)
        g_logp, g_ent = g_logp * mask, g_ent * mask
        ((logp * g_logp).sum() + (entropy * g_ent).sum()).backward()
        ((got[0].double().cpu() * g_logp).sum() + (got[1].double().cpu() * g_ent).sum()).backward()
        where = f"{backend}/fused_linear/{name}"
        for label, value, want in zip(("logp", "entropy", "sum_pi_squared"), got, (logp, entropy, sum_pi_sq)):
            assert_close(value, torch.where(mask, want, 0.0), rtol=2e-5, atol=2e-5, name=f"{where}: {label}")
        for label, mine, theirs in zip(("d_hidden", "d_weight", "d_bias"), ours, leaves):
            assert_grad_close(mine.grad.double().cpu(), theirs.grad, rel=5e-5, name=f"{where}: {label}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_grpo_loss_through_the_config(backend):
    """grpo_loss(top_k=..., top_p=..., min_p=...) (config fields), its module form and the fused-linear
    loss: the objective of the oracle's truncated log-probs (loss, log-probs, gradient)."""
    setting = dict(top_k=12, top_p=0.8, min_p=0.03)
    logits, ids, kw, mask = layout_inputs("packed", torch.float32, seed=21)
    adv = torch.tensor([1.0, -0.5, 0.7]).to(DEVICE)
    leaf = logits.double().requires_grad_(True)
    want_logp, _ = R.logprobs_and_entropy(leaf, ids, temperature=0.9, **setting)
    old = (want_logp.detach() + 0.1 * torch.randn(ids.shape, generator=torch.Generator().manual_seed(2),
                                                  dtype=torch.float64)).float()
    common = dict(old_logps=old.to(DEVICE), **kw)
    want = gk.grpo_loss_from_logprobs(want_logp, adv.double().cpu(), old_logps=old, cu_seqlens=kw["cu_seqlens"].cpu(),
                                      temperature=0.9, backend="torch")
    want.loss.backward()
    x = logits.clone().to(DEVICE).requires_grad_(True)
    got = gk.grpo_loss(x, ids.to(DEVICE), adv, backend=backend, temperature=0.9, **setting, **common)
    got.loss.backward()
    assert_close(got.loss, want.loss, rtol=2e-5, atol=1e-6, name="loss")
    assert_close(got.logps, want_logp, rtol=2e-5, atol=2e-5, name="logps")
    assert_grad_close(x.grad.double().cpu(), leaf.grad, rel=5e-5, name="d_logits")
    if backend in SLOW:  # the module and fused-linear forms only pass the settings on: wiring, not kernels
        return
    module = gk.GRPOLoss(gk.GRPOLossConfig(temperature=0.9, **setting), backend=backend)
    assert_close(module(logits.to(DEVICE), ids.to(DEVICE), adv, **common).loss, want.loss, rtol=2e-5, atol=1e-6,
                 name="GRPOLoss")
    hidden = torch.randn(10, H, generator=torch.Generator().manual_seed(4))
    weight = torch.randn(V, H, generator=torch.Generator().manual_seed(5))
    fused = gk.FusedLinearGRPOLoss(gk.GRPOLossConfig(temperature=0.9, **setting), backend=backend, chunk_size=4)(
        hidden.to(DEVICE), weight.to(DEVICE), ids.to(DEVICE), adv, **common)
    plain = gk.grpo_loss((hidden @ weight.T).to(DEVICE), ids.to(DEVICE), adv, backend=backend, temperature=0.9,
                         **setting, **common)
    assert_close(fused.loss, plain.loss, rtol=2e-5, atol=1e-6, name="FusedLinearGRPOLoss")
    assert_close(fused.logps, plain.logps, rtol=2e-5, atol=2e-5, name="fused-linear logps")


# ----------------------------------------------------------------------------------------
# vLLM V1's sampler, written here as vLLM writes it (an independent, sort-based oracle)
# ----------------------------------------------------------------------------------------

def vllm_min_p(logits, min_p):
    """vLLM's min-p logits processor: drop tokens whose probability is below min_p · the largest."""
    probs = torch.softmax(logits, dim=-1)
    max_probs = probs.amax(dim=-1, keepdim=True)
    return logits.masked_fill(probs < min_p * max_probs, float("-inf"))


def vllm_apply_top_k_top_p(logits, k, p):
    """vLLM V1's apply_top_k_top_p (vllm/v1/sample/ops/topk_topp_sampler.py): sort ascending, mask
    below the k-th largest, then the ascending cumulative probability <= 1 − p (the last kept)."""
    logits_sort, logits_idx = logits.sort(dim=-1, descending=False)
    if k is not None:
        top_k_mask = logits_sort.size(1) - k.to(torch.long)
        top_k_mask = logits_sort.gather(1, top_k_mask.unsqueeze(dim=1))
        logits_sort.masked_fill_(logits_sort < top_k_mask, -float("inf"))
    if p is not None:
        probs_sum = logits_sort.softmax(dim=-1).cumsum(dim=-1)
        top_p_mask = probs_sum <= 1 - p.unsqueeze(dim=1)
        top_p_mask[:, -1] = False
        logits_sort.masked_fill_(top_p_mask, -float("inf"))
    return logits_sort.scatter(dim=-1, index=logits_idx, src=logits_sort)


def vllm_processed_logits(logits, temperature, top_k, top_p, min_p):
    """Temperature, then min-p, then top-k and top-p: the order of vLLM V1's Sampler."""
    z = logits.double() / temperature
    if min_p:
        z = vllm_min_p(z, min_p)
    rows = z.shape[0]
    k = torch.full((rows,), top_k) if top_k else None
    p = torch.full((rows,), top_p, dtype=torch.float64) if top_p is not None else None
    return vllm_apply_top_k_top_p(z, k, p)


VLLM_SETTINGS = [dict(top_k=5), dict(top_p=0.8), dict(min_p=0.05), dict(top_k=10, top_p=0.9),
                 dict(top_k=25, top_p=0.7, min_p=0.01)]


@pytest.mark.parametrize("backend", BACKENDS)
def test_against_vllms_sampler_on_tie_free_logits(backend):
    """Each backend's own threshold gives vLLM's kept set exactly, and its log-probs are vLLM's
    processed_logprobs (with the target added back where the sampler would have dropped it)."""
    g = torch.Generator().manual_seed(7)
    rows = 6 if backend in SLOW else 12
    logits = (torch.randn(rows, V, generator=g, dtype=torch.float64) * 2).float()  # distinct values
    ids = torch.randint(0, V, (rows,), generator=g)
    temperature = 0.8
    for setting in VLLM_SETTINGS[-2:] if backend in SLOW else VLLM_SETTINGS:
        full = {**dict(top_k=None, top_p=None, min_p=None), **setting}
        processed = vllm_processed_logits(logits, temperature, full["top_k"], full["top_p"], full["min_p"])
        vllm_kept = torch.isfinite(processed)
        truncation = make_truncation(**setting)
        got, _, _, threshold, _ = backend_module(backend).logprobs_forward(
            logits.to(DEVICE), ids.to(DEVICE), LogitTransform(temperature).kernel, False, truncation=truncation)
        ours = logits.double() >= threshold.double().cpu().unsqueeze(-1)
        assert torch.equal(ours, vllm_kept), f"{backend} {setting}: kept set differs from vLLM's"
        with_target = torch.where(vllm_kept | torch.nn.functional.one_hot(ids, V).bool(), logits.double() / temperature,
                                  float("-inf"))
        want = torch.log_softmax(with_target, -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
        assert_close(got, want, rtol=1e-5, atol=1e-5, name=f"{backend} {setting}: logp")


# ----------------------------------------------------------------------------------------
# Vocabulary-parallel: 2 and 3 ranks, uneven slices, one spawn per rank count
# ----------------------------------------------------------------------------------------

PARALLEL_SETTINGS = [dict(top_k=6), dict(top_p=0.7, temperature=0.8), dict(min_p=0.1, final_logit_softcapping=3.0),
                     dict(top_k=15, top_p=0.85, min_p=0.02), dict()]


def _slices(vocab, world):
    sizes = [vocab // world + (1 if k < vocab % world else 0) for k in range(world)]
    return [(sum(sizes[:k]), sizes[k]) for k in range(world)]


def parallel_worker(rank, world, backends):
    """Every setting on this rank's slice against the same backend on the whole vocabulary; the
    mismatches as lines."""
    import torch.distributed as dist

    group = dist.group.WORLD
    vocab = 3 * V // 2 + 1  # 61: 31 + 30 on 2 ranks, 21 + 20 + 20 on 3
    start, size = _slices(vocab, world)[rank]
    lines = []

    def check(where, got, want, tol):
        got, want = got.detach().double(), want.detach().double()
        scale = max(1.0, float(want.abs().max()))
        if got.shape != want.shape:
            lines.append(f"{where}: shape {tuple(got.shape)} != {tuple(want.shape)}")
        elif not (bool(torch.isfinite(got).all()) and bool(torch.isfinite(want).all())) \
                or float((got - want).abs().max()) > tol * scale:  # a NaN on either side fails
            lines.append(f"{where}: max difference {float((got - want).abs().max()):.3g}")

    for backend in backends:
        settings = PARALLEL_SETTINGS if backend not in SLOW else PARALLEL_SETTINGS[3:4]
        for i, setting in enumerate(settings):
            where = f"{backend}/{setting}"
            logits = tied_logits((2, 3, vocab), torch.float32, seed=30 + i)
            logits[..., 7] = 0.5  # no −inf target here
            g = torch.Generator().manual_seed(40 + i)
            ids = torch.randint(0, vocab, (2, 3), generator=g)
            g_logp, g_ent = torch.randn(2, 3, generator=g), torch.randn(2, 3, generator=g)
            outs = []
            # The interpreted Triton kernels run the slice only, against the torch backend's whole
            # vocabulary (the fused-linear and loss wiring below is the same for every backend).
            for part, name in ((logits, "torch" if backend in SLOW else backend), (logits[..., start:start + size],
                                                                                  backend)):
                x = part.clone().requires_grad_(True)
                extra = dict(process_group=group, vocab_start=start) if part is not logits else {}
                logp, ent, sq = gk.selective_logprobs(x, ids, return_entropy=True, return_sum_pi_squared=True,
                                                      backend=name, **setting, **extra)
                ((logp * g_logp).sum() + (ent * g_ent).sum()).backward()
                outs.append((logp, ent, sq, x.grad))
            (want, got) = outs
            for name, a, b in zip(("logp", "entropy", "sum_pi_squared"), got[:3], want[:3]):
                check(f"{where}: selective_logprobs {name}", a, b, 2e-6)
            check(f"{where}: d_logits slice", got[3], want[3][..., start:start + size], 1e-5)
            if backend in SLOW:
                continue

            hidden = torch.randn(6, H, generator=g)
            weight, bias = torch.randn(vocab, H, generator=g), torch.randn(vocab, generator=g)
            flat_ids = ids.reshape(-1)
            outs = []
            for lo, hi, extra in ((0, vocab, {}), (start, start + size, dict(process_group=group, vocab_start=start))):
                leaves = [t.clone().requires_grad_(True) for t in (hidden, weight[lo:hi], bias[lo:hi])]
                logp, ent, sq = gk.fused_linear_selective_logprobs(
                    leaves[0], leaves[1], flat_ids, bias=leaves[2], return_entropy=True, return_sum_pi_squared=True,
                    chunk_size=4, backend=backend, **setting, **extra)
                ((logp * g_logp.reshape(-1)).sum() + (ent * g_ent.reshape(-1)).sum()).backward()
                outs.append((logp, ent, sq) + tuple(t.grad for t in leaves))
            (want, got) = outs
            for name, a, b in zip(("logp", "entropy", "sum_pi_squared", "d_hidden"), got[:4], want[:4]):
                check(f"{where}: fused_linear_selective_logprobs {name}", a, b, 1e-5)
            check(f"{where}: fused-linear d_weight slice", got[4], want[4][start:start + size], 1e-5)
            check(f"{where}: fused-linear d_bias slice", got[5], want[5][start:start + size], 1e-5)

            cu = torch.tensor([0, 2, 6], dtype=torch.int32)
            adv = torch.tensor([0.8, -1.1])
            packed = logits.reshape(-1, vocab)
            losses = []
            for part, extra in ((packed, {}), (packed[:, start:start + size],
                                               dict(process_group=group, vocab_start=start))):
                x = part.clone().requires_grad_(True)
                out = gk.grpo_loss(x, flat_ids, adv, cu_seqlens=cu, backend=backend, **setting, **extra)
                out.loss.backward()
                losses.append((out.loss, out.logps, x.grad))
                rows = slice(start, start + size) if extra else slice(0, vocab)
                lin = gk.fused_linear_grpo_loss(hidden, weight[rows], flat_ids, adv, cu_seqlens=cu, chunk_size=4,
                                                backend=backend, **setting, **extra)
                losses.append((lin.loss, lin.logps, None))
            want, want_lin, got, got_lin = losses
            check(f"{where}: grpo_loss loss", got[0], want[0], 1e-5)
            check(f"{where}: grpo_loss logps", got[1], want[1], 2e-6)
            check(f"{where}: grpo_loss d_logits slice", got[2], want[2][:, start:start + size], 1e-5)
            check(f"{where}: fused_linear_grpo_loss loss", got_lin[0], want_lin[0], 1e-5)
            check(f"{where}: fused_linear_grpo_loss logps", got_lin[1], want_lin[1], 2e-6)
    return lines


@pytest.mark.parametrize("world", [2, 3])
def test_vocab_parallel_uneven_slices(world):
    """The thresholds are found across ranks (per-row maxima, minima and histograms all-reduced)
    and every rank gets the whole vocabulary's numbers and its slice's gradient."""
    per_rank = run_ranks(world, parallel_worker, [b for b in BACKENDS if b != "cuda"], timeout=300)
    lines = [f"rank {rank}: {line}" for rank, found in enumerate(per_rank) for line in found]
    assert not lines, "\n".join(lines[:30])


# ----------------------------------------------------------------------------------------
# Arguments
# ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,words", [
    (dict(top_k=-1), "top_k must be a non-negative int"), (dict(top_k=2.5), "top_k must be a non-negative int"),
    (dict(top_p=0.0), "top_p must be in (0, 1]"), (dict(top_p=1.5), "top_p must be in (0, 1]"),
    (dict(min_p=-0.1), "min_p must be in [0, 1]"), (dict(min_p=True), "min_p must be in [0, 1]"),
])
def test_bad_settings_name_the_argument(kwargs, words):
    logits, ids = torch.randn(2, 3, V), torch.zeros(2, 3, dtype=torch.long)
    hidden, weight = torch.randn(2, 3, H), torch.randn(V, H)
    for call in (lambda: gk.selective_logprobs(logits, ids, **kwargs),
                 lambda: gk.fused_linear_selective_logprobs(hidden, weight, ids, **kwargs),
                 lambda: gk.grpo_loss(logits, ids, torch.zeros(2), **kwargs)):
        with pytest.raises(ValueError, match=words.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")
                           .replace("]", r"\]")):
            call()


def test_sampler_settings_take_vllm_off_values():
    """TRL's and verl's drop-ins read the sampler's settings through sampler_truncation: vLLM's
    top_k = -1 is off and a whole-number float is that int; anything else is refused as
    make_truncation refuses it, naming the value given."""
    from grpo_kernels.truncation import NO_TRUNCATION, Truncation, sampler_truncation

    assert sampler_truncation(top_k=-1, top_p=1.0, min_p=0.0) == NO_TRUNCATION
    assert sampler_truncation(top_k=-1.0, top_p=0.9) == Truncation(0, 0.9, 0.0)
    assert sampler_truncation(top_k=50.0, min_p=None) == Truncation(50, 1.0, 0.0)
    for bad in (-2, True, 50.9, -0.5, -1.5, "7"):
        with pytest.raises(ValueError, match=f"top_k must be a non-negative int .*got {bad!r}"):
            sampler_truncation(top_k=bad)


def test_config_fields_accept_none_as_off():
    config = gk.GRPOLossConfig(top_k=None, top_p=None, min_p=None)
    assert not config.truncation.active
    assert gk.GRPOLossConfig(top_p=0.9).truncation.top_p == 0.9


def test_compiles_without_graph_breaks():
    """torch.compile(fullgraph=True) of the truncated log-probs with Σπ² and the truncated loss:
    the settings are constants of the graph, the thresholds stay on the device (one backend: the
    wrapper code traced is the same for all)."""
    backend = [b for b in BACKENDS if b not in SLOW][-1]
    logits, ids, kw, _ = layout_inputs("packed", torch.float32, seed=5)
    logits, ids = logits.to(DEVICE), ids.to(DEVICE)
    adv = torch.tensor([1.0, -0.5, 0.7], device=DEVICE)
    setting = dict(top_k=12, top_p=0.8, min_p=0.03)

    def step(x):
        logp, sum_pi_sq = gk.selective_logprobs(x, ids, return_sum_pi_squared=True, backend=backend, validate=False,
                                                **setting)
        loss = gk.grpo_loss(x, ids, adv, backend=backend, validate=False, **setting, **kw).loss
        return logp, sum_pi_sq, loss

    torch._dynamo.reset()
    eager_x, compiled_x = (logits.clone().requires_grad_(True) for _ in range(2))
    eager, traced = step(eager_x), torch.compile(step, backend="aot_eager", fullgraph=True)(compiled_x)
    for a, b in zip(eager, traced):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)
    eager[2].backward()
    traced[2].backward()
    torch.testing.assert_close(compiled_x.grad, eager_x.grad, rtol=1e-6, atol=1e-8)

"""The Triton backend's truncation-aware log-probs (top-k, top-p, min-p; ops/triton/logprobs.py)
against the fp64 sort-based oracle (reference.truncation_kept, reference.logprobs_and_entropy):
the kept set through the returned raw-logit threshold, log-prob, entropy, lse, Σπ² and the
gradient. The kernels are called directly (grpo_kernels.ops.triton); the cross-backend tests
are tests/test_truncation.py. Outputs are allocated poisoned (NaN) so that an unwritten
element fails."""
import pytest
import torch

from grpo_kernels import reference as R
from grpo_kernels.ops.triton import logprobs as triton_logprobs
from grpo_kernels.transform import kernel_transform
from grpo_kernels.truncation import NO_TRUNCATION, make_truncation
from helpers import DEVICE, assert_close, assert_grad_close
from test_poisoned_outputs import poisoned_allocations  # noqa: F401  (fixture)

V = 150
NEG_INF = float("-inf")


def _rows(dtype, seed, n=5, strided=False):
    """Logits (n, V), or a (2, n/2, V) slice with a time stride of V·(n/2 + 1) when strided, and ids.
    Values are bf16-rounded (ties); row 0 has −inf entries, row 1's target is its smallest logit
    (outside the kept set), row 2 has its target at the maximum."""
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(n, V, generator=g) * 2.5).bfloat16().float()
    logits[0, torch.randperm(V, generator=g)[:10]] = NEG_INF
    ids = torch.randint(0, V, (n,), generator=g)
    ids[0] = int(torch.isfinite(logits[0]).nonzero()[0])
    ids[1] = int(logits[1].argmin())
    ids[2] = int(logits[2].argmax())
    logits = logits.to(dtype)
    if strided:
        assert n % 2 == 0
        padded = torch.full((2, n // 2 + 1, V), float("nan"), dtype=dtype)
        padded[:, :-1] = logits.view(2, n // 2, V)
        logits = padded[:, :-1]  # read in place: rows (b, t) with stride_b = (n/2 + 1)·V
    return logits.to(DEVICE), ids.to(DEVICE)


def _oracle(logits, ids, transform, trunc=None, kept=None):
    """fp64 (logp, entropy, lse, Σπ², kept set) over the oracle's kept set (or the one given)."""
    x = logits.reshape(-1, logits.shape[-1]).double().cpu()
    ids = ids.cpu()
    z = R.transformed_logits(x, **transform)
    if kept is None:
        kept = R.truncation_kept(z, ids, **trunc._asdict())
    zk = z.masked_fill(~kept, NEG_INF)
    lse = torch.logsumexp(zk, -1)
    logp = zk.gather(-1, ids.unsqueeze(-1)).squeeze(-1) - lse
    p = torch.exp(zk - lse[:, None])
    entropy = -(p * (zk - lse[:, None]).masked_fill(p == 0, 0.0)).sum(-1)
    return logp, entropy, lse, (p * p).sum(-1), kept


def _tau(transform):
    """The kernels' (scale, cap) for the reference's transform keywords."""
    return kernel_transform(transform.get("temperature", 1.0), transform.get("logit_scale", 1.0),
                            transform.get("softcap"))


def _kept_by_threshold(logits, ids, threshold):
    """K = {v : z_v >= threshold} ∪ {y}, as the contract defines it."""
    x = logits.reshape(-1, logits.shape[-1]).float().cpu()
    return (x >= threshold.cpu()[:, None]) | torch.nn.functional.one_hot(ids.cpu(), x.shape[-1]).bool()


# Several vocabulary tiles per row (V = 150 is one tile of the default size), and for top-k 16
# position classes of 10 entries (with V <= the classes, the top-k bound is the exact k-th largest).
TILED = {"MAX_BLOCK_V": 64}
# (dtype, truncation, transform, strided, module settings for the case)
CASES = {
    "top_k_1": (torch.float32, dict(top_k=1), dict(temperature=0.7), False, {}),  # the max's ties kept
    "top_k_tiled": (torch.bfloat16, dict(top_k=7), dict(softcap=2.0), False, dict(TILED, TOP_K_CLASSES=16)),
    # k above the number of position classes: no pass-1 bound, every entry is a candidate
    "top_k_above_classes": (torch.float32, dict(top_k=7), {}, False, dict(TILED, TOP_K_CLASSES=4)),
    "top_p_softcap": (torch.bfloat16, dict(top_p=0.8), dict(softcap=3.0), False, {}),
    "min_p": (torch.float32, dict(min_p=0.05), dict(temperature=1.3, softcap=2.0), False, {}),
    "all_three_strided_tiled": (torch.bfloat16, dict(top_k=12, top_p=0.9, min_p=0.02), dict(temperature=0.8), True,
                                TILED),
    "top_p_min_p_tiled": (torch.float32, dict(top_p=0.6, min_p=0.1), dict(logit_scale=1.5), False, TILED),
    "top_k_past_the_finite": (torch.bfloat16, dict(top_k=V - 3), {}, False, {}),
    # more candidates than the scratch holds: the select reads the whole row
    "all_three_whole_row": (torch.float32, dict(top_k=12, top_p=0.7, min_p=0.01), dict(softcap=4.0), False,
                            dict(SEARCH_CAPACITY=3)),
    "top_p_whole_row_tiled": (torch.bfloat16, dict(top_p=0.95), {}, True, dict(TILED, SEARCH_CAPACITY=2)),
    # the other pairs: the search's runtime branches take every one of the seven combinations
    "top_k_top_p": (torch.float32, dict(top_k=9, top_p=0.75), dict(softcap=3.0), False, {}),
    "top_k_min_p_whole_row": (torch.bfloat16, dict(top_k=6, min_p=0.1), dict(temperature=0.9), False,
                              dict(SEARCH_CAPACITY=3)),
    "top_k_min_p_tiled": (torch.float32, dict(top_k=15, min_p=0.2), {}, True, TILED),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_forward_matches_the_sort_oracle(case, monkeypatch, poisoned_allocations):  # noqa: F811
    dtype, trunc_kw, transform, strided, settings = CASES[case]
    for name, value in settings.items():
        monkeypatch.setattr(triton_logprobs, name, value)
    logits, ids = _rows(dtype, seed=len(case), n=6 if strided else 5, strided=strided)
    trunc = make_truncation(**trunc_kw)
    logp, entropy, lse, threshold, sum_pi_sq = triton_logprobs.logprobs_forward(logits, ids, _tau(transform), True,
                                                                                trunc, with_sum_pi_sq=True)
    want_logp, want_entropy, want_lse, want_sq, kept = _oracle(logits, ids, transform, trunc)
    x = logits.reshape(-1, V).float().cpu()
    for row, thr in enumerate(threshold.cpu()):  # an exact logit of the row, or −inf
        assert thr == NEG_INF or bool((x[row] == thr).any()), f"row {row}: threshold {thr} is not a logit of the row"
    assert torch.equal(_kept_by_threshold(logits, ids, threshold), kept), "kept set differs from the oracle's"
    assert kept.sum() < kept.numel() - 10, "the truncation keeps everything: the case tests nothing"
    assert_close(logp, want_logp, rtol=1e-5, atol=1e-5, name="logp")
    assert_close(entropy, want_entropy, rtol=1e-5, atol=1e-5, name="entropy")
    assert_close(lse, want_lse, rtol=1e-5, atol=1e-5, name="lse")
    assert_close(sum_pi_sq, want_sq, rtol=1e-5, atol=1e-6, name="sum_pi_sq")


def test_forward_outputs_zero_when_not_asked(poisoned_allocations):  # noqa: F811
    logits, ids = _rows(torch.float32, seed=4)
    trunc = make_truncation(top_p=0.7)
    logp, entropy, lse, threshold, sum_pi_sq = triton_logprobs.logprobs_forward(logits, ids, kernel_transform(1.0),
                                                                                False, trunc)
    assert torch.equal(entropy, torch.zeros_like(entropy)) and torch.equal(sum_pi_sq, torch.zeros_like(sum_pi_sq))
    want_logp, _, want_lse, _, kept = _oracle(logits, ids, {}, trunc)
    assert torch.equal(_kept_by_threshold(logits, ids, threshold), kept)
    assert_close(logp, want_logp, rtol=1e-5, atol=1e-5, name="logp")
    assert_close(lse, want_lse, rtol=1e-5, atol=1e-5, name="lse")


@pytest.mark.parametrize("trunc_kw", [dict(top_p=0.5), dict(top_k=3, min_p=0.2), dict(min_p=0.5)])
def test_a_row_with_no_finite_logit(trunc_kw, poisoned_allocations):  # noqa: F811
    """The contract: lse = −inf, H = 0, Σπ² = 0; the threshold is −inf (every entry is −inf)."""
    logits = torch.full((2, V), NEG_INF, device=DEVICE)
    logits[1, 7] = 1.0
    ids = torch.tensor([3, 7], device=DEVICE)
    logp, entropy, lse, threshold, sum_pi_sq = triton_logprobs.logprobs_forward(
        logits, ids, kernel_transform(1.0), True, make_truncation(**trunc_kw), with_sum_pi_sq=True)
    assert logp[0] == NEG_INF and lse[0] == NEG_INF and entropy[0] == 0 and sum_pi_sq[0] == 0
    assert threshold[0] == NEG_INF
    # one finite logit: it alone is kept, with probability 1
    assert threshold[1] == 1.0 and logp[1] == 0 and lse[1] == 1.0 and entropy[1] == 0 and sum_pi_sq[1] == 1
    # and no NaN in the backward: p = 0 everywhere in row 0 (only the target's one-hot term, as the
    # backward has always given a −inf target), p = 1 on the one entry of row 1
    ones = torch.ones(2, device=DEVICE)
    out = triton_logprobs.logprobs_backward(logits, ids, lse, entropy, ones, ones, kernel_transform(1.0),
                                            torch.full_like(logits, float("nan")), threshold=threshold)
    assert torch.isfinite(out).all()
    out[0, 3] = 0.0
    assert torch.equal(out, torch.zeros_like(out))


@pytest.mark.parametrize("trunc_kw", [dict(top_k=V), dict(top_k=V + 5), dict(top_p=1.0)])
def test_settings_that_keep_everything_are_the_plain_pass(trunc_kw, poisoned_allocations):  # noqa: F811
    logits, ids = _rows(torch.bfloat16, seed=5)
    tau = kernel_transform(0.9)
    got = triton_logprobs.logprobs_forward(logits, ids, tau, True, make_truncation(**trunc_kw), with_sum_pi_sq=True)
    plain = triton_logprobs.logprobs_forward(logits, ids, tau, True, NO_TRUNCATION, with_sum_pi_sq=True)
    assert torch.equal(got[3], torch.full_like(got[3], NEG_INF))
    for a, b in zip(got, plain):
        assert torch.equal(a, b)
    want_logp, want_entropy, _, want_sq, _ = _oracle(logits, ids, dict(temperature=0.9),
                                                     kept=torch.ones(ids.numel(), V, dtype=torch.bool))
    assert_close(got[0], want_logp, rtol=1e-5, atol=1e-5, name="logp")
    assert_close(got[1], want_entropy, rtol=1e-5, atol=1e-5, name="entropy")
    assert_close(got[4], want_sq, rtol=1e-5, atol=1e-6, name="sum_pi_sq")


def test_given_threshold_is_used_as_is(poisoned_allocations):  # noqa: F811
    """The vocabulary-parallel path: the threshold comes from across ranks, no search. Row 3's target
    is in another slice (id −1); row 4's threshold is above every logit of the slice."""
    logits, ids = _rows(torch.float32, seed=6)
    x = logits.float().cpu()
    threshold = x.sort(-1, descending=True).values[:, 20].clone()  # a logit of the row: ties at it kept
    threshold[0] = NEG_INF
    threshold[4] = x[4].max() + 1.0
    ids = ids.clone()
    ids[3] = -1
    ids[4] = -1
    transform = dict(temperature=1.2, softcap=2.5)
    logp, entropy, lse, thr_out, sum_pi_sq = triton_logprobs.logprobs_forward(
        logits, ids, _tau(transform), True, make_truncation(top_p=0.5), threshold=threshold.to(DEVICE),
        with_sum_pi_sq=True)
    assert torch.equal(thr_out.cpu(), threshold)
    kept = (x >= threshold[:, None]) | torch.nn.functional.one_hot(ids.clamp(min=0), V).bool() & (ids[:, None] >= 0)
    want_logp, want_entropy, want_lse, want_sq, _ = _oracle(logits, ids.clamp(min=0), transform, kept=kept)
    rows = [0, 1, 2]  # targets in the slice
    assert_close(logp[rows], want_logp[rows], rtol=1e-5, atol=1e-5, name="logp")
    assert_close(lse[:4], want_lse[:4], rtol=1e-5, atol=1e-5, name="lse")
    assert_close(entropy[:4], want_entropy[:4], rtol=1e-5, atol=1e-5, name="entropy")
    assert_close(sum_pi_sq[:4], want_sq[:4], rtol=1e-5, atol=1e-6, name="sum_pi_sq")
    # nothing of the slice kept: lse = −inf, H = 0, Σπ² = 0 (the contract)
    assert lse[4] == NEG_INF and entropy[4] == 0 and sum_pi_sq[4] == 0


@pytest.mark.parametrize("dtype,trunc_kw,transform", [
    (torch.float32, dict(top_k=10, top_p=0.85, min_p=0.03), dict(softcap=3.0, temperature=0.9)),
    (torch.bfloat16, dict(top_p=0.7), dict(temperature=1.1)),
])
def test_backward_matches_autograd_of_the_oracle(dtype, trunc_kw, transform, monkeypatch,
                                                 poisoned_allocations):  # noqa: F811
    monkeypatch.setattr(triton_logprobs, "MAX_BLOCK_V", TILED["MAX_BLOCK_V"])
    logits, ids = _rows(dtype, seed=7, n=6, strided=dtype == torch.bfloat16)
    trunc = make_truncation(**trunc_kw)
    tau = _tau(transform)
    _, entropy, lse, threshold, _ = triton_logprobs.logprobs_forward(logits, ids, tau, True, trunc)
    g = torch.Generator().manual_seed(8)
    g_logp = torch.randn(ids.numel(), generator=g, dtype=torch.float64)
    g_ent = torch.randn(ids.numel(), generator=g, dtype=torch.float64)
    g_logp[3] = 0.0  # one row with a zero log-prob gradient but an entropy gradient
    out = torch.full_like(logits, float("nan"))
    triton_logprobs.logprobs_backward(logits, ids, lse, entropy, g_logp.float().to(DEVICE), g_ent.float().to(DEVICE),
                                      tau, out, threshold=threshold)
    x = logits.detach().reshape(-1, V).double().cpu().requires_grad_(True)
    want_logp, want_entropy = R.logprobs_and_entropy(x, ids.cpu(), **transform, **trunc_kw)
    (want_logp * g_logp + want_entropy * g_ent).sum().backward()
    got = out.reshape(-1, V).double().cpu()
    kept = _kept_by_threshold(logits, ids, threshold)
    assert torch.isfinite(got).all(), "every element written, −inf logits give 0"
    assert torch.equal(got[~kept], torch.zeros_like(got[~kept])), "the gradient outside K is exactly 0"
    assert_grad_close(got, x.grad, rel=1e-5 if dtype == torch.float32 else 1e-2)


@pytest.mark.parametrize("trunc_kw", [dict(top_k=3), dict(top_k=5), dict(top_p=0.9)])
def test_signed_zeros_are_one_value(trunc_kw, poisoned_allocations):  # noqa: F811
    """+0 and −0 are equal logits: kept or dropped together, as ties (the keys map −0 to +0)."""
    logits = torch.tensor([[3.0, 2.0, 0.0, -0.0, 0.0, -1.0, -0.0, -4.0]], device=DEVICE)
    ids = torch.tensor([7], device=DEVICE)
    trunc = make_truncation(**trunc_kw)
    logp, entropy, _, threshold, sum_pi_sq = triton_logprobs.logprobs_forward(
        logits, ids, kernel_transform(1.0), True, trunc, with_sum_pi_sq=True)
    want_logp, want_entropy, _, want_sq, kept = _oracle(logits, ids, {}, trunc)
    assert torch.equal(_kept_by_threshold(logits, ids, threshold), kept)
    assert_close(logp, want_logp, name="logp")
    assert_close(entropy, want_entropy, name="entropy")
    assert_close(sum_pi_sq, want_sq, name="sum_pi_sq")


"""The C++ backend's truncated-sampling log-probs (top-k, top-p, min-p; csrc/cpu/logprobs.cpp)
against the fp64 sort-based oracle (reference.truncation_kept, reference.logprobs_and_entropy):
the kept set its threshold defines, log-prob, entropy, lse, Σπ² and the gradient, on random rows
with ties (bf16-rounded logits), fp32/bf16/fp16, temperature, softcap, the target outside the kept
set, k >= V, top_p = 1, −inf logits, and the given-threshold path of the vocabulary-parallel code.

The kernel's masses are fp32 sums (the oracle's fp64), so a value whose top-p or min-p decision
lies within ~1e-6 of the bound may fall the other way: such a row must still lie between the
oracle's kept sets for slightly tighter and slightly looser settings (the kept set is monotone in
top_p and min_p), and such rows must be rare. Values are compared on the rows whose kept sets match.
"""
import math

import pytest
import torch

from grpo_kernels import reference as R
from grpo_kernels import available_backends
from grpo_kernels.transform import kernel_transform
from grpo_kernels.truncation import NO_TRUNCATION, make_truncation

pytestmark = pytest.mark.skipif("cpp" not in available_backends(torch.device("cpu")),
                                reason="the C++ extension is not built")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (temperature, logit_scale, softcap)
TRANSFORMS = {"identity": (1.0, 1.0, None), "temperature": (0.7, 1.0, None), "softcap": (1.3, 0.9, 4.0)}
SETTINGS = [dict(top_p=0.8), dict(top_p=0.3), dict(top_k=1), dict(top_k=7), dict(min_p=0.1), dict(min_p=0.9),
            dict(top_k=40, top_p=0.9), dict(top_k=5, top_p=0.5, min_p=0.02), dict(top_p=0.95, min_p=0.2),
            dict(top_k=100000), dict(top_k=100000, top_p=1.0), dict(top_p=1.0, min_p=0.0)]
SLACK = 1e-5  # relative slack on top_p and min_p for rows decided by a rounding


def _native():
    from grpo_kernels import _C
    from grpo_kernels.ops.native import NativeKernels
    return NativeKernels(_C)


def _logits(n, v, dtype, seed, spread=3.0, ties=False, neg_inf=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, v, generator=g, dtype=torch.float64) * spread
    if ties:  # few distinct values: many ties at every threshold
        x = (x * 2).round() / 2
    x = x.to(dtype)
    ids = torch.randint(0, v, (n,), generator=g)
    if neg_inf:  # a masked vocabulary tail (never the target)
        cut = torch.rand(n, v, generator=g) < 0.3
        cut.scatter_(1, ids[:, None], False)
        x = x.masked_fill(cut, float("-inf"))
    return x, ids


def _kept_by_threshold(x, ids, threshold):
    target = torch.zeros(x.shape, dtype=torch.bool).scatter_(1, ids[:, None], True)
    return (x.float() >= threshold[:, None]) | target


def _oracle(x, ids, transform, top_k=0, top_p=1.0, min_p=0.0):
    tau, scale, cap = transform
    z = R.transformed_logits(x.double(), tau, scale, cap)
    return R.truncation_kept(z, ids, top_k or None, top_p, min_p or None)


def _check_kept(x, ids, transform, settings, threshold):
    """The kernel's kept set against the oracle's; returns the rows where they are equal."""
    got = _kept_by_threshold(x, ids, threshold)
    want = _oracle(x, ids, transform, **settings)
    exact = (got == want).all(1)
    if not exact.all():
        tight = dict(settings, top_p=settings.get("top_p", 1.0) * (1 - SLACK),
                     min_p=min(1.0, settings.get("min_p", 0.0) * (1 + SLACK)))
        loose = dict(settings, top_p=min(1.0, settings.get("top_p", 1.0) * (1 + SLACK)),
                     min_p=settings.get("min_p", 0.0) * (1 - SLACK))
        rows = ~exact
        lo = _oracle(x[rows], ids[rows], transform, **tight)
        hi = _oracle(x[rows], ids[rows], transform, **loose)
        assert (lo <= got[rows]).all() and (got[rows] <= hi).all(), f"kept sets differ beyond rounding: {settings}"
        assert rows.float().mean() <= 0.05, f"{int(rows.sum())} of {len(rows)} rows decided by rounding"
    return exact


def _forward(x, ids, transform, truncation=NO_TRUNCATION, threshold=None):
    out = _native().logprobs_forward(x, ids, kernel_transform(*transform), True, truncation, threshold, True)
    assert len(out) == 5 and all(t.shape == ids.shape and t.dtype == torch.float32 for t in out)
    return out


def _reference(x, ids, transform, **settings):
    tau, scale, cap = transform
    logp, ent, spq = R.logprobs_and_entropy(x.double(), ids, tau, scale, cap, with_sum_pi_squared=True,
                                            top_k=settings.get("top_k"), top_p=settings.get("top_p"),
                                            min_p=settings.get("min_p"))
    z = R.transformed_logits(x.double(), tau, scale, cap)
    return logp, ent, spq, z.gather(1, ids[:, None])[:, 0] - logp


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[1])
@pytest.mark.parametrize("ties", [False, True], ids=["distinct", "ties"])
def test_forward_against_oracle(dtype, ties):
    seed = 7 * DTYPES.index(dtype) + 100 * ties
    x, ids = _logits(16, 997 if ties else 1200, dtype, seed, ties=ties)
    for i, settings in enumerate(SETTINGS):
        tf = TRANSFORMS[sorted(TRANSFORMS)[(i + seed) % len(TRANSFORMS)]]
        tr = make_truncation(**settings)
        logp, ent, lse, thr, spq = _forward(x, ids, tf, tr)
        if not tr.active:
            assert torch.isneginf(thr).all()
        else:  # the threshold is an exact logit of the row (the smallest kept one)
            assert (x.float() == thr[:, None]).any(1).all()
        rows = _check_kept(x, ids, tf, settings, thr)
        want = _reference(x, ids, tf, **settings)
        for got, ref in zip((logp, ent, spq, lse), want):
            torch.testing.assert_close(got[rows].double(), ref[rows], rtol=2e-5, atol=2e-5)


def test_target_outside_the_kept_set_and_neg_inf_logits():
    tf = TRANSFORMS["temperature"]
    x, ids = _logits(32, 800, torch.float32, 11, neg_inf=True)
    ids = x.masked_fill(x.isinf(), float("inf")).argmin(1)  # the smallest finite logit: outside every set below
    for settings in (dict(top_k=3), dict(top_p=0.5), dict(min_p=0.3), dict(top_k=10000), dict(top_k=3, top_p=0.2)):
        logp, ent, lse, thr, spq = _forward(x, ids, tf, make_truncation(**settings))
        rows = _check_kept(x, ids, tf, settings, thr)
        assert rows.all()
        for got, ref in zip((logp, ent, spq, lse), _reference(x, ids, tf, **settings)):
            torch.testing.assert_close(got.double(), ref, rtol=2e-5, atol=2e-5)
    # top_k beyond the finite entries keeps the −inf ones too (probability 0): threshold −inf
    thr = _forward(x, ids, tf, make_truncation(top_k=800))[3]
    assert torch.isneginf(thr).all()


def test_given_threshold():
    """The vocabulary-parallel path: a given threshold is used as is (no search), also one above
    every logit of this slice (only the target is kept), and ids outside this slice."""
    tf = TRANSFORMS["softcap"]
    x, ids = _logits(16, 640, torch.bfloat16, 5, ties=True)
    searched = _forward(x, ids, tf, make_truncation(top_k=9, top_p=0.7))
    given = _forward(x, ids, tf, NO_TRUNCATION, threshold=searched[3])
    for a, b in zip(searched, given):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    # a threshold at some logit of the row: the oracle's top_k with k = the entries at or above it
    pick = x.float().gather(1, torch.randint(0, 640, (16, 1), generator=torch.Generator().manual_seed(2)))[:, 0]
    logp, ent, lse, thr, spq = _forward(x, ids, tf, threshold=pick)
    assert torch.equal(thr, pick)
    for i in range(16):
        k = int((x[i].float() >= pick[i]).sum())
        want = _reference(x[i:i + 1], ids[i:i + 1], tf, top_k=k)
        for got, ref in zip((logp, ent, spq, lse), want):
            torch.testing.assert_close(got[i:i + 1].double(), ref, rtol=2e-5, atol=2e-5)
    # above every logit: only the target (p = 1), or nothing when the target is on another rank
    high = torch.full((16,), float("inf"))
    logp, ent, lse, thr, spq = _forward(x, ids, tf, threshold=high)
    assert (logp == 0).all() and (ent == 0).all() and (spq == 1).all()
    logp, ent, lse, thr, spq = _forward(x, torch.full_like(ids, 640), tf, threshold=high)
    assert torch.isneginf(lse).all() and (ent == 0).all() and (spq == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_backward_zero_outside_the_kept_set(dtype):
    tf = TRANSFORMS["softcap"]
    settings = dict(top_k=30, top_p=0.85, min_p=0.01)
    x, ids = _logits(12, 700, dtype, 21, ties=dtype == torch.bfloat16)
    ids[0] = x[0].float().argmin()  # one target outside the kept set
    logp, ent, lse, thr, spq = _forward(x, ids, tf, make_truncation(**settings))
    rows = _check_kept(x, ids, tf, settings, thr)
    g = torch.Generator().manual_seed(4)
    g_logp, g_ent = torch.randn(12, generator=g), torch.randn(12, generator=g)
    out = torch.full_like(x, float("nan"))
    _native().logprobs_backward(x, ids, lse, ent, g_logp, g_ent, kernel_transform(*tf), out, threshold=thr)
    kept = _kept_by_threshold(x, ids, thr)
    assert (out[~kept] == 0).all() and not out.isnan().any()
    leaf = x.double().requires_grad_()
    want = _reference(leaf, ids, tf, **settings)
    (want[0] @ g_logp.double() + want[1] @ g_ent.double()).backward()
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out[rows].double(), leaf.grad[rows], rtol=tol, atol=tol)
    # without a threshold: the full-vocabulary gradient, never zero on a finite logit
    full = torch.full_like(x, float("nan"))
    lp, en, ls = _forward(x, ids, tf)[:3]
    _native().logprobs_backward(x, ids, ls, en, g_logp, g_ent, kernel_transform(*tf), full)
    assert (full.float() != 0).float().mean() > 0.99


def test_sum_pi_sq_and_entropy_off_are_zero():
    x, ids = _logits(8, 300, torch.float32, 3)
    out = _native().logprobs_forward(x, ids, kernel_transform(1.0), False, make_truncation(top_p=0.9), None, False)
    assert (out[1] == 0).all() and (out[4] == 0).all() and out[0].isfinite().all()


def test_many_rows_and_threads_match_single_rows():
    """The parallel path (rows across threads, with per-thread scratch) equals one row at a time."""
    x, ids = _logits(96, 2048, torch.float32, 9, spread=2.0)
    tr = make_truncation(top_k=50, top_p=0.8, min_p=0.05)
    whole = _forward(x, ids, TRANSFORMS["identity"], tr)
    for i in (0, 37, 95):
        single = _forward(x[i:i + 1], ids[i:i + 1], TRANSFORMS["identity"], tr)
        for a, b in zip(whole, single):
            assert torch.equal(a[i:i + 1], b)
    assert math.isfinite(float(whole[0].sum()))


def _sampled_window(x, top_k, top_p):
    """csrc/cpu/logprobs.cpp's sampled_window for one fp32 row, identity transform: the buckets
    [lo, hi) where the sample of every 16th entry puts top_k's boundary (32 buckets per nat below
    the max, 8 buckets spare either way). It shows why the rows below mislead the sample; the
    extension's counter, not this copy of its constants, checks that the fallback ran."""
    per_nat, tail, sample, spare = 32, 32 * 32, 16, 8
    slots = torch.clamp((-(x.double() - x.max()) * per_nat).floor(), max=tail).long()
    count = torch.bincount(slots[::sample], minlength=tail + 1).double()
    k = top_k / sample
    need_lo = 0.0 if top_p < 1 else k - 3 * math.sqrt(k) - 4
    need_hi = k + 3 * math.sqrt(k) + 4
    cum = count.cumsum(0)
    lo = max(int((cum >= need_lo).nonzero()[0]) - spare, 0) if need_lo > 0 else 0
    return lo, int((cum >= need_hi).nonzero()[0]) + 1 + spare, slots


@pytest.mark.parametrize("settings", [dict(top_k=1000), dict(top_k=1000, top_p=0.9), dict(top_k=600)],
                         ids=["top_k", "top_k+top_p", "top_k_above_the_window"])
def test_misleading_sample_falls_back_to_the_whole_row(settings):
    """The C++ top-k search histograms only the buckets around where a sample of every 16th entry
    puts the boundary; rows built so that the sample misleads it (the boundary outside that window)
    must take the whole-row fallback (the extension counts the rows that do) and still match the
    oracle, while ordinary rows never need it."""
    from grpo_kernels import _C

    ordinary, _ = _logits(8, 4096, torch.float32, 1)
    before = _C.whole_row_fallbacks()
    _forward(ordinary, torch.zeros(8, dtype=torch.long), TRANSFORMS["identity"], make_truncation(**settings))
    assert _C.whole_row_fallbacks() == before
    v, g = 4096, torch.Generator().manual_seed(5)
    x = torch.randn(2, v, generator=g) * 0.3
    if settings["top_k"] == 1000:  # the sampled entries are the row's 256 largest: the sample puts
        x[:, ::16] += 10.0         # the 1000th largest far above where it is
    else:                          # the sampled entries are its smallest: the sample puts the 600th
        x[:, 1::2] += 10.0         # largest far below the 2048 entries at the top
        x[:, ::16] -= 10.0
    top_p = settings.get("top_p", 1.0)
    for row in x:  # the construction does mislead the sample (a mirror of the kernel's window)
        lo, hi, slots = _sampled_window(row, settings["top_k"], top_p)
        boundary = int(slots[row.argsort(descending=True)[settings["top_k"] - 1]])
        assert not lo <= boundary < hi, (lo, hi, boundary)
    ids = torch.tensor([3, 16])
    tf = TRANSFORMS["identity"]
    logp, ent, lse, thr, spq = _forward(x, ids, tf, make_truncation(**settings))
    assert _C.whole_row_fallbacks() == before + 2
    assert _check_kept(x, ids, tf, settings, thr).all()
    for got, ref in zip((logp, ent, spq, lse), _reference(x, ids, tf, **settings)):
        torch.testing.assert_close(got.double(), ref, rtol=2e-5, atol=2e-5)

"""Every available backend against ops/contract.py: the same ops, shapes and semantics as the torch
backend, outputs written in full (buffers poisoned with NaN first), with_entropy=False giving zeros;
the truncation threshold (top-k, top-p, min-p) found by each backend gives reference.truncation_kept's
kept set, a given threshold is used as is, and the gradient is 0 outside the kept set."""
import pytest
import torch

import grpo_kernels as gk
from cases import make_case, make_logits, poison_like
from conftest import BACKENDS, DEVICE
from helpers import prepared_objective
from grpo_kernels import reference as R
from grpo_kernels.ops import contract
from grpo_kernels.ops.dispatch import backend_module
from grpo_kernels.transform import KernelTransform
from grpo_kernels.truncation import Truncation

TRANSFORMS = {"identity": KernelTransform(1.0, 0.0), "scaled": KernelTransform(0.8, 0.0),
              "softcap": KernelTransform(0.5, 2.5)}


@pytest.mark.parametrize("backend", BACKENDS)
def test_backend_provides_the_contract(backend):
    assert contract.missing_ops(backend_module(backend)) == []


def _rows(v=300, n=24, dtype=torch.float32, seed=3):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, v, (n,), generator=g)
    logits = make_logits(1, n, v, dtype, seed=seed, ids=ids.unsqueeze(0))[0]
    return logits.to(DEVICE), ids.to(DEVICE)


def _torch_fp64(logits, ids, tau, **kw):
    return backend_module("torch").logprobs_forward(logits.double(), ids, tau, True, with_sum_pi_sq=True, **kw)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("transform", sorted(TRANSFORMS))
@pytest.mark.parametrize("with_entropy", [True, False])
def test_logprobs_forward(backend, transform, with_entropy):
    logits, ids = _rows()
    tau = TRANSFORMS[transform]
    want = _torch_fp64(logits, ids, tau)
    got = backend_module(backend).logprobs_forward(logits, ids, tau, with_entropy, with_sum_pi_sq=with_entropy)
    assert len(got) == 5, "logp, entropy, lse, threshold, sum_pi_sq"
    logp, entropy, lse, threshold, sum_pi_sq = got
    for out in got:
        assert out.shape == (ids.numel(),) and out.dtype == torch.float32
    torch.testing.assert_close(logp.double(), want[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse.double(), want[2], rtol=1e-5, atol=1e-5)
    assert torch.equal(threshold, torch.full_like(threshold, float("-inf"))), "no truncation: threshold −inf"
    if with_entropy:
        torch.testing.assert_close(entropy.double(), want[1], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(sum_pi_sq.double(), want[4], rtol=1e-5, atol=1e-6)
    else:
        assert torch.equal(entropy, torch.zeros_like(entropy)), "with_entropy=False must give zeros"
        assert torch.equal(sum_pi_sq, torch.zeros_like(sum_pi_sq)), "with_sum_pi_sq=False must give zeros"


# Each setting alone and all together (min_p, then top_k, then top_p), on bf16-rounded logits (ties).
TRUNCATIONS = {"top_k": Truncation(top_k=7), "top_p": Truncation(top_p=0.7), "min_p": Truncation(min_p=0.08),
               "all": Truncation(top_k=20, top_p=0.85, min_p=0.02)}


def _kept(logits, ids, threshold):
    kept = logits.double() >= threshold.double().unsqueeze(-1)
    inside = (ids >= 0) & (ids < logits.shape[-1])
    return kept.scatter_(-1, ids.clamp(0, logits.shape[-1] - 1).unsqueeze(-1), inside.unsqueeze(-1) | kept.gather(
        -1, ids.clamp(0, logits.shape[-1] - 1).unsqueeze(-1)))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("truncation", sorted(TRUNCATIONS))
@pytest.mark.parametrize("transform", ["scaled", "softcap"])
def test_logprobs_forward_truncated(backend, truncation, transform):
    """The backend's own search: the oracle's kept set (reference.truncation_kept) read back from
    the threshold, and the statistics over it; then the same with the threshold given (no search)."""
    logits, ids = _rows(v=150, n=10)  # small: the interpreted Triton search is slow
    logits = logits.bfloat16().float()  # ties at every threshold
    tau, setting = TRANSFORMS[transform], TRUNCATIONS[truncation]
    backend_ops = backend_module(backend)
    got = backend_ops.logprobs_forward(logits, ids, tau, True, truncation=setting, with_sum_pi_sq=True)
    oracle = R.truncation_kept(tau.apply(logits.double()), ids, *setting)
    assert torch.equal(_kept(logits, ids, got[3]), oracle), "kept set != reference.truncation_kept"
    want = _torch_fp64(logits, ids, tau, threshold=got[3].double())
    for name, value, expected in zip(("logp", "entropy", "lse", "threshold", "sum_pi_sq"), got, want):
        assert value.dtype == torch.float32, name
        torch.testing.assert_close(value.double(), expected, rtol=1e-5, atol=1e-5, msg=name)
    given = got[3].clone()
    given[1] = float("-inf")  # a row given −inf keeps everything: the threshold is used, not searched
    again = backend_ops.logprobs_forward(logits, ids, tau, True, truncation=setting, threshold=given)
    assert torch.equal(again[3], given), "a given threshold is returned as used"
    full = _torch_fp64(logits, ids, tau)
    torch.testing.assert_close(again[0][1].double(), full[0][1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("transform", sorted(TRANSFORMS))
@pytest.mark.parametrize("with_grad_entropy", [True, False])
@pytest.mark.parametrize("truncated", [False, True])
def test_logprobs_backward(backend, transform, with_grad_entropy, truncated):
    logits, ids = _rows()
    ids = ids.clone()
    ids[3] = -1  # the target lies in another rank's vocabulary slice: no one-hot term
    tau = TRANSFORMS[transform]
    torch_backend = backend_module("torch")
    setting = TRUNCATIONS["all"] if truncated else Truncation()
    _, entropy, lse, threshold, _ = torch_backend.logprobs_forward(logits.double(), ids, tau, True,
                                                                   truncation=setting)
    threshold = threshold if truncated else None
    g = torch.Generator().manual_seed(5)
    g_logp = torch.randn(ids.numel(), generator=g, dtype=torch.float64).to(DEVICE)
    g_ent = torch.randn(ids.numel(), generator=g, dtype=torch.float64).to(DEVICE) if with_grad_entropy else None
    want = torch_backend.logprobs_backward(logits.double(), ids, lse, entropy, g_logp, g_ent, tau,
                                           torch.empty_like(logits, dtype=torch.float64), threshold=threshold)
    out = poison_like(logits)
    as32 = lambda x: None if x is None else x.float()  # noqa: E731
    got = backend_module(backend).logprobs_backward(logits, ids, lse.float(), entropy.float(), g_logp.float(),
                                                     as32(g_ent), tau, out, threshold=as32(threshold))
    assert got is out and torch.isfinite(out).all(), "every element written, −inf logits give 0"
    torch.testing.assert_close(out.double(), want, rtol=1e-4, atol=1e-5)
    if truncated:
        dropped = ~_kept(logits, ids, threshold)
        assert dropped.any() and torch.equal(out[dropped], torch.zeros_like(out[dropped])), "0 outside the kept set"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("option", ["everything", "gspo_bias_corr", "cispo_two_sided", "vespo_is_token", "sapo",
                                    "per_token_adv", "is_sequence_mask", "entropy_mask_bonus"])
def test_objective_pass(backend, option):
    case = make_case(option, b=5, t=6, v=11, seed=9)
    want = prepared_objective(case, torch.float64, poison=False)
    backend_module("torch").objective_pass(want, case.config.params, (0, want.logp.numel()), (0, 5))
    got = prepared_objective(case)
    backend_module(backend).objective_pass(got, case.config.params, (0, got.logp.numel()), (0, 5))
    for name in ("per_token_loss", "g_logp", "g_entropy", "partials"):
        value = getattr(got, name)
        assert torch.isfinite(value).all(), f"{name} not written in full"
        torch.testing.assert_close(value.double(), getattr(want, name), rtol=2e-5, atol=2e-6, msg=name)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scale", [m.public for m in gk.options.AdvantageMode])
def test_group_advantages(backend, scale):
    g = torch.Generator().manual_seed(2)
    total = torch.randn(12, generator=g)
    total[5] = float("nan")
    total[8:12] = 1.5  # a constant group
    index = torch.arange(12) // 4
    want = backend_module("torch").group_advantages(total.double().to(DEVICE), index.to(DEVICE), 3, scale, 1e-4, 4)
    got = backend_module(backend).group_advantages(total.to(DEVICE), index.to(DEVICE), 3, scale, 1e-4, 4)
    assert [tuple(t.shape) for t in got] == [(12,), (3,), (3,), (3,)] and got[3].dtype == torch.bool
    for a, b in zip(got[:3], want[:3]):
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-6)
    assert torch.equal(got[3], want[3])

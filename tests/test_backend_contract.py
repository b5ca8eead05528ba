"""Every available backend against ops/contract.py: the same ops, shapes and semantics as the torch
backend, outputs written in full (buffers poisoned with NaN first), with_entropy=False giving zeros."""
import pytest
import torch

import grpo_kernels as gk
from cases import make_case, make_logits, poison_like
from conftest import BACKENDS, DEVICE
from helpers import prepared_objective
from grpo_kernels.ops import contract
from grpo_kernels.ops.dispatch import backend_module
from grpo_kernels.transform import KernelTransform

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


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("transform", sorted(TRANSFORMS))
@pytest.mark.parametrize("with_entropy", [True, False])
def test_logprobs_forward(backend, transform, with_entropy):
    logits, ids = _rows()
    tau = TRANSFORMS[transform]
    want = backend_module("torch").logprobs_forward(logits.double(), ids, tau, True)
    logp, entropy, lse = backend_module(backend).logprobs_forward(logits, ids, tau, with_entropy)
    for got in (logp, entropy, lse):
        assert got.shape == (ids.numel(),) and got.dtype == torch.float32
    torch.testing.assert_close(logp.double(), want[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse.double(), want[2], rtol=1e-5, atol=1e-5)
    if with_entropy:
        torch.testing.assert_close(entropy.double(), want[1], rtol=1e-5, atol=1e-5)
    else:
        assert torch.equal(entropy, torch.zeros_like(entropy)), "with_entropy=False must give zeros"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("transform", sorted(TRANSFORMS))
@pytest.mark.parametrize("with_grad_entropy", [True, False])
def test_logprobs_backward(backend, transform, with_grad_entropy):
    logits, ids = _rows()
    ids = ids.clone()
    ids[3] = -1  # the target lies in another rank's vocabulary slice: no one-hot term
    tau = TRANSFORMS[transform]
    torch_backend = backend_module("torch")
    _, entropy, lse = torch_backend.logprobs_forward(logits.double(), ids.clamp(min=0), tau, True)
    g = torch.Generator().manual_seed(5)
    g_logp = torch.randn(ids.numel(), generator=g, dtype=torch.float64).to(DEVICE)
    g_ent = torch.randn(ids.numel(), generator=g, dtype=torch.float64).to(DEVICE) if with_grad_entropy else None
    want = torch_backend.logprobs_backward(logits.double(), ids, lse, entropy, g_logp, g_ent, tau,
                                           torch.empty_like(logits, dtype=torch.float64))
    out = poison_like(logits)
    as32 = lambda x: None if x is None else x.float()  # noqa: E731
    got = backend_module(backend).logprobs_backward(logits, ids, lse.float(), entropy.float(), g_logp.float(),
                                                     as32(g_ent), tau, out)
    assert got is out and torch.isfinite(out).all(), "every element written, −inf logits give 0"
    torch.testing.assert_close(out.double(), want, rtol=1e-4, atol=1e-5)


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

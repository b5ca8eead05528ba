"""Precision: fp64 in gives fp64 out (torch backend), and fp32 backends keep long sequences and
small KLs accurate against the fp64 reference."""
import pytest
import torch

import grpo_kernels as gk
from cases import make_case, reference_result
from conftest import BACKENDS
from grpo_kernels import reference as R
from helpers import DEVICE, assert_close, assert_grad_close


def test_fp64_in_fp64_out_with_cancellation():
    """A loss that nearly cancels (advantages of both signs, ratio ~1): fp64 keeps ~1e-12."""
    case = make_case("trl_defaults_kl", dtype=torch.float64, seed=4, drift=1e-3)
    case.advantages = case.advantages - case.advantages.mean()
    ref = reference_result(case)
    logits = case.logits.clone().requires_grad_(True)
    out = gk.grpo_loss(logits, case.ids, case.advantages.double(), **case.kwargs())  # auto -> torch for fp64
    out.loss.backward()
    for name in ("loss", "logps", "entropy", "per_token_loss"):
        assert getattr(out, name).dtype == torch.float64, name
    assert all(v.dtype == torch.float64 for v in out.metrics.values())
    assert logits.grad.dtype == torch.float64
    assert_close(out.loss, ref["loss"], rtol=1e-12, atol=1e-15, name="loss")
    assert_grad_close(logits.grad, ref["grad"], rel=1e-12)
    for key, value in ref["metrics"].items():
        assert_close(out.metrics[key], value, rtol=1e-12, atol=1e-15, name=key)


def test_fp64_objective_and_advantages():
    case = make_case("vespo_is_token", dtype=torch.float64, seed=5)
    logp, ent = R.logprobs_and_entropy(case.logits, case.ids)
    x = logp.detach().clone().requires_grad_(True)
    out = gk.grpo_loss_from_logprobs(x, case.advantages.double(), mask=case.mask, old_logps=case.old_logps.double(),
                                     sampling_logps=case.sampling_logps.double(), config=case.config)
    out.loss.backward()
    y = logp.detach().clone().requires_grad_(True)
    terms = R.policy_objective(y, ent, case.advantages.double(), case.mask, case.config,
                               old_logp=case.old_logps.double(), sampling_logp=case.sampling_logps.double())
    terms.loss.backward()
    assert out.loss.dtype == x.grad.dtype == torch.float64
    assert_close(out.loss, terms.loss, rtol=1e-13, atol=1e-15, name="loss")
    assert_grad_close(x.grad, y.grad, rel=1e-13)
    rewards = torch.rand(12, dtype=torch.float64)
    adv = gk.group_advantages(rewards, group_size=4)
    assert adv.advantages.dtype == adv.group_std.dtype == torch.float64
    expected = R.group_advantages(rewards, torch.arange(12) // 4, 3).advantages
    assert_close(adv.advantages, expected, rtol=1e-13, atol=1e-15, name="advantages")


LONG_CONFIGS = {
    "token": gk.GRPOLossConfig(loss_type="grpo", beta=0.04),
    "sequence": gk.GRPOLossConfig(loss_type="grpo", importance_sampling_level="sequence", beta=0.04, epsilon=0.5),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("level", list(LONG_CONFIGS))
@pytest.mark.parametrize("length", [8192, 32768, 131072])
def test_long_sequence_objective(backend, level, length):
    """One packed sequence of up to 131072 tokens in fp32: loss and gradient within 1e-6 of fp64."""
    g = torch.Generator().manual_seed(length)
    logp = -(torch.rand(length, generator=g, dtype=torch.float64) * 3 + 0.1)
    old = logp + torch.randn(length, generator=g, dtype=torch.float64) * 0.05
    ref = logp + torch.randn(length, generator=g, dtype=torch.float64) * 0.02
    adv = torch.tensor([0.8], dtype=torch.float64)
    cu = torch.tensor([0, length], dtype=torch.int32)
    cfg = LONG_CONFIGS[level]
    x = logp.float().to(DEVICE).requires_grad_(True)
    out = gk.grpo_loss_from_logprobs(x, adv.float().to(DEVICE), old_logps=old.float().to(DEVICE),
                                     ref_logps=ref.float().to(DEVICE), cu_seqlens=cu.to(DEVICE), config=cfg,
                                     backend=backend)
    out.loss.backward()
    y = logp.float().double().requires_grad_(True)  # the same fp32 inputs, in fp64
    terms = R.policy_objective(y[None], torch.zeros_like(y)[None], adv, torch.ones(1, length, dtype=torch.bool), cfg,
                               old_logp=old.float().double()[None], ref_logp=ref.float().double()[None])
    terms.loss.backward()
    assert_close(out.loss, terms.loss, rtol=1e-6, atol=0, name="loss")
    assert_grad_close(x.grad, y.grad, rel=1e-6)
    assert_close(out.metrics["kl"], terms.metrics["kl"], rtol=1e-6, atol=0, name="kl")


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b in ("cpp", "torch")])
@pytest.mark.parametrize("length", [32768, 131072])
def test_long_sequence_through_logits(backend, length):
    """The whole grpo_loss (vocabulary sweep included) on one packed sequence of up to 131072 tokens
    (a peer's launch grid fails at 65536), bf16 logits, sequence-level (GSPO) importance sampling."""
    vocab = 16
    g = torch.Generator().manual_seed(1)
    logits = (torch.randn(length, vocab, generator=g) * 2).bfloat16()
    ids = torch.randint(0, vocab, (length,), generator=g)
    logp, _ = R.logprobs_and_entropy(logits.double(), ids)
    old = (logp + torch.randn(length, generator=g, dtype=torch.float64) * 0.05).float()
    cfg = gk.GRPOLossConfig(loss_type="grpo", importance_sampling_level="sequence", epsilon=0.5)
    cu = torch.tensor([0, length], dtype=torch.int32)
    x = logits.clone().requires_grad_(True)
    out = gk.grpo_loss(x, ids, torch.tensor([0.7]), old_logps=old, cu_seqlens=cu, config=cfg, backend=backend)
    out.loss.backward()
    y = logits.double().requires_grad_(True)
    terms, _, _ = R.grpo_loss(y[None], ids[None], torch.tensor([0.7], dtype=torch.float64),
                              old_logps=old.double()[None],
                              config=cfg)
    terms.loss.backward()
    assert_close(out.loss, terms.loss, rtol=1e-6, atol=0, name="loss")
    assert_grad_close(x.grad.float(), y.grad, rel=2.0 ** -7)  # stored in bf16


@pytest.mark.parametrize("backend", BACKENDS)
def test_small_kl_keeps_fp32_precision(backend):
    """k3 = e^x − x − 1 at |x| ~ 1e-2 .. 1e-4: TRL's formula loses up to 1e-3 relative in fp32; ours ~1e-6."""
    g = torch.Generator().manual_seed(0)
    n = 512
    logp = -(torch.rand(n, generator=g, dtype=torch.float64) + 0.5)
    x = torch.logspace(-4, -2, n, dtype=torch.float64) * torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
    ref = (logp + x).float()
    logp32 = logp.float()
    cfg = gk.GRPOLossConfig(loss_type="dapo", beta=1.0, use_bias_correction_kl=False)
    cu = torch.tensor([0, n], dtype=torch.int32)
    out = gk.grpo_loss_from_logprobs(logp32.to(DEVICE), torch.zeros(1, device=DEVICE), ref_logps=ref.to(DEVICE),
                                     cu_seqlens=cu.to(DEVICE), config=cfg, backend=backend)
    xd = ref.double() - logp32.double()
    exact = (torch.expm1(xd) - xd).cpu()
    per_token = out.per_token_loss.double().cpu()
    assert ((per_token - exact).abs() / exact).max() < 2e-6
    naive = (torch.exp(xd.float()) - xd.float() - 1).double()
    assert ((naive - exact).abs() / exact).max() > 1e-4  # the formula we replaced really was worse

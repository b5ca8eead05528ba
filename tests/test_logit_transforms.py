"""Gemma's final_logit_softcapping and Cohere's logit_scale against the eager formula
z' = c·tanh(s·z/c)/τ, in fp64 (values and gradients, the fused-linear path included) and on
every backend in fp32."""
import pytest
import torch

import grpo_kernels as gk
from cases import make_logits
from conftest import BACKENDS
from helpers import DEVICE, assert_close, assert_grad_close

TRANSFORMS = [dict(final_logit_softcapping=3.0), dict(logit_scale=0.6), dict(final_logit_softcapping=2.5,
                                                                              logit_scale=1.7, temperature=0.8)]


def eager(logits, ids, temperature=1.0, logit_scale=1.0, final_logit_softcapping=None):
    """The models' own code: scale, softcap, temperature, then log-softmax (−inf kept masked)."""
    z = logits * logit_scale
    if final_logit_softcapping is not None:
        c = final_logit_softcapping
        z = torch.where(torch.isneginf(logits), logits, c * torch.tanh(z / c))
    logsm = torch.log_softmax(z / temperature, -1)
    p = logsm.exp()
    entropy = -(p * logsm.masked_fill(p == 0, 0)).sum(-1)
    return logsm.gather(-1, ids.unsqueeze(-1)).squeeze(-1), entropy


@pytest.mark.parametrize("options", TRANSFORMS, ids=["softcap", "scale", "both"])
def test_selective_logprobs_fp64_equals_eager(options):
    ids = torch.randint(0, 50, (3, 6))
    logits = make_logits(3, 6, 50, torch.float64, seed=1, scale=6.0, ids=ids)
    x = logits.clone().requires_grad_(True)
    logp, ent = gk.selective_logprobs(x, ids, return_entropy=True, **options)
    (logp.sum() + 0.3 * ent.sum()).backward()
    y = logits.clone().requires_grad_(True)
    e_logp, e_ent = eager(y, ids, **options)
    (e_logp.sum() + 0.3 * e_ent.sum()).backward()
    assert logp.dtype == torch.float64
    assert_close(logp, e_logp, rtol=1e-12, atol=1e-12, name="logp")
    assert_close(ent, e_ent, rtol=1e-12, atol=1e-12, name="entropy")
    assert_grad_close(x.grad, y.grad, rel=1e-12)
    assert torch.all(x.grad[torch.isneginf(logits)] == 0), "-inf logits stay masked: no gradient"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("options", TRANSFORMS, ids=["softcap", "scale", "both"])
def test_every_backend_fp32(backend, options):
    ids = torch.randint(0, 300, (2, 5))
    logits = make_logits(2, 5, 300, seed=2, scale=8.0, ids=ids)
    x = logits.to(DEVICE).detach().clone().requires_grad_(True)
    logp, ent = gk.selective_logprobs(x, ids.to(DEVICE), return_entropy=True, backend=backend, **options)
    (logp.sum() - 0.7 * ent.sum()).backward()
    y = logits.double().requires_grad_(True)
    e_logp, e_ent = eager(y, ids, **options)
    (e_logp.sum() - 0.7 * e_ent.sum()).backward()
    assert_close(logp, e_logp, rtol=2e-6, atol=2e-6, name="logp")
    assert_close(ent, e_ent, rtol=2e-6, atol=2e-6, name="entropy")
    assert_grad_close(x.grad, y.grad, rel=2e-6)


@pytest.mark.parametrize("options", TRANSFORMS, ids=["softcap", "scale", "both"])
def test_fused_linear_fp64_equals_eager(options):
    """Gradients w.r.t. hidden, weight and bias through the transform, against autograd on the formula."""
    g = torch.Generator().manual_seed(3)
    b, t, h, v = 3, 5, 8, 40
    hidden = torch.randn(b, t, h, generator=g, dtype=torch.float64)
    weight = torch.randn(v, h, generator=g, dtype=torch.float64)
    bias = torch.randn(v, generator=g, dtype=torch.float64)
    ids = torch.randint(0, v, (b, t), generator=g)
    adv = torch.randn(b, generator=g, dtype=torch.float64)
    old = torch.randn(b, t, generator=g, dtype=torch.float64) * 0.1 - 3.5
    ref = old + 0.05
    cfg = gk.GRPOLossConfig(loss_type="grpo", beta=0.04, entropy_coef=0.01, **options)

    leaves = [x.clone().requires_grad_(True) for x in (hidden, weight, bias)]
    out = gk.fused_linear_grpo_loss(leaves[0], leaves[1], ids, adv, bias=leaves[2], old_logps=old, ref_logps=ref,
                                    config=cfg, chunk_size=4)
    out.loss.backward()
    expected = [x.clone().requires_grad_(True) for x in (hidden, weight, bias)]
    logits = expected[0] @ expected[1].T + expected[2]
    terms, _, _ = gk.reference.grpo_loss(logits, ids, adv, old_logps=old, ref_logps=ref, config=cfg)
    terms.loss.backward()
    # the reference's transform is written separately from the eager one above: check it too
    e_logp, _ = eager(logits.detach(), ids, cfg.temperature, cfg.logit_scale, cfg.final_logit_softcapping)
    assert_close(out.logps, e_logp, rtol=1e-12, atol=1e-12, name="logps")
    assert out.loss.dtype == torch.float64
    assert_close(out.loss, terms.loss, rtol=1e-12, atol=1e-13, name="loss")
    for name, ours, theirs in zip(("hidden", "weight", "bias"), leaves, expected):
        assert ours.grad.dtype == torch.float64
        assert_grad_close(ours.grad, theirs.grad, rel=1e-11, name=name)
    logp = gk.fused_linear_selective_logprobs(hidden, weight, ids, bias=bias, temperature=cfg.temperature,
                                              logit_scale=cfg.logit_scale,
                                              final_logit_softcapping=cfg.final_logit_softcapping)
    assert_close(logp, e_logp, rtol=1e-12, atol=1e-12, name="fused_linear_selective_logprobs")


@pytest.mark.parametrize("kwargs, words", [
    (dict(logit_scale=0.0), "logit_scale must be a positive"),
    (dict(final_logit_softcapping=-1.0), "final_logit_softcapping must be a positive"),
    (dict(temperature=float("nan")), "temperature must be a positive"),
])
def test_bad_transform_values_are_named(kwargs, words):
    with pytest.raises(ValueError, match=words):
        gk.selective_logprobs(torch.zeros(1, 2, 3), torch.zeros(1, 2, dtype=torch.long), **kwargs)
    with pytest.raises(ValueError, match=words.split(" must")[0]):
        gk.GRPOLossConfig(**kwargs)

"""`grpo_loss_from_logprobs` (the objective on log-probs the caller already has) against the fp64
reference objective, for every option and backend: loss, gradients w.r.t. logp and entropy, metrics."""
import zlib

import pytest
import torch
from cases import OPTION_IDS, make_case
from conftest import BACKENDS
from helpers import DEVICE, assert_close, assert_grad_close

import grpo_kernels as gk
from grpo_kernels import reference as R


def per_token_inputs(option, **shape):
    case = make_case(option, seed=zlib.crc32(option.encode()) % 1000 + 1, **shape)
    g = torch.Generator().manual_seed(5)
    logp = (case.old_logps.double() + 0.2 * torch.randn(case.old_logps.shape, generator=g, dtype=torch.float64))
    entropy = torch.rand(case.old_logps.shape, generator=g, dtype=torch.float64) * 3
    return case, logp, entropy


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("option", OPTION_IDS)
def test_matches_reference_objective(backend, option):
    check_against_reference(backend, *per_token_inputs(option))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("option", ["grpo", "gspo", "vespo", "is_sequence_mask"])
def test_sequences_longer_than_a_block(backend, option):
    """Sequences of 1100 tokens: the Triton objective walks them in three blocks of its largest
    BLOCK_T (512), its sequence sums and GSPO's second pass across the block boundaries."""
    check_against_reference(backend, *per_token_inputs(option, b=3, t=1100, v=3))


def check_against_reference(backend, case, logp, entropy):
    as64 = lambda x: None if x is None else x.double()  # noqa: E731
    lp64, ent64 = logp.clone().requires_grad_(True), entropy.clone().requires_grad_(True)
    want = R.policy_objective(lp64, ent64, case.advantages.double(), case.mask, case.config,
                              old_logp=as64(case.old_logps), ref_logp=as64(case.ref_logps),
                              sampling_logp=as64(case.sampling_logps), is_weights=as64(case.is_weights),
                              num_items_in_batch=case.num_items_in_batch)
    grads = torch.autograd.grad(want.loss, (lp64, ent64), allow_unused=True)
    want_g_logp, want_g_ent = (torch.zeros_like(logp) if g is None else g for g in grads)

    dev = lambda x: None if x is None else x.to(DEVICE)  # noqa: E731
    lp = logp.float().to(DEVICE).requires_grad_(True)
    ent = entropy.float().to(DEVICE).requires_grad_(True)
    out = gk.grpo_loss_from_logprobs(
        lp, dev(case.advantages), entropy=ent, mask=dev(case.mask), old_logps=dev(case.old_logps),
        ref_logps=dev(case.ref_logps), sampling_logps=dev(case.sampling_logps), is_weights=dev(case.is_weights),
        num_items_in_batch=case.num_items_in_batch, config=case.config, backend=backend)
    g_logp, g_ent = torch.autograd.grad(out.loss, (lp, ent), allow_unused=True)
    g_ent = torch.zeros_like(ent) if g_ent is None else g_ent
    assert_close(out.loss, want.loss, rtol=1e-5, atol=1e-6, name="loss")
    assert_grad_close(g_logp, want_g_logp, rel=1e-5, name="d_logp")
    assert_grad_close(g_ent, want_g_ent, rel=1e-5, name="d_entropy")
    assert_close(out.per_token_loss, want.per_token_loss, rtol=1e-5, atol=1e-6, name="per_token_loss")
    assert set(out.metrics) == set(want.metrics)
    for key, value in want.metrics.items():
        assert_close(out.metrics[key], value, rtol=1e-5, atol=1e-6, name=key)


def test_packed_equals_padded():
    case, logp, _ = per_token_inputs("gspo_clamp")
    padded = gk.grpo_loss_from_logprobs(logp.float(), case.advantages, mask=case.mask, old_logps=case.old_logps,
                                        config=case.config)
    lengths = case.mask.sum(1)
    order = torch.argsort((~case.mask).int(), dim=1, stable=True)
    keep = torch.arange(case.mask.shape[1]).unsqueeze(0) < lengths.unsqueeze(1)
    packed = lambda x: torch.gather(x, 1, order)[keep]  # noqa: E731
    cu = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)]).to(torch.int32)
    out = gk.grpo_loss_from_logprobs(packed(logp.float()), case.advantages, old_logps=packed(case.old_logps),
                                     cu_seqlens=cu, config=case.config)
    torch.testing.assert_close(out.loss, padded.loss, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("changes, error, words", [
    (dict(entropy=None, entropy_coef=0.1), ValueError, "entropy is required by entropy_coef != 0"),
    (dict(entropy=None, top_entropy_quantile=0.5), ValueError, "entropy is required"),
    (dict(entropy=torch.zeros(2, 2)), ValueError, "entropy must have shape"),
    (dict(logps=torch.zeros(4, 7, dtype=torch.long)), TypeError, "logps must be a float"),
    (dict(logps=torch.full((4, 7), float("nan"))), ValueError, "logps contains NaN"),
    (dict(mask=torch.ones(4, 3, dtype=torch.bool)), ValueError, "mask must have shape"),
])
def test_bad_inputs_are_named(changes, error, words):
    case, logp, entropy = per_token_inputs("grpo")
    kw = dict(logps=logp.float(), entropy=entropy.float(), mask=case.mask, old_logps=case.old_logps,
              config=case.config)
    kw.update(changes)
    with pytest.raises(error) as info:
        gk.grpo_loss_from_logprobs(kw.pop("logps"), case.advantages, **kw)
    assert words in str(info.value)

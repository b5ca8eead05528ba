"""Shapes every public function takes the same way: advantages (B, 1) as (B,); packed inputs
without cu_seqlens told how to pass them; an empty batch is never an error (empty outputs, loss
and metrics 0, zero gradients)."""
import inspect

import pytest
import torch

import grpo_kernels as gk
from cases import make_case
from conftest import BACKENDS
from helpers import DEVICE, to_device

H = 8
OPTIONS = ["grpo", "gspo", "vespo_seq_is_weights", "k3", "entropy_mask_bonus", "is_sequence_mask"]


def linear_of(case, seed=1):
    """hidden and lm_head weight whose logits are about the case's size."""
    b, t, v = case.logits.shape
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, t, H, generator=g).to(DEVICE), (torch.randn(v, H, generator=g) * 0.5).to(DEVICE)


def outputs(out, *inputs):
    """Every number a loss call gives: loss, per-token outputs, metrics, and the inputs' gradients."""
    out.loss.backward()
    return ([out.loss, out.logps, out.entropy, out.per_token_loss] + [out.metrics[k] for k in sorted(out.metrics)]
            + [x.grad for x in inputs])


def assert_identical(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert torch.equal(x, y), (x, y)


# --------------------------------------------------------------------------------------------
# advantages (B, 1): one per sequence, as (B,)
# --------------------------------------------------------------------------------------------

# The (B, 1) advantages are flattened in inputs.py, before any backend: the interpreted Triton
# kernels (slow on CPU) run two of the options.
B1_CASES = [(option, backend) for backend in BACKENDS
            for option in (OPTIONS if backend != "triton" else ["grpo", "vespo_seq_is_weights"])]


@pytest.mark.parametrize("option, backend", B1_CASES)
def test_advantages_b1_equal_b(backend, option):
    case = to_device(make_case(option, seed=21))
    kwargs = dict(case.kwargs(), backend=backend)
    hidden, weight = linear_of(case)
    calls = {
        "grpo_loss": lambda adv, x: gk.grpo_loss(x[0], case.ids, adv, **kwargs),
        "GRPOLoss": lambda adv, x: gk.GRPOLoss(case.config, backend=backend)(
            x[0], case.ids, adv, **{k: v for k, v in kwargs.items() if k not in ("config", "backend")}),
        "grpo_loss_from_logprobs": lambda adv, x: gk.grpo_loss_from_logprobs(
            gk.selective_logprobs(x[0], case.ids, temperature=case.config.temperature), adv,
            entropy=gk.selective_logprobs(x[0], case.ids, return_entropy=True,
                                          temperature=case.config.temperature)[1], **kwargs),
        "fused_linear_grpo_loss": lambda adv, x: gk.fused_linear_grpo_loss(x[0], x[1], case.ids, adv, chunk_size=5,
                                                                           **kwargs),
        "FusedLinearGRPOLoss": lambda adv, x: gk.FusedLinearGRPOLoss(case.config, backend=backend, chunk_size=5)(
            x[0], x[1], case.ids, adv, **{k: v for k, v in kwargs.items() if k not in ("config", "backend")}),
    }
    for name, call in calls.items():
        results = []
        for adv in (case.advantages, case.advantages.unsqueeze(1)):
            inputs = ([case.logits.clone().requires_grad_(True)] if "linear" not in name.lower()
                      else [hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)])
            results.append(outputs(call(adv, inputs), *inputs))
        assert_identical(*results)


@pytest.mark.parametrize("backend", BACKENDS)
def test_advantages_b1_packed(backend):
    case = to_device(make_case("gspo", seed=22))
    lengths = case.mask.sum(1)
    cu = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)]).int()
    logits, ids = case.logits[case.mask], case.ids[case.mask]
    kw = dict(old_logps=case.old_logps[case.mask], cu_seqlens=cu, config=case.config, backend=backend)
    a = gk.grpo_loss(logits, ids, case.advantages, **kw)
    b = gk.grpo_loss(logits, ids, case.advantages[:, None], **kw)
    assert torch.equal(a.loss, b.loss) and torch.equal(a.per_token_loss, b.per_token_loss)


def test_advantages_of_a_wrong_shape_name_every_accepted_one():
    case = make_case("grpo", seed=23)
    with pytest.raises(ValueError, match=r"advantages must have shape \(4,\) or \(4, 1\) \(one per sequence\) or "
                                         r"\(4, 7\) \(one per token\), got \(4, 2\)"):
        gk.grpo_loss(case.logits, case.ids, torch.zeros(4, 2))


# --------------------------------------------------------------------------------------------
# packed inputs without cu_seqlens
# --------------------------------------------------------------------------------------------

def test_packed_inputs_without_cu_seqlens_are_told_how_to_pass_them():
    n, v = 9, 11
    logits, ids, adv = torch.randn(n, v), torch.randint(0, v, (n,)), torch.randn(3)
    hint = r"pass cu_seqlens, the \(B\+1,\) int32 offsets of the sequences"
    with pytest.raises(ValueError, match=r"logits must be padded \(B, T, V\), got shape \(9, 11\); for packed "
                                         r"\(N, V\) logits, " + hint):
        gk.grpo_loss(logits, ids, adv)
    with pytest.raises(ValueError, match=r"hidden must be padded \(B, T, H\), got shape \(9, 4\); for packed "
                                         r"\(N, H\) hidden, " + hint):
        gk.fused_linear_grpo_loss(torch.randn(n, 4), torch.randn(v, 4), ids, adv)
    with pytest.raises(ValueError, match=r"\(logps \(B, T\)\), got token shape \(9,\); for packed \(N,\) logps, "
                       + hint):
        gk.grpo_loss_from_logprobs(torch.randn(n), adv)
    with pytest.raises(ValueError, match=r"logits must be packed \(N, V\) with cu_seqlens, got shape \(3, 3, 11\); "
                                         r"drop cu_seqlens for padded \(B, T, V\) logits"):
        gk.grpo_loss(logits.view(3, 3, v), ids.view(3, 3), adv, cu_seqlens=torch.tensor([0, 3, 6, 9]))


def test_selective_logprobs_takes_packed_logits_as_they_are():
    """Log-probs are per token: (N, V) logits need no cu_seqlens."""
    logits, ids = torch.randn(2, 5, 13), torch.randint(0, 13, (2, 5))
    assert torch.equal(gk.selective_logprobs(logits.reshape(10, 13), ids.reshape(10)),
                       gk.selective_logprobs(logits, ids).reshape(10))


# --------------------------------------------------------------------------------------------
# empty batches
# --------------------------------------------------------------------------------------------

PUBLIC = [gk.selective_logprobs, gk.grpo_loss, gk.grpo_loss_from_logprobs, gk.fused_linear_grpo_loss,
          gk.fused_linear_selective_logprobs, gk.group_advantages, gk.GRPOLoss, gk.FusedLinearGRPOLoss]

# (token shape, cu_seqlens, number of sequences): padded B = 0 and T = 0, packed with no
# sequences (cu_seqlens [0]) and packed with sequences that have no tokens.
EMPTY_LAYOUTS = {
    "B=0": ((0, 6), None, 0),
    "T=0": ((3, 0), None, 3),
    "packed B=0": ((0,), [0], 0),
    "packed N=0": ((0,), [0, 0, 0], 2),
}


def empty_inputs(layout, option, v=11):
    shape, cu, bsz = EMPTY_LAYOUTS[layout]
    case = make_case(option, seed=24)
    per_token = lambda: torch.randn(shape, device=DEVICE)  # noqa: E731
    kw = dict(config=case.config, mask=torch.ones(shape, dtype=torch.bool, device=DEVICE),
              old_logps=per_token(), ref_logps=None if case.ref_logps is None else per_token(),
              sampling_logps=None if case.sampling_logps is None else per_token(),
              is_weights=None if case.is_weights is None else torch.rand(bsz, device=DEVICE),
              cu_seqlens=None if cu is None else torch.tensor(cu, dtype=torch.int32, device=DEVICE))
    ids = torch.zeros(shape, dtype=torch.long, device=DEVICE)
    return shape, ids, torch.randn(bsz, device=DEVICE), kw, v


# Metrics over the sequences, not their tokens (TRL's): B sequences without tokens still have them.
PER_SEQUENCE_METRICS = ("vespo/phi_seq_mean",)


def assert_empty_loss(out, layout, *inputs):
    shape, _, bsz = EMPTY_LAYOUTS[layout]
    out.loss.backward()
    assert out.loss.shape == () and out.loss.item() == 0.0
    for key, value in out.metrics.items():
        if key in PER_SEQUENCE_METRICS and bsz > 0:
            assert torch.isfinite(value), (key, value)
        else:
            assert value.item() == 0.0, (key, value)
    for x in (out.logps, out.entropy, out.per_token_loss):
        assert tuple(x.shape) == shape
    for x in inputs:
        assert x.grad is not None and x.grad.shape == x.shape and not x.grad.any()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("option", OPTIONS)
@pytest.mark.parametrize("layout", list(EMPTY_LAYOUTS))
def test_empty_batch_losses(backend, option, layout):
    shape, ids, adv, kw, v = empty_inputs(layout, option)
    logits = torch.randn(*shape, v, device=DEVICE, requires_grad=True)
    assert_empty_loss(gk.grpo_loss(logits, ids, adv, backend=backend, **kw), layout, logits)
    config = kw.pop("config")
    logits.grad = None
    assert_empty_loss(gk.GRPOLoss(config, backend=backend)(logits, ids, adv, **kw), layout, logits)

    logps, entropy = (torch.randn(shape, device=DEVICE, requires_grad=True) for _ in range(2))
    assert_empty_loss(gk.grpo_loss_from_logprobs(logps, adv, entropy=entropy, config=config, backend=backend, **kw),
                      layout, logps)

    hidden = torch.randn(*shape, H, device=DEVICE, requires_grad=True)
    weight = torch.randn(v, H, device=DEVICE, requires_grad=True)
    assert_empty_loss(gk.fused_linear_grpo_loss(hidden, weight, ids, adv, config=config, backend=backend, **kw),
                      layout, hidden, weight)
    hidden.grad = weight.grad = None
    assert_empty_loss(gk.FusedLinearGRPOLoss(config, backend=backend)(hidden, weight, ids, adv, **kw),
                      layout, hidden, weight)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", list(EMPTY_LAYOUTS))
def test_empty_batch_logprobs(backend, layout):
    shape, ids, _, kw, v = empty_inputs(layout, "grpo")
    logits = torch.randn(*shape, v, device=DEVICE, requires_grad=True)
    logp, entropy = gk.selective_logprobs(logits, ids, return_entropy=True, mask=kw["mask"],
                                          cu_seqlens=kw["cu_seqlens"], backend=backend)
    (logp.sum() + entropy.sum()).backward()
    assert logp.shape == entropy.shape == shape and logits.grad.shape == logits.shape
    hidden = torch.randn(*shape, H, device=DEVICE, requires_grad=True)
    weight = torch.randn(v, H, device=DEVICE, requires_grad=True)
    logp, entropy = gk.fused_linear_selective_logprobs(hidden, weight, ids, return_entropy=True, backend=backend)
    (logp.sum() + entropy.sum()).backward()
    assert logp.shape == entropy.shape == shape and hidden.grad.shape == hidden.shape
    assert not weight.grad.any()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("grouping", [dict(group_size=4), dict(group_ids=torch.zeros(0, dtype=torch.long))])
@pytest.mark.parametrize("rewards, kw", [
    (torch.zeros(0), dict()),
    (torch.zeros(0, 3), dict(reward_aggregation="normalize_then_sum")),
    (torch.zeros(0, 2), dict(scale_rewards="rloo", reward_weights=[1.0, 0.5])),
])
def test_empty_batch_advantages(backend, grouping, rewards, kw):
    grouping = {k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in grouping.items()}
    out = gk.group_advantages(rewards.to(DEVICE), backend=backend, **grouping, **kw)
    assert out.advantages.shape == (0,) and out.group_mean.shape == out.group_std.shape == (0,)
    assert out.group_index.shape == (0,) and out.frac_zero_std.item() == 0.0
    assert out.advantages.dtype == out.group_mean.dtype == torch.float32


def test_empty_batch_still_checks_the_arguments():
    """Nothing to compute is no licence for wrong arguments: the metadata checks still run."""
    with pytest.raises(ValueError, match="group_size=1"):
        gk.group_advantages(torch.zeros(0), group_size=1)
    with pytest.raises(ValueError, match=r"advantages must have shape \(0,\)"):
        gk.grpo_loss(torch.zeros(0, 4, 5), torch.zeros(0, 4, dtype=torch.long), torch.zeros(2))


@pytest.mark.parametrize("fn", PUBLIC, ids=lambda f: f.__name__)
def test_every_public_docstring_states_the_empty_batch_rule(fn):
    assert "empty batch" in inspect.getdoc(fn).lower()


def test_first_on_policy_loss_is_minus_the_mean_advantage():
    """What examples/quickstart.py prints to explain its loss of 0."""
    g = torch.Generator().manual_seed(5)
    logits, ids = torch.randn(8, 6, 50, generator=g), torch.randint(0, 50, (8, 6), generator=g)
    mask = torch.rand(8, 6, generator=g) > 0.2
    adv = torch.randn(8, generator=g)
    old = gk.selective_logprobs(logits, ids)
    out = gk.grpo_loss(logits, ids, adv, mask=mask, old_logps=old, loss_type="grpo", beta=0.0)
    torch.testing.assert_close(out.loss, -adv.mean())
    rewards = torch.randint(0, 2, (8,), generator=g).float()
    group_adv = gk.group_advantages(rewards, group_size=4).advantages
    assert abs(gk.grpo_loss(logits, ids, group_adv, mask=mask, old_logps=old, loss_type="grpo").loss.item()) < 1e-6

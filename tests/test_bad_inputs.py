"""Bad input raises a ValueError/TypeError naming the argument; nothing returns NaN silently."""
import pytest
import torch

import grpo_kernels as gk
from cases import make_case
from conftest import BACKENDS
from helpers import to_device


@pytest.fixture
def case():
    return to_device(make_case("k3", seed=3))


def call(case, **changes):
    kw = dict(logits=case.logits, ids=case.ids, advantages=case.advantages, mask=case.mask,
              old_logps=case.old_logps, ref_logps=case.ref_logps, config=case.config, backend="torch")
    kw.update(changes)
    return gk.grpo_loss(kw.pop("logits"), kw.pop("ids"), kw.pop("advantages"), **kw)


@pytest.mark.parametrize("changes, error, words", [
    (lambda c: dict(ids=c.ids[:, :-1]), ValueError, "ids must have shape"),
    (lambda c: dict(ids=c.ids.float()), TypeError, "ids must be an integer"),
    (lambda c: dict(ids=c.ids.masked_fill(c.mask, 10_000)), ValueError, "ids must lie in [0, V=37)"),
    (lambda c: dict(ids=c.ids.masked_fill(c.mask, -1)), ValueError, "ids must lie in"),
    (lambda c: dict(logits=c.logits.long()), TypeError, "logits must be a float"),
    (lambda c: dict(logits=c.logits[0]), ValueError, "logits must be padded (B, T, V)"),
    (lambda c: dict(mask=c.mask[:, :2]), ValueError, "mask must have shape"),
    (lambda c: dict(mask=c.mask.int() * 2), ValueError, "mask must hold only 0 and 1 (or be bool); found 2 ("),
    (lambda c: dict(advantages=torch.zeros(7)), ValueError, "advantages must have shape (4,)"),
    (lambda c: dict(advantages=torch.zeros(4, dtype=torch.long)), TypeError, "advantages must be a float"),
    (lambda c: dict(advantages=torch.tensor([0.0, float("nan"), 1.0, 2.0])), ValueError, "advantages contains NaN"),
    (lambda c: dict(old_logps=c.old_logps[:, :3]), ValueError, "old_logps must have shape"),
    (lambda c: dict(ref_logps=None), ValueError, "ref_logps is required when beta != 0"),
    (lambda c: dict(old_logps=c.old_logps.masked_fill(c.mask, float("nan"))), ValueError, "old_logps contains NaN"),
    (lambda c: dict(backend="nope"), ValueError, "backend='nope' is not valid"),
    (lambda c: dict(loss_type="ppo"), ValueError, "GRPOLossConfig.loss_type='ppo'"),
    (lambda c: dict(epsilon=-0.1), ValueError, "GRPOLossConfig.epsilon must be >= 0"),
    (lambda c: dict(not_an_option=1), TypeError, "unknown GRPOLossConfig option(s) ['not_an_option']"),
    (lambda c: dict(kl_estimator="k4"), ValueError, "GRPOLossConfig.kl_estimator"),
    (lambda c: dict(importance_sampling_level="seq"), ValueError, "importance_sampling_level"),
    (lambda c: dict(is_correction="token_truncate"), ValueError, "sampling_logps is required"),
    (lambda c: dict(num_items_in_batch=-3), ValueError, "num_items_in_batch"),
    (lambda c: dict(cu_seqlens=torch.tensor([0, 3], dtype=torch.int32)), ValueError,
     "logits must be packed (N, V) with cu_seqlens"),
    (lambda c: dict(config="grpo"), TypeError, "config must be a GRPOLossConfig"),
    (lambda c: dict(is_weights=torch.ones(4, 3)), ValueError, "is_weights must have shape"),
    (lambda c: dict(is_weights=-torch.ones_like(c.old_logps)), ValueError, "is_weights must be >= 0"),
    (lambda c: dict(is_weights=torch.full_like(c.old_logps, float("inf"))), ValueError, "is_weights contains"),
    (lambda c: dict(log_ratio_min=0.5), ValueError, "log_ratio_min must be < 0"),
    (lambda c: dict(log_ratio_max=-1.0), ValueError, "log_ratio_max must be > 0"),
    (lambda c: dict(cispo_weight_min=0.5), ValueError, "cispo_weight_min only applies to the cispo"),
    (lambda c: dict(loss_type="cispo", epsilon_high=2.0, cispo_weight_min=3.0), ValueError,
     "cispo_weight_min (3.0) must be <= the cispo cap"),
    (lambda c: dict(ratio_cap=2.0), ValueError, "ratio_cap only applies to the dppo_tv / dppo_kl policy loss"),
    (lambda c: dict(policy_loss="dppo_tv", ratio_cap=0.0), ValueError, "ratio_cap must be > 0"),
    (lambda c: dict(policy_loss="dro"), ValueError, "dro_beta is required by policy_loss='dro'"),
    (lambda c: dict(policy_loss="geo_mean"), ValueError, "needs importance_sampling_level='sequence'"),
])
def test_bad_input_is_named(case, changes, error, words):
    with pytest.raises(error) as info:
        call(case, **changes(case))
    assert words in str(info.value)


def test_device_mismatch_is_named(case):
    meta = case.old_logps.to("meta")
    with pytest.raises(ValueError, match="old_logps is on meta"):
        call(case, old_logps=meta)


# The checks below read the kernels' outputs (the log-probs they computed), so each backend is asked.
# The Triton interpreter computes in numpy, which warns on −inf − (−inf) and log(0) (IEEE NaN and
# −inf, as on a GPU); every warning being an error here, those two are let through.
def interpreter_ieee(test):
    test = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")(test)
    return pytest.mark.filterwarnings("ignore:divide by zero encountered:RuntimeWarning")(test)


@pytest.mark.parametrize("backend", BACKENDS)
@interpreter_ieee
def test_neg_inf_target_logit_is_reported(case, backend):
    logits = case.logits.clone()
    b, t = torch.nonzero(case.mask)[0].tolist()
    logits[b, t, case.ids[b, t]] = float("-inf")
    with pytest.raises(ValueError, match="target logit of some unmasked token is -inf"):
        call(case, logits=logits, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@interpreter_ieee
def test_neg_inf_target_in_masked_row_is_fine(case, backend):
    logits = case.logits.clone()
    b, t = torch.nonzero(~case.mask)[0].tolist()
    logits[b, t, :] = float("-inf")
    out = call(case, logits=logits, backend=backend)
    assert torch.isfinite(out.loss)


@pytest.mark.parametrize("truncation", [{}, dict(top_k=1), dict(top_k=5), dict(top_p=0.8), dict(min_p=0.1),
                                        dict(top_k=5, top_p=0.8, min_p=0.05)],
                         ids=["full", "top_k1", "top_k5", "top_p", "min_p", "all"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_logits_are_reported(case, backend, truncation):
    """A NaN logit anywhere in an unmasked row is reported, also when the truncation's threshold
    search would skip it (a NaN compares false with every bound): NaN entries stay in the kept set."""
    logits = case.logits.clone()
    b, t = torch.nonzero(case.mask)[0].tolist()
    logits[b, t, 3] = float("nan")
    with pytest.raises(ValueError, match="logits contain NaN"):
        call(case, logits=logits, backend=backend, config=case.config.replace(**truncation))


def test_unavailable_backend_raises_instead_of_falling_back(case, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    if torch.cuda.is_available():
        pytest.skip("triton is available on this machine")
    with pytest.raises(gk.BackendUnavailableError, match="backend='triton' is unavailable"):
        call(case, backend="triton")
    with pytest.raises(gk.BackendUnavailableError, match="backend='cuda'"):
        call(case, backend="cuda")


@pytest.mark.parametrize("kwargs, error, words", [
    (dict(group_size=3), ValueError, "group_size=3 does not divide"),
    (dict(group_size=1), ValueError, "group_size=1"),
    (dict(), ValueError, "exactly one of group_size"),
    (dict(group_size=2, group_ids=torch.zeros(8, dtype=torch.long)), ValueError, "exactly one of group_size"),
    (dict(group_ids=torch.tensor([0, 0, 1, 1, 2, 3, 3, 3])), ValueError, "groups of size 1 (ids [2])"),
    (dict(group_ids=torch.zeros(5, dtype=torch.long)), ValueError, "group_ids must have shape (8,)"),
    (dict(group_size=4, scale_rewards="std"), ValueError, "scale_rewards='std'"),
    (dict(group_size=4, reward_aggregation="mean"), ValueError, "reward_aggregation='mean'"),
    (dict(group_size=4, reward_weights=[1.0, 2.0]), ValueError, "reward_weights must have shape (1,)"),
    (dict(group_size=4, eps=0.0), ValueError, "eps must be a positive"),
])
def test_bad_advantage_inputs(kwargs, error, words):
    with pytest.raises(error) as info:
        gk.group_advantages(torch.randn(8), **kwargs)
    assert words in str(info.value)


def test_inf_reward_is_rejected():
    with pytest.raises(ValueError, match="rewards contain inf"):
        gk.group_advantages(torch.tensor([1.0, float("inf")]), group_size=2)


def test_config_validation_names_fields():
    with pytest.raises(ValueError, match="max_completion_length is required"):
        gk.GRPOLossConfig(loss_type="dr_grpo")
    with pytest.raises(ValueError, match="delta must be > 1"):
        gk.GRPOLossConfig(delta=0.5)
    with pytest.raises(ValueError, match="dual_clip must be > 1"):
        gk.GRPOLossConfig(dual_clip=1.0)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        gk.GRPOLossConfig(temperature=0)
    with pytest.raises(ValueError, match="top_entropy_quantile must be in"):
        gk.GRPOLossConfig(top_entropy_quantile=1.5)
    with pytest.raises(ValueError, match="is_clip_min .* must be < is_clip_max"):
        gk.GRPOLossConfig(is_clip_min=4.0, is_clip_max=3.0)
    with pytest.raises(ValueError, match="is_correction='token_mask' needs"):
        gk.GRPOLossConfig(is_correction="token_mask", is_clip_max=None)
    with pytest.raises(ValueError, match="policy_loss='ppo'"):
        gk.GRPOLossConfig(policy_loss="ppo")
    with pytest.raises(ValueError, match="beta must be a finite number"):
        gk.GRPOLossConfig(beta=float("nan"))


def test_config_defaults_follow_trl():
    trl = pytest.importorskip("trl")
    ours = gk.GRPOLossConfig()
    theirs = trl.GRPOConfig(output_dir="/tmp/unused", report_to=[], use_cpu=True, bf16=False)
    assert ours.loss_type == theirs.loss_type
    assert ours.epsilon == theirs.epsilon and ours.beta == theirs.beta
    assert ours.importance_sampling_level == theirs.importance_sampling_level
    assert ours.temperature == theirs.temperature
    assert ours.sapo_temperature_pos == theirs.sapo_temperature_pos
    assert ours.sapo_temperature_neg == theirs.sapo_temperature_neg
    assert ours.top_entropy_quantile == theirs.top_entropy_quantile
    assert ours.use_bias_correction_kl == theirs.use_bias_correction_kl
    assert ours.is_clip_max == theirs.vllm_importance_sampling_clip_max
    assert ours.is_clip_min == theirs.vllm_importance_sampling_clip_min
    assert ours.entropy_coef == theirs.entropy_coef and ours.delta == theirs.delta


def test_fused_linear_errors_name_hidden_and_weight():
    """The fused-linear path never had logits from the user: its errors speak of hidden and weight."""
    hidden, weight = torch.randn(2, 4, 8), torch.randn(50, 8)
    ids, adv = torch.randint(0, 50, (2, 4)), torch.randn(2)
    with pytest.raises(ValueError, match=r"ids must have shape \(2, 4\) \(one target token per hidden row\)"):
        gk.fused_linear_grpo_loss(hidden, weight, ids[:, :3], adv)
    with pytest.raises(ValueError, match=r"hidden @ weight.T \(\+ bias\) contain NaN .* check hidden and weight"):
        gk.fused_linear_grpo_loss(hidden * float("nan"), weight, ids, adv)
    with pytest.raises(ValueError, match=r"hidden @ weight.T \(\+ bias\) contain NaN"):
        gk.fused_linear_selective_logprobs(hidden, weight * float("nan"), ids)
    with pytest.raises(ValueError, match=r"hidden must be packed \(N, H\) with cu_seqlens"):
        gk.fused_linear_grpo_loss(hidden, weight, ids, adv, cu_seqlens=torch.tensor([0, 4, 8], dtype=torch.int32))
    with pytest.raises(ValueError, match="found 0.5"):
        gk.fused_linear_grpo_loss(hidden, weight, ids, adv, mask=torch.full((2, 4), 0.5))


def test_logprobs_path_errors_name_logps():
    logps = torch.randn(2, 4)
    with pytest.raises(ValueError, match=r"logps \(B, T\)"):
        gk.grpo_loss_from_logprobs(logps.reshape(-1), torch.randn(2))

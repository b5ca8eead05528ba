"""The reference against numbers computed by hand on tiny cases (one per option family)."""
import math

import pytest
import torch

import grpo_kernels as gk
from grpo_kernels import reference as R

ln = math.log
# Two sequences of two tokens; the last token is masked. Ratios rho = p / p_old = [[1.25, 1], [0.8, -]].
LOGP = torch.tensor([[ln(0.5), ln(0.25)], [ln(0.4), ln(0.2)]], dtype=torch.float64)
OLD = torch.tensor([[ln(0.4), ln(0.25)], [ln(0.5), ln(0.1)]], dtype=torch.float64)
MASK = torch.tensor([[True, True], [True, False]])
ADV = torch.tensor([1.0, -2.0], dtype=torch.float64)
ENT = torch.tensor([[1.0, 2.0], [3.0, 9.0]], dtype=torch.float64)


def objective(cfg, logp=LOGP, old=OLD, adv=ADV, **kw):
    return R.policy_objective(logp.clone(), ENT, adv, MASK, cfg, old_logp=old, **kw)


# Per-token clip losses: (0,0) rho 1.25 A 1 -> -1.2; (0,1) rho 1 -> -1; (1,0) rho .8 A -2 -> 1.6.
@pytest.mark.parametrize("loss_type, extra, expected", [
    ("grpo", {}, ((-1.2 - 1) / 2 + 1.6) / 2),
    ("bnpo", {}, (-1.2 - 1 + 1.6) / 3),
    ("dapo", {}, (-1.2 - 1 + 1.6) / 3),
    ("dapo", {"num_items_in_batch": 6}, (-1.2 - 1 + 1.6) / 6),
    ("bnpo", {"num_items_in_batch": 6}, (-1.2 - 1 + 1.6) / 3),  # bnpo keeps the local count
    ("dr_grpo", {}, (-1.2 - 1 + 1.6) / (2 * 4)),
    ("luspo", {}, ((-1.2 - 1) + 1.6) / 2),
])
def test_clip_loss_types(loss_type, extra, expected):
    cfg = gk.GRPOLossConfig(loss_type=loss_type, max_completion_length=4)
    assert objective(cfg, **extra).loss.item() == pytest.approx(expected, rel=1e-12)


def test_cispo():
    cfg = gk.GRPOLossConfig(loss_type="cispo", epsilon_high=1.1)
    per_token = [-1.1 * 1 * ln(0.5), -1.0 * 1 * ln(0.25), -0.8 * -2 * ln(0.4)]
    assert objective(cfg).loss.item() == pytest.approx(sum(per_token) / 3, rel=1e-12)


def test_sapo():
    cfg = gk.GRPOLossConfig(loss_type="sapo")
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    t00 = -sig(1.0 * 0.25) * 4 / 1.0 * 1
    t01 = -sig(0.0) * 4 / 1.0 * 1
    t10 = -sig(1.05 * -0.2) * 4 / 1.05 * -2
    assert objective(cfg).loss.item() == pytest.approx(((t00 + t01) / 2 + t10) / 2, rel=1e-12)


def test_two_sided_delta():
    cfg = gk.GRPOLossConfig(loss_type="grpo", delta=1.1)  # (0,0): -min(1.1, 1.2) = -1.1
    assert objective(cfg).loss.item() == pytest.approx(((-1.1 - 1) / 2 + 1.6) / 2, rel=1e-12)


def test_dual_clip():
    logp = torch.tensor([[ln(0.6)]], dtype=torch.float64)
    old = torch.tensor([[ln(0.2)]], dtype=torch.float64)  # rho = 3, A = -1: plain clip gives 3
    one = torch.ones(1, 1, dtype=torch.bool)
    for c, expected in ((None, 3.0), (2.0, 2.0), (4.0, 3.0)):
        cfg = gk.GRPOLossConfig(loss_type="grpo", dual_clip=c)
        got = R.policy_objective(logp, logp, torch.tensor([-1.0], dtype=torch.float64), one, cfg, old_logp=old)
        assert got.loss.item() == pytest.approx(expected, rel=1e-12)


def test_sequence_level_gspo():
    rho0 = math.sqrt(1.25)  # exp(mean(log 1.25, log 1))
    for level in ("sequence", "sequence_token"):
        cfg = gk.GRPOLossConfig(loss_type="grpo", importance_sampling_level=level)
        got = objective(cfg)
        assert got.loss.item() == pytest.approx((-rho0 + 1.6) / 2, rel=1e-12)
        assert got.metrics["ratio/mean"].item() == pytest.approx((2 * rho0 + 0.8) / 3, rel=1e-12)


def test_sequence_vs_sequence_token_gradients():
    """GSPO: the ratio's gradient flows through the sequence mean; GSPO-token: per token.

    They differ only with per-token advantages, here A = [1, 3].
    """
    logp = torch.tensor([[ln(0.5), ln(0.2)]], dtype=torch.float64)
    old = torch.tensor([[ln(0.4), ln(0.25)]], dtype=torch.float64)  # log ratios +a, -b
    one = torch.ones(1, 2, dtype=torch.bool)
    adv = torch.tensor([[1.0, 3.0]], dtype=torch.float64)
    rho = math.exp((ln(1.25) + ln(0.8)) / 2)  # = 1, inside the clip range
    grads = {}
    for level in ("sequence", "sequence_token"):
        x = logp.clone().requires_grad_(True)
        cfg = gk.GRPOLossConfig(loss_type="grpo", importance_sampling_level=level)
        R.policy_objective(x, x.detach(), adv, one, cfg, old_logp=old).loss.backward()
        grads[level] = x.grad
    # loss = mean_t(-rho_t A_t). sequence: d/dlogp_t = -(1/2)(A_0 + A_1) rho / 2 = -rho for both tokens;
    # sequence_token: d/dlogp_t = -(1/2) A_t rho.
    assert torch.allclose(grads["sequence"], torch.tensor([[-rho, -rho]], dtype=torch.float64))
    assert torch.allclose(grads["sequence_token"], torch.tensor([[-0.5 * rho, -1.5 * rho]], dtype=torch.float64))


REF = torch.tensor([[ln(0.5), ln(0.5)], [ln(0.2), ln(0.2)]], dtype=torch.float64)  # x = [0, ln2, -ln2]


@pytest.mark.parametrize("estimator, per_token", [
    ("k1", [0.0, -ln(2), ln(2)]),
    ("kl", [0.0, -ln(2), ln(2)]),
    ("k2", [0.0, ln(2) ** 2 / 2, ln(2) ** 2 / 2]),
    ("mse", [0.0, ln(2) ** 2 / 2, ln(2) ** 2 / 2]),
    ("k3", [0.0, 1 - ln(2), ln(2) - 0.5]),
    ("low_var_kl", [0.0, 1 - ln(2), ln(2) - 0.5]),
])
def test_kl_estimators(estimator, per_token):
    cfg = gk.GRPOLossConfig(loss_type="bnpo", beta=0.1, kl_estimator=estimator, use_bias_correction_kl=False)
    got = objective(cfg, old=None, adv=torch.zeros(2, dtype=torch.float64), ref_logp=REF)
    assert got.loss.item() == pytest.approx(0.1 * sum(per_token) / 3, rel=1e-12, abs=1e-15)
    assert got.metrics["kl"].item() == pytest.approx(sum(per_token) / 3, rel=1e-12, abs=1e-15)


def test_kl_clamp_and_bias_correction():
    cfg = gk.GRPOLossConfig(loss_type="bnpo", beta=1.0, kl_estimator="k3", kl_clamp=0.25,
                            use_bias_correction_kl=True)
    got = objective(cfg, adv=torch.zeros(2, dtype=torch.float64), ref_logp=REF)
    # k3 = [0, 0.307, 0.193] clamped at 0.25, times rho = [1.25, 1, 0.8].
    expected = [0.0, min(1 - ln(2), 0.25) * 1.0, min(ln(2) - 0.5, 0.25) * 0.8]
    assert got.loss.item() == pytest.approx(sum(expected) / 3, rel=1e-12)


SAMPLING = torch.tensor([[ln(0.5), ln(0.5)], [ln(0.4), ln(0.4)]], dtype=torch.float64)  # d = [0, ln .5 | 0]


@pytest.mark.parametrize("mode, weights", [
    ("token_truncate", [1.0, 0.6, 1.0]),
    ("token_mask", [1.0, 0.0, 1.0]),
    ("sequence_truncate", [0.6, 0.6, 1.0]),
    ("sequence_mask", [0.0, 0.0, 1.0]),
])
def test_is_correction(mode, weights):
    cfg = gk.GRPOLossConfig(loss_type="bnpo", is_correction=mode, is_clip_min=0.6, is_clip_max=3.0)
    got = objective(cfg, old=None, sampling_logp=SAMPLING)  # on policy: per token -A = [-1, -1, 2]
    expected = (-1 * weights[0] - 1 * weights[1] + 2 * weights[2]) / 3
    assert got.loss.item() == pytest.approx(expected, rel=1e-12)
    assert got.metrics["is_ratio/mean"].item() == pytest.approx(sum(weights) / 3, rel=1e-12)


def test_off_policy_mask_drops_negative_stale_sequences():
    cfg = gk.GRPOLossConfig(loss_type="grpo", off_policy_mask_threshold=0.1)
    # seq 1: A < 0 and mean(old - logp) = ln(0.5/0.4) = 0.223 > 0.1 -> dropped.
    assert objective(cfg).loss.item() == pytest.approx((-1.2 - 1) / 2 / 2, rel=1e-12)


def test_entropy_mask_and_bonus():
    # masked entropies [1, 2, 3]; q = 0.5 keeps H >= median 2: tokens (0,1) and (1,0).
    cfg = gk.GRPOLossConfig(loss_type="bnpo", top_entropy_quantile=0.5, entropy_coef=0.5)
    got = objective(cfg)
    assert got.loss.item() == pytest.approx((-1 + 1.6) / 3 - 0.5 * (2 + 3) / 2, rel=1e-12)


@pytest.mark.parametrize("agg, expected", [
    ("seq-mean-token-mean", ((-1.2 - 1) / 2 + 1.6) / 2),
    ("token-mean", (-1.2 - 1 + 1.6) / 3),
    ("seq-mean-token-sum", (-2.2 + 1.6) / 2),
    ("seq-mean-token-sum-norm", (-2.2 + 1.6) / (2 * 5)),
])
def test_aggregations(agg, expected):
    cfg = gk.GRPOLossConfig(loss_type="dapo", loss_agg_mode=agg, max_completion_length=5)
    assert objective(cfg).loss.item() == pytest.approx(expected, rel=1e-12)


def test_logprobs_and_entropy_by_hand():
    logits = torch.tensor([[0.0, ln(3.0), float("-inf")]], dtype=torch.float64)
    logp, entropy = R.logprobs_and_entropy(logits, torch.tensor([1]))
    assert logp.item() == pytest.approx(ln(0.75), rel=1e-14)
    assert entropy.item() == pytest.approx(-(0.25 * ln(0.25) + 0.75 * ln(0.75)), rel=1e-14)
    logp_t, _ = R.logprobs_and_entropy(logits, torch.tensor([1]), temperature=0.5)  # p ∝ [1, 9]
    assert logp_t.item() == pytest.approx(ln(0.9), rel=1e-14)


G0, G1 = math.sqrt(0.5), math.sqrt(4.5)  # Bessel std of [1, 2] and [3, 6]


@pytest.mark.parametrize("mode, expected", [
    ("group", [-0.5 / (G0 + 1e-4), 0.5 / (G0 + 1e-4), -1.5 / (G1 + 1e-4), 1.5 / (G1 + 1e-4)]),
    ("none", [-0.5, 0.5, -1.5, 1.5]),
    ("rloo", [-1.0, 1.0, -3.0, 3.0]),
    ("batch", [x / (math.sqrt(14 / 3) + 1e-4) for x in (-0.5, 0.5, -1.5, 1.5)]),
    ("reinforce++", [x / (math.sqrt(5 / 3) + 1e-4) for x in (-0.5, 0.5, -1.5, 1.5)]),
])
def test_advantage_modes(mode, expected):
    rewards = torch.tensor([1.0, 2.0, 3.0, 6.0], dtype=torch.float64)
    ref = R.group_advantages(rewards, torch.tensor([0, 0, 1, 1]), 2, scale_rewards=mode)
    assert ref.advantages.tolist() == pytest.approx(expected, rel=1e-12)
    out = gk.group_advantages(rewards, group_size=2, scale_rewards=mode)
    assert out.advantages.tolist() == pytest.approx(expected, rel=1e-6)
    assert out.group_mean.tolist() == pytest.approx([1.5, 4.5]) and out.group_std.tolist() == pytest.approx([G0, G1])


def test_advantages_nan_and_equal_groups():
    rewards = torch.tensor([1.0, 1.0, float("nan"), 2.0, 5.0, 5.0, 0.0, 4.0])
    out = gk.group_advantages(rewards, group_size=2)
    assert out.advantages[:6].tolist() == [0.0] * 6
    assert out.advantages[6:].tolist() == pytest.approx([-2 / (math.sqrt(8) + 1e-4), 2 / (math.sqrt(8) + 1e-4)])
    assert out.frac_zero_std.item() == pytest.approx(0.75)


def test_gdpo_normalize_then_sum():
    rewards = torch.tensor([[1.0, 0.0], [2.0, 1.0], [3.0, 1.0], [6.0, 1.0]], dtype=torch.float64)
    z1 = [-0.5 / (G0 + 1e-4), 0.5 / (G0 + 1e-4), -1.5 / (G1 + 1e-4), 1.5 / (G1 + 1e-4)]
    z2 = [-0.5 / (G0 + 1e-4), 0.5 / (G0 + 1e-4), 0.0, 0.0]
    s = [a + 2 * b for a, b in zip(z1, z2)]
    mean = sum(s) / 4
    std = math.sqrt(sum((x - mean) ** 2 for x in s) / 3)
    expected = [(x - mean) / (std + 1e-4) for x in s]
    out = gk.group_advantages(rewards, group_size=2, reward_weights=[1.0, 2.0], reward_aggregation="normalize_then_sum")
    assert out.advantages.tolist() == pytest.approx(expected, rel=1e-6)
    ref = R.group_advantages(rewards, torch.tensor([0, 0, 1, 1]), 2, reward_weights=torch.tensor([1.0, 2.0]),
                             reward_aggregation="normalize_then_sum")
    assert ref.advantages.tolist() == pytest.approx(expected, rel=1e-12)

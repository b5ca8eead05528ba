"""Every metric the TRL drop-in logs, against the metrics TRL's own `GRPOTrainer._compute_loss` logs.

FusedGRPOTrainer logs TRL's metric names itself (`_log_trl_metrics`, and `_entropy_controller` for
the entropy bonus), partly from the kernels' metrics and partly recomputed as TRL does. TRL's
`_compute_loss` runs on a stand-in trainer (test_trl_parity) on the same logits, and every metric it
logs must be logged by us under the same name with the same value. The inputs are fresh per case,
with old log-probs drifted away from the current ones so that ratios fall outside the clip range on
both sides: at ratio == 1 nothing is clipped and a wrong clip metric would still read 0 == 0.

Cases beyond test_trl_parity's: sequence-level ratios with one advantage per sequence (TRL then
averages its clip indicators over rows, including a row without tokens), and delta at or below
1 + epsilon_high (TRL counts min(ratio, delta) > 1 + epsilon_high, which then never holds).
"""
import math
import zlib
from collections import defaultdict
from types import MethodType, SimpleNamespace

import pytest
import torch

import grpo_kernels as gk
from cases import make_case
from grpo_kernels.entropy_control import applied_entropy_coef

pytest.importorskip("trl")
from trl.trainer.grpo_trainer import GRPOTrainer  # noqa: E402

from grpo_kernels.integrations import trl as integration  # noqa: E402
from test_trl_parity import _Accelerator, quantile_between_tokens, run_trl  # noqa: E402

# id -> (shared case id from tests/cases.py, GRPOLossConfig overrides)
CASES = {
    "grpo": ("grpo", {}),
    "dapo": ("dapo", {}),
    "cispo": ("cispo", {}),
    "luspo": ("luspo", {}),
    "gspo": ("gspo", {}),
    "two_sided_delta": ("two_sided_delta", {}),
    "asym_clip": ("asym_clip", {}),
    "k3_bias_corr": ("k3_bias_corr", {}),
    "trl_defaults_kl": ("trl_defaults_kl", {}),
    "gspo_bias_corr": ("gspo_bias_corr", {}),
    "vespo": ("vespo", {}),
    "vespo_token_adv": ("vespo_token_adv", {}),
    "vespo_is_seq_mask": ("vespo_is_seq_mask", {}),
    "entropy_mask_bonus": ("entropy_mask_bonus", {}),
    "per_token_adv": ("per_token_adv", {}),
    "gspo_clipping": ("gspo", dict(epsilon=0.05, epsilon_high=0.05)),
    "gspo_token_adv": ("vespo_token_adv", dict(loss_type="grpo", importance_sampling_level="sequence", epsilon=0.05,
                                               epsilon_high=0.05)),
    "delta_below_high": ("grpo", dict(delta=1.1, epsilon=0.1, epsilon_high=0.2)),
    "delta_above_high": ("grpo", dict(delta=1.3, epsilon=0.1, epsilon_high=0.1)),
    "cispo_sequence": ("cispo", dict(importance_sampling_level="sequence", epsilon_high=1.02)),
    "luspo_seq": ("luspo", dict(importance_sampling_level="sequence", epsilon=0.05, epsilon_high=0.05)),
}
# 16 sequences (the last without tokens) of 8 tokens, old log-probs drifted by N(0, 0.5^2) per token:
# enough rows for sequence-level ratios to be clipped on both sides too.
SHAPE = dict(b=16, t=8, v=37)
DRIFT = 0.5
FP64_METRICS = ("policy_loss", "entropy_coef")


def metrics_case(name):
    """The case's inputs in fp64, seeded by its id, as test_trl_parity's `trl_case` prepares them."""
    base, overrides = CASES[name]
    case = make_case(base, seed=zlib.crc32(name.encode()) % 10_000, drift=DRIFT, dtype=torch.float64, **SHAPE)
    # TRL's entropy_from_logits turns -inf logits into NaN entropies (0 * -inf); ours does not.
    case.logits = case.logits.masked_fill(torch.isinf(case.logits), -1e4)
    for field in ("advantages", "old_logps", "ref_logps", "sampling_logps"):
        if getattr(case, field) is not None:
            setattr(case, field, getattr(case, field).double())
    case.config = case.config.replace(**overrides)
    return quantile_between_tokens(case)


def logged_by_us(case, out):
    """What FusedGRPOTrainer._compute_loss logs after its loss call: the same two calls, in order."""
    cfg, mask = case.config, case.mask.long()
    me = SimpleNamespace(_metrics={"train": defaultdict(list)}, accelerator=_Accelerator(),
                         _entropy_bonus_enabled=cfg.entropy_coef != 0, entropy_coef=cfg.entropy_coef,
                         use_adaptive_entropy=False)
    me.get_high_entropy_mask = MethodType(GRPOTrainer.get_high_entropy_mask, me)
    if me._entropy_bonus_enabled:
        global_count = cfg.uses_num_items_in_batch and cfg.loss_type in integration.TOKEN_MEAN_GLOBAL
        integration._entropy_controller(me, "train", out, mask, cfg, global_count)
    integration._log_trl_metrics(me, "train", out, dict(advantages=case.advantages), mask, case.old_logps, cfg)
    assert all(len(v) == 1 for v in me._metrics["train"].values())
    return {k: v[-1] for k, v in me._metrics["train"].items()}


def clippable(case, logps):
    """How many (valid token or non-empty row, advantage) pairs TRL's clip indicators can count, below
    and above the clip range, from its raw ratio coef_1 (before the delta cap)."""
    cfg, m = case.config, case.mask
    log_ratio = torch.where(m, logps - case.old_logps, 0.0)
    adv = case.advantages if case.advantages.dim() == 2 else case.advantages[:, None]
    if cfg.importance_sampling_level == "token":
        ratio, valid = log_ratio.exp(), m
    else:
        ratio = (log_ratio.sum(-1, keepdim=True) / m.sum(-1, keepdim=True).clamp(min=1)).exp()
        valid = m.any(-1, keepdim=True)
    ratio, adv, valid = torch.broadcast_tensors(ratio, adv, valid)
    low, high = (1 - cfg.eps_low, 1 + cfg.eps_high) if cfg.pg_loss == "clip" else (-math.inf, cfg.eps_high)
    return int(((ratio < low) & (adv < 0) & valid).sum()), int(((ratio > high) & (adv > 0) & valid).sum())


@pytest.mark.parametrize("name", list(CASES))
def test_logged_metrics_match_trl(name):
    case = metrics_case(name)
    cfg = case.config
    out = gk.grpo_loss(case.logits, case.ids, case.advantages, backend="torch", **case.kwargs())
    _, _, want = run_trl(case, torch.float64)
    got = logged_by_us(case, out)
    assert set(got) == set(want)
    for key, expected in want.items():
        # `_log_trl_metrics` reduces in fp32 (TRL's clip indicators are fp32 too), so it matches TRL's
        # fp64 kl, entropy and phi to fp32 rounding; the entropy controller's values stay fp64.
        rel = 1e-12 if key in FP64_METRICS else 1e-6
        if math.isnan(expected):
            assert math.isnan(got[key]), key
        else:
            assert got[key] == pytest.approx(expected, rel=rel, abs=1e-12), key

    # Not vacuous: ratios leave the clip range on both sides, and TRL counts clipped tokens.
    if cfg.pg_loss == "clip":
        below, above = clippable(case, out.logps.detach())
        assert below > 0 and above > 0, (below, above)
        assert want["clip_ratio/low_mean"] > 0 and want["clip_ratio/region_mean"] > 0
        if cfg.delta is not None and cfg.delta <= 1 + cfg.eps_high:
            assert want["clip_ratio/high_mean"] == 0  # TRL counts min(ratio, delta) > 1 + epsilon_high
        else:
            assert want["clip_ratio/high_mean"] > 0
    elif cfg.pg_loss == "cispo":
        assert clippable(case, out.logps.detach())[1] > 0
        assert want["cispo_clip_ratio"] > 0


def test_applied_entropy_coef_gates_as_trl():
    """TRL applies `coef if last_world_entropy <= target else 0` when adaptive: NaN turns it off."""
    for last, kept in ((0.4, False), (float("inf"), False), (float("nan"), False), (0.3, True), (0.2, True)):
        assert applied_entropy_coef(0.05, last, adaptive=True, target=0.3) == (0.05 if kept else 0.0), last
    for last in (0.4, float("nan"), float("inf"), 0.3, 0.2):
        assert applied_entropy_coef(0.05, last, adaptive=False, target=0.3) == 0.05, last

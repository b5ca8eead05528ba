"""Parity with TRL's GRPOTrainer loss math: TRL's own `_compute_loss` runs on the same logits.

A stand-in trainer object supplies the attributes `_compute_loss` reads and serves per-token
log-probs and entropies computed by TRL's own utilities from our logits, so the loss, its
gradient w.r.t. the logits and TRL's logged metrics can be compared with `grpo_loss`.
"""
import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

import grpo_kernels as gk
from cases import make_case
from helpers import assert_close, assert_grad_close

trl = pytest.importorskip("trl")
from trl.trainer.grpo_trainer import GRPOTrainer  # noqa: E402
from trl.trainer.utils import entropy_from_logits, selective_log_softmax  # noqa: E402


class _Accelerator:
    num_processes = 1
    sync_gradients = True

    def gather(self, x):
        return x

    gather_for_metrics = gather

    def reduce(self, x, reduction="sum"):
        return x

    def pad_across_processes(self, x, dim=0, pad_index=0):
        return x


class _TRLStandIn:
    """Just enough of a GRPOTrainer for `_compute_loss` to run on given logits."""

    def __init__(self, cfg: gk.GRPOLossConfig, logits):
        self.logits, self.temperature = logits, cfg.temperature
        self.loss_type = cfg.loss_type
        self.epsilon_low, self.epsilon_high = cfg.eps_low, cfg.eps_high
        self.beta = cfg.beta
        self.importance_sampling_level = cfg.importance_sampling_level
        self.top_entropy_quantile = cfg.top_entropy_quantile
        self.off_policy_mask_threshold = cfg.off_policy_mask_threshold
        self.use_vllm = self.vllm_importance_sampling_correction = cfg.is_correction is not None
        self.max_completion_length = cfg.max_completion_length
        self.args = SimpleNamespace(delta=cfg.delta, sapo_temperature_pos=cfg.sapo_temperature_pos,
                                    sapo_temperature_neg=cfg.sapo_temperature_neg, steps_per_generation=1,
                                    use_bias_correction_kl=cfg.use_bias_correction_kl)
        self.model = SimpleNamespace(training=True)
        self.current_gradient_accumulation_steps = 1
        self.accelerator = _Accelerator()
        self._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
        self._entropy_bonus_enabled = cfg.entropy_coef != 0
        self.entropy_coef, self.use_adaptive_entropy = cfg.entropy_coef, False
        self.aux_loss_enabled = False

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, **kw):
        logp = selective_log_softmax(self.logits, input_ids[:, -logits_to_keep:], self.temperature)
        return logp, entropy_from_logits(self.logits / self.temperature), None

    compute_loss = GRPOTrainer._compute_loss
    get_high_entropy_mask = GRPOTrainer.get_high_entropy_mask
    get_off_policy_mask = staticmethod(GRPOTrainer.get_off_policy_mask)


def trl_is_ratio(old, sampling, mask, mode, lo, hi):
    """The rollout IS ratio exactly as TRL's _generate_and_score_completions builds it."""
    diff = torch.nan_to_num((old - sampling) * mask, nan=0.0)
    ratio = torch.exp(diff.sum(-1, keepdim=True) if mode.startswith("sequence") else diff)
    if mode.endswith("truncate"):
        return torch.clamp(ratio, min=lo, max=hi)
    lo = -math.inf if lo is None else lo
    hi = math.inf if hi is None else hi
    return ratio.masked_fill((ratio < lo) | (ratio > hi), 0.0)


def run_trl(case):
    """TRL in fp32, as it runs in practice (in fp64 its entropy quantile rounds through fp32)."""
    cfg = case.config
    logits = case.logits.detach().float().clone().requires_grad_(True)
    b = case.ids.shape[0]
    m = case.mask.long()
    inputs = dict(prompt_ids=torch.zeros(b, 1, dtype=torch.long), prompt_mask=torch.ones(b, 1, dtype=torch.long),
                  completion_ids=case.ids, completion_mask=m, advantages=case.advantages.float(),
                  old_per_token_logps=case.old_logps.float(),
                  num_items_in_batch=torch.tensor(float(case.num_items_in_batch or m.sum())))
    if case.ref_logps is not None:
        inputs["ref_per_token_logps"] = case.ref_logps.float()
    if case.sampling_logps is not None:
        inputs["sampling_per_token_logps"] = case.sampling_logps.float()
    if cfg.is_correction is not None:
        inputs["importance_sampling_ratio"] = trl_is_ratio(case.old_logps.float(), case.sampling_logps.float(), m,
                                                           cfg.is_correction, cfg.is_clip_min, cfg.is_clip_max)
    trainer = _TRLStandIn(cfg, logits)
    loss = trainer.compute_loss(None, inputs)
    loss.backward()
    return loss.detach(), logits.grad, {k: v[-1] for k, v in trainer._metrics["train"].items()}


CASES = [
    ("grpo", {}), ("bnpo", {}), ("dr_grpo", {}), ("dapo", {}), ("dapo_num_items", {}), ("cispo", {}), ("sapo", {}),
    ("luspo", {}), ("gspo", {}), ("two_sided_delta", {}), ("asym_clip", {}), ("temperature", {}),
    ("k3", {}), ("k3_bias_corr", {"use_bias_correction_kl": False}), ("entropy_bonus", {}), ("entropy_mask", {}),
    ("entropy_mask_bonus", {}), ("off_policy_mask", {}), ("is_token_truncate", {}), ("is_token_mask", {}),
    ("is_sequence_truncate", {}), ("is_sequence_mask", {}), ("per_token_adv", {}),
]


@pytest.mark.parametrize("option, overrides", CASES, ids=[c[0] for c in CASES])
def test_same_numbers_as_trl(option, overrides):
    case = make_case(option, seed=31, drift=0.15)
    # TRL's entropy_from_logits turns -inf logits into NaN entropies (0 * -inf); ours does not.
    case.logits = case.logits.masked_fill(torch.isinf(case.logits), -1e4)
    case.config = case.config.replace(**overrides)
    expected_loss, expected_grad, trl_metrics = run_trl(case)
    logits = case.logits.clone().requires_grad_(True)
    out = gk.grpo_loss(logits, case.ids, case.advantages, backend="torch", **case.kwargs())
    out.loss.backward()
    assert_close(out.loss, expected_loss, rtol=1e-5, atol=1e-6, name="loss")
    assert_grad_close(logits.grad, expected_grad, rel=1e-5)
    assert_close(out.metrics["entropy"], trl_metrics["entropy"], rtol=1e-5, atol=1e-6, name="entropy")
    if "kl" in trl_metrics:
        assert_close(out.metrics["kl"], trl_metrics["kl"], rtol=1e-5, atol=1e-6, name="kl")
    if case.config.pg_loss == "clip" and case.config.importance_sampling_level == "token":
        for name in ("low", "high", "region"):
            assert_close(out.metrics[f"clip_ratio/{name}"], trl_metrics[f"clip_ratio/{name}_mean"], name=name)


def test_bias_corrected_kl_value_matches_trl():
    """TRL multiplies the KL by the ratio without detaching it; SPEC.md detaches it. Values agree."""
    case = make_case("k3_bias_corr", seed=32, drift=0.15)
    expected_loss, _, trl_metrics = run_trl(case)
    out = gk.grpo_loss(case.logits, case.ids, case.advantages, backend="torch", **case.kwargs())
    assert_close(out.loss, expected_loss, rtol=1e-5, atol=1e-6, name="loss")
    assert_close(out.metrics["kl"], trl_metrics["kl"], rtol=1e-5, atol=1e-6, name="kl")

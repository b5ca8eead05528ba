"""Parity with TRL's GRPOTrainer loss math: TRL's own `_compute_loss` runs on the same logits.

A stand-in trainer object supplies the attributes `_compute_loss` reads and serves per-token
log-probs and entropies computed by TRL's own utilities from our logits (with TRL's own logit
transform for softcapped / scaled models), so the loss, its gradient w.r.t. the logits and TRL's
logged metrics can be compared with `grpo_loss`: in fp64 on the torch backend to ~1e-9, and in
fp32 on every backend to ~2e-5, at TRL's defaults (bias-corrected KL) and for every option.
"""
import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

import grpo_kernels as gk
from cases import make_case
from conftest import BACKENDS
from helpers import assert_close, assert_grad_close, to_device

trl = pytest.importorskip("trl")
from trl.kernels.chunked_logprob import _torch_transform  # noqa: E402
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
                                    use_bias_correction_kl=cfg.use_bias_correction_kl, vespo_k_pos=cfg.vespo_k_pos,
                                    vespo_lambda_pos=cfg.vespo_lambda_pos, vespo_k_neg=cfg.vespo_k_neg,
                                    vespo_lambda_neg=cfg.vespo_lambda_neg)
        self.logit_scale, self.softcap = cfg.logit_scale, cfg.final_logit_softcapping
        self.model = SimpleNamespace(training=True)
        self.current_gradient_accumulation_steps = 1
        self.accelerator = _Accelerator()
        self._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
        self._entropy_bonus_enabled = cfg.entropy_coef != 0
        self.entropy_coef, self.use_adaptive_entropy = cfg.entropy_coef, False
        self.aux_loss_enabled = False

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, **kw):
        # TRL's fused LM head transforms the logits with this function before its log-softmax.
        z = _torch_transform(self.logits, self.logit_scale, self.softcap or 1.0, 1.0 / self.temperature,
                             self.softcap is not None)
        logp = selective_log_softmax(z, input_ids[:, -logits_to_keep:])
        return logp, entropy_from_logits(z), None

    compute_loss = GRPOTrainer._compute_loss
    get_high_entropy_mask = GRPOTrainer.get_high_entropy_mask
    get_off_policy_mask = staticmethod(GRPOTrainer.get_off_policy_mask)
    get_gamma_weights = staticmethod(GRPOTrainer.get_gamma_weights)


def trl_is_ratio(old, sampling, mask, mode, lo, hi):
    """The rollout IS ratio exactly as TRL's _generate_and_score_completions builds it."""
    diff = torch.nan_to_num((old - sampling) * mask, nan=0.0)
    ratio = torch.exp(diff.sum(-1, keepdim=True) if mode.startswith("sequence") else diff)
    if mode.endswith("truncate"):
        return torch.clamp(ratio, min=lo, max=hi)
    lo = -math.inf if lo is None else lo
    hi = math.inf if hi is None else hi
    return ratio.masked_fill((ratio < lo) | (ratio > hi), 0.0)


def run_trl(case, dtype=torch.float32):
    """TRL's _compute_loss on the case's logits in `dtype`: (loss, grad w.r.t. logits, metrics)."""
    cfg = case.config
    logits = case.logits.detach().to(dtype).clone().requires_grad_(True)
    b = case.ids.shape[0]
    m = case.mask.long()
    cast = lambda x: x.to(dtype)  # noqa: E731
    inputs = dict(prompt_ids=torch.zeros(b, 1, dtype=torch.long), prompt_mask=torch.ones(b, 1, dtype=torch.long),
                  completion_ids=case.ids, completion_mask=m, advantages=cast(case.advantages),
                  old_per_token_logps=cast(case.old_logps),
                  num_items_in_batch=torch.tensor(float(case.num_items_in_batch or m.sum()), dtype=dtype))
    if case.ref_logps is not None:
        inputs["ref_per_token_logps"] = cast(case.ref_logps)
    if case.sampling_logps is not None:
        inputs["sampling_per_token_logps"] = cast(case.sampling_logps)
    if cfg.is_correction is not None:
        inputs["importance_sampling_ratio"] = trl_is_ratio(cast(case.old_logps), cast(case.sampling_logps), m,
                                                           cfg.is_correction, cfg.is_clip_min, cfg.is_clip_max)
    trainer = _TRLStandIn(cfg, logits)
    loss = trainer.compute_loss(None, inputs)
    loss.backward()
    return loss.detach(), logits.grad, {k: v[-1] for k, v in trainer._metrics["train"].items()}


# Every option TRL 1.16 has, by the shared case ids (TRL's KL is k3 only; it has no dual clip,
# log-ratio clamps or given IS weights).
CASES = [
    "grpo", "bnpo", "dr_grpo", "dapo", "dapo_num_items", "cispo", "sapo", "luspo", "gspo", "sapo_sequence",
    "two_sided_delta", "asym_clip", "temperature", "k3", "k3_bias_corr", "trl_defaults_kl", "gspo_bias_corr",
    "entropy_bonus", "entropy_mask", "entropy_mask_bonus", "off_policy_mask", "is_token_truncate", "is_token_mask",
    "is_sequence_truncate", "is_sequence_mask", "per_token_adv", "vespo", "vespo_token_adv", "vespo_is_token",
    "vespo_is_seq_mask", "softcap", "logit_scale", "softcap_scale",
]


def trl_case(option, dtype):
    case = make_case(option, seed=31, drift=0.15, dtype=dtype)
    # TRL's entropy_from_logits turns -inf logits into NaN entropies (0 * -inf); ours does not.
    case.logits = case.logits.masked_fill(torch.isinf(case.logits), -1e4)
    return case


def compare_with_trl(out, grad, case, dtype, *, rtol):
    expected_loss, expected_grad, trl_metrics = run_trl(case, dtype)
    atol = rtol * 1e-1
    assert_close(out.loss, expected_loss, rtol=rtol, atol=atol, name="loss")
    assert_grad_close(grad, expected_grad, rel=rtol)
    assert_close(out.metrics["entropy"], trl_metrics["entropy"], rtol=rtol, atol=atol, name="entropy")
    if "kl" in trl_metrics:
        assert_close(out.metrics["kl"], trl_metrics["kl"], rtol=rtol, atol=atol, name="kl")
    cfg = case.config
    if cfg.pg_loss == "clip" and cfg.importance_sampling_level == "token":
        for name in ("low", "high", "region"):
            assert_close(out.metrics[f"clip_ratio/{name}"], trl_metrics[f"clip_ratio/{name}_mean"], name=name)
    if "cispo_clip_ratio" in trl_metrics:  # TRL averages a .float() mask: fp32 whatever the inputs
        assert_close(out.metrics["cispo_clip_ratio"], trl_metrics["cispo_clip_ratio"], name="cispo_clip_ratio")
    if "vespo/phi_seq_mean" in trl_metrics:
        assert_close(out.metrics["vespo/phi_seq_mean"], trl_metrics["vespo/phi_seq_mean"], rtol=rtol, atol=atol,
                     name="vespo/phi_seq_mean")


def quantile_between_tokens(case):
    """TRL takes the entropy quantile of `.float()` entropies, so a token sitting exactly at the
    quantile can flip; keep the quantile's position between two tokens (interpolated)."""
    q = case.config.top_entropy_quantile
    if q < 1.0:
        n = int(case.mask.sum())
        while abs((1 - q) * (n - 1) - round((1 - q) * (n - 1))) < 0.2:
            q -= 0.01
        case.config = case.config.replace(top_entropy_quantile=q)
    return case


@pytest.mark.parametrize("option", CASES)
def test_same_numbers_as_trl_fp64(option):
    """fp64 in, fp64 out: a user validating against TRL in fp64 sees ~1e-12, not fp32 rounding."""
    case = quantile_between_tokens(trl_case(option, torch.float64))
    logits = case.logits.clone().requires_grad_(True)
    out = gk.grpo_loss(logits, case.ids, case.advantages.double(), backend="torch", **case.kwargs())
    out.loss.backward()
    assert out.loss.dtype == torch.float64 and logits.grad.dtype == torch.float64
    assert all(v.dtype == torch.float64 for v in out.metrics.values())
    compare_with_trl(out, logits.grad, case, torch.float64, rtol=1e-9)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("option", CASES)
def test_same_numbers_as_trl_fp32(backend, option):
    case = trl_case(option, torch.float32)
    dev = to_device(trl_case(option, torch.float32))
    logits = dev.logits.clone().requires_grad_(True)
    out = gk.grpo_loss(logits, dev.ids, dev.advantages, backend=backend, **dev.kwargs())
    out.loss.backward()
    compare_with_trl(out, logits.grad.cpu(), case, torch.float32, rtol=2e-5)


@pytest.mark.parametrize("backend", ["triton", "cpp", "cuda"])
def test_fp32_backends_refuse_fp64(backend):
    case = trl_case("grpo", torch.float64)
    with pytest.raises(TypeError, match=f"backend='{backend}' computes in fp32"):
        gk.grpo_loss(case.logits, case.ids, case.advantages.double(), backend=backend, **case.kwargs())

"""Shared case generator: fresh random inputs and every loss option, for every backend's tests."""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from grpo_kernels import GRPOLossConfig
from grpo_kernels import reference as R

# (id, GRPOLossConfig overrides, needs) — `needs` lists the optional inputs a case uses.
OPTION_CASES = [
    ("grpo", dict(loss_type="grpo"), ()),
    ("bnpo", dict(loss_type="bnpo"), ("num_items",)),
    ("dr_grpo", dict(loss_type="dr_grpo", max_completion_length=9), ()),
    ("dapo", dict(loss_type="dapo"), ()),
    ("dapo_num_items", dict(loss_type="dapo"), ("num_items",)),
    ("cispo", dict(loss_type="cispo", epsilon_high=1.1), ()),
    ("sapo", dict(loss_type="sapo"), ()),
    ("luspo", dict(loss_type="luspo"), ()),
    ("gspo", dict(loss_type="grpo", importance_sampling_level="sequence", epsilon=3e-4, epsilon_high=4e-4), ()),
    ("gspo_token", dict(loss_type="grpo", importance_sampling_level="sequence_token", epsilon=0.05), ()),
    ("sapo_sequence", dict(loss_type="sapo", importance_sampling_level="sequence"), ()),
    ("log_ratio_clamp", dict(loss_type="grpo", log_ratio_min=-0.1, log_ratio_max=0.15, epsilon=0.3), ()),
    ("gspo_clamp", dict(loss_type="grpo", importance_sampling_level="sequence", log_ratio_min=-0.04,
                        log_ratio_max=0.05, epsilon=0.2), ()),
    ("gspo_token_clamp", dict(loss_type="grpo", importance_sampling_level="sequence_token", log_ratio_max=0.05,
                              epsilon=0.2), ()),
    ("cispo_two_sided", dict(loss_type="cispo", epsilon_high=1.1, cispo_weight_min=0.9, log_ratio_min=-0.5,
                             log_ratio_max=0.5), ()),
    ("is_weights", dict(loss_type="dapo"), ("is_weights",)),
    ("asym_clip", dict(loss_type="dapo", epsilon=0.2, epsilon_high=0.28), ()),
    ("two_sided_delta", dict(loss_type="grpo", delta=1.3), ()),
    ("dual_clip", dict(loss_type="grpo", dual_clip=1.5, epsilon=0.05), ()),
    ("k1", dict(loss_type="grpo", beta=0.1, kl_estimator="k1"), ("ref",)),
    ("k2", dict(loss_type="grpo", beta=0.1, kl_estimator="mse"), ("ref",)),
    ("k3", dict(loss_type="grpo", beta=0.1, kl_estimator="k3", use_bias_correction_kl=False), ("ref",)),
    ("k3_bias_corr", dict(loss_type="dapo", beta=0.1, kl_estimator="low_var_kl"), ("ref",)),
    ("k3_clamped", dict(loss_type="grpo", beta=0.1, kl_estimator="k3", kl_clamp=0.5), ("ref",)),
    ("temperature", dict(loss_type="grpo", temperature=0.7), ()),
    ("entropy_bonus", dict(loss_type="dapo", entropy_coef=0.05), ()),
    ("entropy_mask", dict(loss_type="grpo", top_entropy_quantile=0.4), ()),
    ("entropy_mask_bonus", dict(loss_type="dapo", top_entropy_quantile=0.5, entropy_coef=0.1), ()),
    ("off_policy_mask", dict(loss_type="grpo", off_policy_mask_threshold=0.05), ("sampling",)),
    ("is_token_truncate", dict(is_correction="token_truncate", is_clip_max=1.2), ("sampling",)),
    ("is_token_mask", dict(is_correction="token_mask", is_clip_min=0.8, is_clip_max=1.25), ("sampling",)),
    ("is_sequence_truncate", dict(is_correction="sequence_truncate", is_clip_max=1.5), ("sampling",)),
    ("is_sequence_mask", dict(is_correction="sequence_mask", is_clip_min=0.3, is_clip_max=3.0), ("sampling",)),
    ("agg_override", dict(loss_type="grpo", loss_agg_mode="seq-mean-token-sum"), ()),
    ("seq_is_weights", dict(loss_type="dapo"), ("seq_is_weights",)),
    ("trl_defaults_kl", dict(beta=0.04), ("ref", "num_items")),  # dapo, bias-corrected k3 with its gradient
    ("gspo_bias_corr", dict(loss_type="grpo", importance_sampling_level="sequence", beta=0.1, epsilon=3e-4,
                            epsilon_high=4e-4), ("ref",)),
    ("gspo_token_bias_corr", dict(loss_type="grpo", importance_sampling_level="sequence_token", beta=0.1,
                                  log_ratio_max=0.2), ("ref",)),
    ("vespo", dict(loss_type="vespo"), ("num_items",)),
    ("vespo_token_adv", dict(loss_type="vespo", vespo_k_neg=2.5, vespo_lambda_pos=2.0), ("token_adv",)),
    ("vespo_is_token", dict(loss_type="vespo", is_correction="token_truncate", is_clip_max=1.2), ("sampling",)),
    ("vespo_is_seq_mask", dict(loss_type="vespo", is_correction="sequence_mask", is_clip_min=0.5, is_clip_max=2.0),
     ("sampling",)),
    ("vespo_is_weights", dict(loss_type="vespo", beta=0.05), ("is_weights", "ref")),
    ("vespo_seq_is_weights", dict(loss_type="vespo"), ("seq_is_weights",)),
    ("softcap", dict(loss_type="grpo", final_logit_softcapping=3.0, temperature=0.9), ()),
    ("logit_scale", dict(loss_type="dapo", logit_scale=0.7, entropy_coef=0.05), ()),
    ("softcap_scale", dict(loss_type="grpo", final_logit_softcapping=2.5, logit_scale=1.6, beta=0.05), ("ref",)),
    ("per_token_adv", dict(loss_type="grpo"), ("token_adv",)),
    # verl's policy losses beyond clip / cispo / sapo (tests/test_verl_policy_losses.py checks them against verl).
    ("dppo_tv", dict(policy_loss="dppo_tv", epsilon=0.004, epsilon_high=0.006, ratio_cap=1.3), ()),
    ("dppo_kl", dict(policy_loss="dppo_kl", epsilon=2e-4, epsilon_high=3e-4, ratio_cap=1.2, log_ratio_max=20.0),
     ("token_adv",)),
    ("dro", dict(policy_loss="dro", dro_beta=0.7), ("is_weights",)),
    ("kl_cov", dict(policy_loss="kl_cov", kl_cov_coef=0.3, loss_agg_mode="seq-mean-token-sum"), ()),
    ("geo_mean", dict(policy_loss="geo_mean", importance_sampling_level="sequence", epsilon=0.1, epsilon_high=0.15,
                      loss_agg_mode="seq-mean-token-mean"), ("seq_is_weights",)),
    ("geo_mean_token_adv", dict(policy_loss="geo_mean", importance_sampling_level="sequence", epsilon=0.12),
     ("token_adv",)),
    ("everything", dict(loss_type="grpo", beta=0.05, entropy_coef=0.01, temperature=1.3, epsilon_high=0.3,
                        dual_clip=2.0, off_policy_mask_threshold=0.2, is_correction="token_truncate",
                        is_clip_max=2.0, top_entropy_quantile=0.8), ("ref", "sampling")),
]
OPTION_IDS = [c[0] for c in OPTION_CASES]


@dataclasses.dataclass
class Case:
    logits: torch.Tensor  # (B, T, V) in the case dtype
    ids: torch.Tensor
    mask: torch.Tensor
    advantages: torch.Tensor
    old_logps: torch.Tensor
    ref_logps: Optional[torch.Tensor]
    sampling_logps: Optional[torch.Tensor]
    is_weights: Optional[torch.Tensor]
    num_items_in_batch: Optional[int]
    config: GRPOLossConfig

    def kwargs(self):
        return dict(mask=self.mask, old_logps=self.old_logps, ref_logps=self.ref_logps,
                    sampling_logps=self.sampling_logps, is_weights=self.is_weights,
                    num_items_in_batch=self.num_items_in_batch, config=self.config)


def make_logits(b, t, v, dtype=torch.float32, *, seed=0, scale=2.0, neg_inf_frac=0.05, ids=None):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, t, v, generator=g, dtype=torch.float64) * scale
    if neg_inf_frac:
        holes = torch.rand(b, t, v, generator=g) < neg_inf_frac
        if ids is not None:
            holes.scatter_(-1, ids.unsqueeze(-1), False)
        logits = logits.masked_fill(holes, float("-inf"))
    return logits.to(dtype)


def make_case(option_id, *, b=4, t=7, v=37, dtype=torch.float32, seed=0, drift=0.3) -> Case:
    overrides, needs = next((o, n) for i, o, n in OPTION_CASES if i == option_id)
    g = torch.Generator().manual_seed(1000 + seed)
    ids = torch.randint(0, v, (b, t), generator=g)
    logits = make_logits(b, t, v, dtype, seed=seed, ids=ids)
    mask = torch.rand(b, t, generator=g) > 0.25
    mask[0, :] = True
    mask[-1, :] = False  # an all-masked sequence is allowed
    mask[1, 0] = True
    true_logp, _ = R.logprobs_and_entropy(logits.double() / 1.0, ids, overrides.get("temperature", 1.0))
    noise = lambda: torch.randn(b, t, generator=g, dtype=torch.float64) * drift  # noqa: E731
    old = (true_logp + noise()).float()
    ref = (true_logp + noise()).float() if "ref" in needs else None
    sampling = (old.double() + noise()).float() if "sampling" in needs else None
    adv_shape = (b, t) if "token_adv" in needs else (b,)
    advantages = torch.randn(adv_shape, generator=g)
    num_items = int(mask.sum()) + 5 if "num_items" in needs else None
    is_weights = None
    if "is_weights" in needs or "seq_is_weights" in needs:
        # truncated weights with some exact zeros, as masked rollout correction gives; one per
        # sequence (B,) as Liger's vllm_is_ratio takes them, or one per token
        is_weights = torch.rand((b,) if "seq_is_weights" in needs else (b, t), generator=g) * 2
        is_weights[is_weights < 0.3] = 0.0
    return Case(logits, ids, mask, advantages, old, ref, sampling, is_weights, num_items, GRPOLossConfig(**overrides))


def reference_result(case: Case):
    """fp64 reference: loss, grad w.r.t. logits, per-token loss, logp, entropy, metrics."""
    logits = case.logits.detach().double().requires_grad_(True)
    as64 = lambda x: None if x is None else x.double()  # noqa: E731
    terms, logp, entropy = R.grpo_loss(
        logits, case.ids, case.advantages.double(), mask=case.mask, old_logps=as64(case.old_logps),
        ref_logps=as64(case.ref_logps), sampling_logps=as64(case.sampling_logps), is_weights=as64(case.is_weights),
        num_items_in_batch=case.num_items_in_batch, config=case.config,
    )
    terms.loss.backward()
    m = case.mask
    return dict(loss=terms.loss.detach(), grad=logits.grad, per_token_loss=terms.per_token_loss,
                logps=torch.where(m, logp.detach(), 0.0), entropy=torch.where(m, entropy.detach(), 0.0),
                metrics=terms.metrics)


def poison_like(x: torch.Tensor) -> torch.Tensor:
    """A same-shaped buffer full of NaN, to reveal any element a kernel fails to write."""
    return torch.full_like(x, float("nan"))

"""Drop-in use from verl: our fused objective as verl policy losses (`losses.py`), our fused-linear
log-probs as verl's `FusedLinearForPPO` / `linear_cross_entropy` (`fused_linear.py`).

    from grpo_kernels.integrations import verl as gk_verl
    gk_verl.register()          # policy_loss.loss_mode = "grpo_kernels_<name>" for verl's 12 policy losses
    gk_verl.patch_fused_linear()  # with actor_rollout_ref.model.use_fused_kernels=True

Installing grpo_kernels also declares a `verl.plugins` entry point (`..verl_plugin`), so verl
registers the losses in every worker process when it is imported (and patches the fused-linear
path there when GRPO_KERNELS_VERL_FUSED_LINEAR=1).

Advantage estimators (`advantages.py`): `register_estimators()` registers every verl estimator but
gae as `grpo_kernels_<name>` (algorithm.adv_estimator=grpo_kernels_grpo, ...). Rollout correction
(`rollout_correction.py`): `rollout_correction(...)` is verl's
compute_rollout_correction_and_rejection_mask with one host read; `patch_rollout_correction()`
puts it in verl's place. `patch_sum_pi_squared()` (`sum_pi_squared.py`) gives verl's FSDP actor
Σπ² from our fused-linear pass. The plugin does all three (docs/verl.md).
"""
from .advantages import ESTIMATORS, advantage_estimator_fn, patch_compute_advantage, register_estimators
from .covariance import clip_cov_selection, kl_cov_selection
from .fused_linear import FusedLinearForPPO, linear_cross_entropy, patch_fused_linear
from .losses import (
    GLOBAL_BATCH_KEYS,
    GSPO_LOG_RATIO_MAX,
    KL_LOSS_TYPES,
    LOSS_AGG_MODES,
    LOSS_MODES,
    LOSS_NAME_PREFIX,
    LOW_VAR_KL_CLAMP,
    TOKEN_LOG_RATIO_BOUND,
    aggregation,
    kl_loss,
    loss_config,
    policy_loss_fn,
    policy_metrics,
    register,
    verls_own_policy_loss,
)
from .rollout_correction import patch_rollout_correction, rollout_correction
from .sum_pi_squared import patch_sum_pi_squared

__all__ = [
    "ESTIMATORS", "advantage_estimator_fn", "patch_compute_advantage", "register_estimators",
    "patch_rollout_correction", "rollout_correction", "patch_sum_pi_squared",
    "FusedLinearForPPO", "linear_cross_entropy", "patch_fused_linear",
    "GLOBAL_BATCH_KEYS", "GSPO_LOG_RATIO_MAX", "KL_LOSS_TYPES", "LOSS_AGG_MODES", "LOSS_MODES", "LOSS_NAME_PREFIX",
    "LOW_VAR_KL_CLAMP", "TOKEN_LOG_RATIO_BOUND",
    "aggregation", "kl_loss", "loss_config", "policy_loss_fn", "policy_metrics", "register",
    "verls_own_policy_loss",
    "clip_cov_selection", "kl_cov_selection",
]

"""Our fused objective as verl's policy losses (registered as `grpo_kernels_<loss_mode>`) and its
fused `kl_loss`.

Each registered loss has verl's signature and returns the numbers of verl's loss of the same
name, aggregation (`loss_agg_mode` with `config.global_batch_info`) and metrics included:
  - vanilla: PPO clip with clip_ratio_low/high, dual clip with clip_ratio_c, log-ratio
    clamped to ±20;
  - gspo: GSPO-token (sequence ratio, per-token gradient), log sequence ratio clamped to <= 10;
  - cispo: detached weight clamp(ratio, 1 − clip_ratio_low, 1 + clip_ratio_high) times A·logp;
  - sapo: soft gates with tau_pos / tau_neg, always aggregated "seq-mean-token-mean".
`rollout_is_weights` multiply the policy term, as in verl. Where verl would divide by zero (a
micro-batch without tokens and no global counts) the loss is 0, not NaN.
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import torch

from ...config import GRPOLossConfig
from ...losses import grpo_loss_from_logprobs

try:
    from verl.trainer.ppo import core_algos
except ImportError as exc:  # pragma: no cover - exercised only without verl
    raise ImportError("grpo_kernels.integrations.verl needs verl: pip install 'grpo_kernels[verl]'") from exc

LOSS_MODES = ("vanilla", "gspo", "cispo", "sapo")
LOSS_NAME_PREFIX = "grpo_kernels_"
LOSS_AGG_MODES = ("token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")
GLOBAL_BATCH_KEYS = ("dp_size", "batch_num_tokens", "global_batch_size", "loss_scale_factor")
# verl's stability clamps: token log-ratios (vanilla, cispo, sapo) and GSPO's log sequence ratio.
TOKEN_LOG_RATIO_BOUND = 20.0
GSPO_LOG_RATIO_MAX = 10.0
# verl's low_var_kl clamps the estimate to ±10 (and its log-ratio to ±20, which kl_clamp implies).
LOW_VAR_KL_CLAMP = 10.0
KL_LOSS_TYPES = {"kl": "k1", "k1": "k1", "mse": "k2", "k2": "k2", "k2+": "k2", "mse+": "k2",
                 "low_var_kl": "k3", "k3": "k3"}


def _option(config, name: str, default):
    value = config.get(name, default) if hasattr(config, "get") else getattr(config, name, default)
    return default if value is None else value


def _check_loss_mode(loss_mode: str) -> None:
    if loss_mode not in LOSS_MODES:
        raise ValueError(f"loss_mode={loss_mode!r} has no grpo_kernels version; expected one of {list(LOSS_MODES)}")


def loss_config(loss_mode: str, config) -> GRPOLossConfig:
    """The GRPOLossConfig computing verl's `loss_mode` policy term for this actor config.

    Aggregation is set separately (see `aggregation`); it is "token-mean" here.
    """
    _check_loss_mode(loss_mode)
    if config is None:
        raise ValueError("config (verl's actor config) is required by the grpo_kernels policy losses")
    clip = _option(config, "clip_ratio", 0.2)
    low = _option(config, "clip_ratio_low", clip)
    high = _option(config, "clip_ratio_high", clip)
    common = dict(loss_type="dapo", loss_agg_mode="token-mean")
    token_clamp = dict(log_ratio_min=-TOKEN_LOG_RATIO_BOUND, log_ratio_max=TOKEN_LOG_RATIO_BOUND)
    if loss_mode == "vanilla":
        clip_c = _option(config, "clip_ratio_c", 3.0)
        if not clip_c > 1.0:
            raise ValueError(f"actor.clip_ratio_c must be > 1 for dual-clip PPO, got {clip_c}")
        return GRPOLossConfig(policy_loss="clip", epsilon=low, epsilon_high=high, dual_clip=float(clip_c),
                              **token_clamp, **common)
    if loss_mode == "gspo":
        return GRPOLossConfig(policy_loss="clip", epsilon=low, epsilon_high=high,
                              importance_sampling_level="sequence_token", log_ratio_max=GSPO_LOG_RATIO_MAX, **common)
    if loss_mode == "cispo":
        # verl's cispo weight is clamp(ratio, 1 - low, 1 + high); ratio > 0, so a negative lower bound is no bound.
        return GRPOLossConfig(policy_loss="cispo", epsilon_high=1.0 + high, cispo_weight_min=max(0.0, 1.0 - low),
                              **token_clamp, **common)
    return GRPOLossConfig(policy_loss="sapo", sapo_temperature_pos=float(_option(config, "tau_pos", 1.0)),
                          sapo_temperature_neg=float(_option(config, "tau_neg", 1.05)), **token_clamp, **common)


def aggregation(loss_agg_mode: str, mask: torch.Tensor, global_batch_info: Optional[Dict[str, Any]] = None
                ) -> Tuple[str, torch.Tensor]:
    """verl's `agg_loss` as (our loss_agg_mode, factor): verl's loss = our loss (with
    num_items_in_batch=1 for "token-mean", i.e. the plain masked sum) times `factor`.

    mask (B, T). global_batch_info: verl's dp_size, batch_num_tokens, global_batch_size,
    loss_scale_factor (any may be missing or None, with verl's defaults).
    """
    info = dict(global_batch_info or {})
    unknown = sorted(set(info) - set(GLOBAL_BATCH_KEYS))
    if unknown:
        raise ValueError(f"global_batch_info has unknown keys {unknown}; verl's are {list(GLOBAL_BATCH_KEYS)}")
    if loss_agg_mode not in LOSS_AGG_MODES:
        raise ValueError(f"loss_agg_mode={loss_agg_mode!r} is not valid; expected one of {list(LOSS_AGG_MODES)}")
    dp_size = info.get("dp_size") or 1
    mask = mask.bool()

    def required(key, local):
        value = info.get(key)
        if value is not None:
            return value
        if dp_size > 1:
            raise ValueError(f"global_batch_info[{key!r}] is required when dp_size > 1 (dp_size={dp_size})")
        return local

    ours, scale = "token-mean", 1.0
    if loss_agg_mode == "token-mean":
        denom = required("batch_num_tokens", mask.sum())
    elif loss_agg_mode == "token-sum":
        denom = 1.0
    else:
        denom = required("global_batch_size", (mask.sum(-1) > 0).sum())
        if loss_agg_mode == "seq-mean-token-sum-norm":
            scale_factor = info.get("loss_scale_factor")
            denom = denom * (mask.shape[-1] if scale_factor is None else scale_factor)
        if loss_agg_mode == "seq-mean-token-mean":
            # Our seq-mean-token-mean divides the sum of per-sequence means by B.
            ours, scale = "seq-mean-token-mean", float(mask.shape[0])
    denom = torch.as_tensor(denom, dtype=torch.float32, device=mask.device)
    denom = torch.where(denom > 0, denom, torch.ones_like(denom))
    return ours, scale * dp_size / denom


@torch.no_grad()
def policy_metrics(loss_mode: str, cfg: GRPOLossConfig, kernel_metrics: Dict[str, torch.Tensor], old_log_prob,
                   log_prob, advantages, mask) -> Dict[str, float]:
    """verl's actor/pg_clipfrac, actor/ppo_kl and actor/pg_clipfrac_lower, by verl's definitions.

    verl's are plain masked token means over the micro-batch (verl_F.masked_mean, whatever the
    loss_agg_mode), as the kernels' metrics are. `kernel_metrics`: the loss call's `out.metrics`.
      - pg_clipfrac of vanilla and gspo, −A·clip(ρ) > −A·ρ, is ρ < 1 − ε_low with A < 0 or
        ρ > 1 + ε_high with A > 0 (ρ clamped as verl clamps it, which the config does too): the
        kernels' `clip_ratio/region`, taken from there.
    The kernels report no equivalent of the others, so they are computed here:
      - ppo_kl: the mean of −(logπ − logπ_old), clamped to ±20 except for gspo (whose clamp acts
        on the sequence log-ratio);
      - pg_clipfrac_lower (vanilla): max(−A·ρ, −A·clip(ρ)) > −A·c with A < 0, which is ρ > c with
        A < 0 since c > 1 ≥ 1 − ε_low;
      - pg_clipfrac (cispo): the detached weight is clamped, ρ outside [1 − ε_low, 1 + ε_high]
        whatever A's sign (the kernels' cispo_clip_ratio is TRL's: ρ > ε_high with A > 0).
    """
    m = mask.bool()
    count = m.sum() + 1e-8  # verl_F.masked_mean's normaliser

    def masked_mean(x):
        return torch.where(m, x.float(), 0.0).sum() / count

    log_ratio = log_prob.detach().float() - old_log_prob.float()
    if loss_mode != "gspo":
        log_ratio = log_ratio.clamp(-TOKEN_LOG_RATIO_BOUND, TOKEN_LOG_RATIO_BOUND)
    ratio = log_ratio.exp()
    zero = torch.zeros((), device=ratio.device)
    clipfrac = lower = zero
    if loss_mode in ("vanilla", "gspo"):
        clipfrac = kernel_metrics["clip_ratio/region"]
    if loss_mode == "vanilla":
        lower = masked_mean((ratio > cfg.dual_clip) & (advantages < 0))
    elif loss_mode == "cispo":
        clipfrac = masked_mean(ratio != ratio.clamp(cfg.cispo_weight_min, cfg.eps_high))
    return {"actor/pg_clipfrac": clipfrac.item(), "actor/ppo_kl": (-masked_mean(log_ratio)).item(),
            "actor/pg_clipfrac_lower": lower.item()}


def policy_loss_fn(loss_mode: str, backend: str = "auto"):
    """verl's `loss_mode` policy loss, computed by our fused objective, with verl's signature:
    (old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config, rollout_is_weights)
    -> (loss, metrics). All tensors (B, T); only `log_prob` is differentiated.
    """
    _check_loss_mode(loss_mode)

    def policy_loss(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode: str = "token-mean",
                    config=None, rollout_is_weights=None):
        cfg = loss_config(loss_mode, config)
        if loss_mode == "sapo":
            loss_agg_mode = "seq-mean-token-mean"  # verl's sapo ignores the configured mode
        ours, factor = aggregation(loss_agg_mode, response_mask, _option(config, "global_batch_info", {}))
        cfg = cfg.replace(loss_agg_mode=ours)
        out = grpo_loss_from_logprobs(
            log_prob, advantages, mask=response_mask, old_logps=old_log_prob, is_weights=rollout_is_weights,
            num_items_in_batch=1 if ours == "token-mean" else None, config=cfg, backend=backend,
        )
        loss = out.loss * factor.to(out.loss.device)
        return loss, policy_metrics(loss_mode, cfg, out.metrics, old_log_prob, log_prob, advantages, response_mask)

    policy_loss.__name__ = f"{LOSS_NAME_PREFIX}{loss_mode}"
    policy_loss.__qualname__ = policy_loss.__name__
    return policy_loss


def kl_loss(log_prob, ref_log_prob, response_mask, kl_loss_type: str = "low_var_kl",
            loss_agg_mode: str = "token-mean", global_batch_info=None, backend: str = "auto") -> torch.Tensor:
    """verl's `agg_loss(kl_penalty(log_prob, ref_log_prob, kl_loss_type), response_mask, loss_agg_mode,
    **global_batch_info)` in one fused pass (the actor's `kl_loss`, before `kl_loss_coef`).

    Tensors (B, T). kl_loss_type: kl/k1, mse/k2 (and k2+/mse+, the same), low_var_kl/k3.
    "abs", "full" and the straight-through "k1+"/"k3+" raise ValueError.
    """
    if kl_loss_type not in KL_LOSS_TYPES:
        raise ValueError(f"kl_loss_type={kl_loss_type!r} is not supported by grpo_kernels; "
                         f"expected one of {sorted(KL_LOSS_TYPES)}")
    kind = KL_LOSS_TYPES[kl_loss_type]
    ours, factor = aggregation(loss_agg_mode, response_mask, global_batch_info)
    cfg = GRPOLossConfig(loss_type="dapo", loss_agg_mode=ours, beta=1.0, kl_estimator=kind,
                         kl_clamp=LOW_VAR_KL_CLAMP if kind == "k3" else None, use_bias_correction_kl=False)
    # Zero advantages make the policy term exactly 0 (value and gradient): only beta·KL remains.
    out = grpo_loss_from_logprobs(
        log_prob, torch.zeros(log_prob.shape[0], device=log_prob.device), mask=response_mask,
        ref_logps=ref_log_prob, num_items_in_batch=1 if ours == "token-mean" else None, config=cfg, backend=backend,
    )
    return out.loss * factor.to(out.loss.device)


def register(backend: str = "auto", prefix: str = LOSS_NAME_PREFIX) -> Tuple[str, ...]:
    """Register our versions of verl's policy losses under `prefix` + loss mode in verl's
    registry (`policy_loss.loss_mode=grpo_kernels_vanilla`, ...). Returns the names."""
    names = []
    for mode in LOSS_MODES:
        name = f"{prefix}{mode}"
        core_algos.register_policy_loss(name)(policy_loss_fn(mode, backend))
        names.append(name)
    return tuple(names)

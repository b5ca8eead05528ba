"""Our fused objective as verl's policy losses (registered as `grpo_kernels_<loss_mode>`) and its
fused `kl_loss`.

Each registered loss has verl's signature and returns the numbers of verl 0.9.1's loss of the same
name: loss, gradient w.r.t. log_prob and metrics (same keys, same values), for every
`loss_agg_mode` with `config.global_batch_info`, with `rollout_is_weights`. How each maps onto
our option table (docs/verl.md has the table):
  - vanilla: clip with clip_ratio_low/high, dual clip with clip_ratio_c, log-ratio clamped to ±20;
  - dppo_tv / dppo_kl: the dppo kinds (trust region bounds clip_ratio_low/high, ratio cap
    clip_ratio_c, default 20), log-ratio clamped to ±20;
  - gspo: GSPO-token (sequence ratio, per-token gradient), log sequence ratio clamped to <= 10;
  - sapo: soft gates with tau_pos / tau_neg, always aggregated "seq-mean-token-mean";
  - gpg: cispo with its weight clamped to [1, 1], i.e. −A·logp;
  - clip_cov: clip (no clamp, no dual clip) with the tokens verl's covariance rule selects
    weighted 0 (covariance.py: computed on the device, one host read for randperm's length);
  - kl_cov: the kl_cov kind, −A·ρ + c·|δ|, with c = ppo_kl_coef on the tokens of largest
    covariance and c = 0 on the others (two fused passes, each weighting the other's tokens 0);
  - geo_mean: the geo_mean kind (GMPO) at sequence level, the IS weights as their per-sequence
    geometric mean, averaged over the micro-batch's rows as verl does (whatever loss_agg_mode);
  - dro: the dro kind with policy_loss.dro_beta;
  - cispo: detached weight clamp(ratio, 1 − clip_ratio_low, 1 + clip_ratio_high) times A·logp;
  - bypass_mode: the rollout correction of (log_prob, old_log_prob = the rollout's), by our
    `rollout_correction` (verl's weights, mask and metrics in one host read), then vanilla on the
    rejection-masked tokens ("ppo_clip") or gpg with the IS weights ("reinforce").
`rollout_is_weights` multiply the per-token loss, as in verl. Where verl would divide by zero (a
micro-batch without tokens and no global counts) the loss is 0, not NaN.
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import torch

from ...config import GRPOLossConfig
from ...losses import grpo_loss_from_logprobs
from ...ops.torch_objective import dppo_trust_region

try:
    from verl.trainer.ppo import core_algos
    from verl.utils.torch_functional import masked_mean as verl_masked_mean
except ImportError as exc:  # pragma: no cover - exercised only without verl
    raise ImportError("grpo_kernels.integrations.verl needs verl: pip install 'grpo_kernels[verl]'") from exc

from .covariance import clip_cov_selection, kl_cov_selection  # noqa: E402 (needs verl)
from .rollout_correction import rollout_correction, verls_own_rollout_correction  # noqa: E402 (needs verl)

LOSS_MODES = ("vanilla", "dppo_tv", "dppo_kl", "gspo", "sapo", "gpg", "clip_cov", "kl_cov", "geo_mean", "dro", "cispo",
              "bypass_mode")
LOSS_NAME_PREFIX = "grpo_kernels_"
LOSS_AGG_MODES = ("token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")
GLOBAL_BATCH_KEYS = ("dp_size", "batch_num_tokens", "global_batch_size", "loss_scale_factor")
# verl's stability clamps: token log-ratios (vanilla, dppo, cispo, sapo) and GSPO's log sequence ratio.
TOKEN_LOG_RATIO_BOUND = 20.0
GSPO_LOG_RATIO_MAX = 10.0
# verl's low_var_kl clamps the estimate to ±10 (and its log-ratio to ±20, which kl_clamp implies).
LOW_VAR_KL_CLAMP = 10.0
KL_LOSS_TYPES = {"kl": "k1", "k1": "k1", "mse": "k2", "k2": "k2", "k2+": "k2", "mse+": "k2",
                 "low_var_kl": "k3", "k3": "k3"}
# verl's defaults of the options its losses read with config.get / policy_loss fields.
DPPO_RATIO_CAP = 20.0
POLICY_LOSS_DEFAULTS = dict(clip_cov_ratio=0.0002, clip_cov_lb=1.0, clip_cov_ub=5.0, kl_cov_ratio=0.0002,
                            ppo_kl_coef=1.0)
BYPASS_LOSS_TYPES = ("ppo_clip", "reinforce")
# The losses whose verl ppo_kl metric is taken on the ±20-clamped token log-ratio.
_CLAMPED_KL_MODES = ("vanilla", "dppo_tv", "dppo_kl", "sapo", "cispo")


def _option(config, name: str, default):
    value = config.get(name, default) if hasattr(config, "get") else getattr(config, name, default)
    return default if value is None else value


def _policy_option(config, name: str):
    """config.policy_loss.<name>, verl's default when unset (None)."""
    return _option(_option(config, "policy_loss", {}), name, POLICY_LOSS_DEFAULTS.get(name))


def _check_loss_mode(loss_mode: str) -> None:
    if loss_mode not in LOSS_MODES:
        raise ValueError(f"loss_mode={loss_mode!r} has no grpo_kernels version; expected one of {list(LOSS_MODES)}")


def _bypass_settings(config) -> dict:
    """verl's config.policy_loss.rollout_correction, checked as verl checks it."""
    settings = _option(config, "policy_loss", {})
    settings = settings.get("rollout_correction", None) if hasattr(settings, "get") else None
    if settings is None:
        raise ValueError("rollout_correction config not found in policy_loss. When using loss_mode='bypass_mode', "
                         "ensure rollout_correction config is passed.")
    loss_type = settings.get("loss_type", "ppo_clip")
    if loss_type not in BYPASS_LOSS_TYPES:
        raise ValueError(f"Invalid loss_type: {loss_type}. Must be 'reinforce' or 'ppo_clip'.")
    return dict(loss_type=loss_type, rollout_is=settings.get("rollout_is", None),
                rollout_is_threshold=settings.get("rollout_is_threshold", 2.0),
                rollout_is_batch_normalize=settings.get("rollout_is_batch_normalize", False),
                rollout_rs=settings.get("rollout_rs", None),
                rollout_rs_threshold=settings.get("rollout_rs_threshold", None))


def loss_config(loss_mode: str, config) -> GRPOLossConfig:
    """The GRPOLossConfig computing verl's `loss_mode` per-token policy term for this actor config.

    Aggregation is set separately (see `aggregation`); it is "token-mean" here (geo_mean:
    "seq-mean-token-mean"). kl_cov's is the term of its selected tokens (coefficient ppo_kl_coef);
    bypass_mode's is vanilla's or gpg's, as its rollout_correction.loss_type says.
    """
    _check_loss_mode(loss_mode)
    if config is None:
        raise ValueError("config (verl's actor config) is required by the grpo_kernels policy losses")
    if loss_mode == "bypass_mode":
        loss_mode = "vanilla" if _bypass_settings(config)["loss_type"] == "ppo_clip" else "gpg"
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
    if loss_mode in ("dppo_tv", "dppo_kl"):
        return GRPOLossConfig(policy_loss=loss_mode, epsilon=low, epsilon_high=high,
                              ratio_cap=float(_option(config, "clip_ratio_c", DPPO_RATIO_CAP)), **token_clamp, **common)
    if loss_mode == "gspo":
        return GRPOLossConfig(policy_loss="clip", epsilon=low, epsilon_high=high,
                              importance_sampling_level="sequence_token", log_ratio_max=GSPO_LOG_RATIO_MAX, **common)
    if loss_mode == "cispo":
        # verl's cispo weight is clamp(ratio, 1 - low, 1 + high); ratio > 0, so a negative lower bound is no bound.
        return GRPOLossConfig(policy_loss="cispo", epsilon_high=1.0 + high, cispo_weight_min=max(0.0, 1.0 - low),
                              **token_clamp, **common)
    if loss_mode == "gpg":  # −A·logp: cispo's detached weight pinned to 1
        return GRPOLossConfig(policy_loss="cispo", epsilon_high=1.0, cispo_weight_min=1.0, **token_clamp, **common)
    if loss_mode == "clip_cov":  # verl's clip_cov clamps no log-ratio and has no dual clip
        if not _policy_option(config, "clip_cov_ratio") > 0:
            raise ValueError("policy_loss.clip_cov_ratio must be > 0 for clip_cov")
        return GRPOLossConfig(policy_loss="clip", epsilon=low, epsilon_high=high, **common)
    if loss_mode == "kl_cov":
        if not _policy_option(config, "kl_cov_ratio") > 0:
            raise ValueError("policy_loss.kl_cov_ratio must be > 0 for kl_cov")
        return GRPOLossConfig(policy_loss="kl_cov", kl_cov_coef=float(_policy_option(config, "ppo_kl_coef")), **common)
    if loss_mode == "geo_mean":
        return GRPOLossConfig(policy_loss="geo_mean", importance_sampling_level="sequence", epsilon=low,
                              epsilon_high=high, loss_type="dapo", loss_agg_mode="seq-mean-token-mean")
    if loss_mode == "dro":
        beta = _policy_option(config, "dro_beta")
        if beta is None or beta <= 0:
            raise ValueError("policy_loss.dro_beta must be a positive value when using DRO")
        return GRPOLossConfig(policy_loss="dro", dro_beta=float(beta), **common)
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
    denom = torch.as_tensor(denom, dtype=torch.float64, device=mask.device)
    denom = torch.where(denom > 0, denom, torch.ones_like(denom))
    return ours, scale * dp_size / denom


@torch.no_grad()
def policy_metrics(loss_mode: str, cfg: GRPOLossConfig, kernel_metrics: Dict[str, torch.Tensor], old_log_prob,
                   log_prob, advantages, mask, selected: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
    """verl's metrics of `loss_mode` (its keys: actor/pg_clipfrac, actor/ppo_kl, actor/pg_clipfrac_lower,
    or the subset that loss reports) as 0-d tensors, by verl's definitions.

    verl's are masked token means over the micro-batch (verl_F.masked_mean, whatever the
    loss_agg_mode), taken here with verl's own masked_mean in the inputs' dtype; nothing is read on
    the host. `kernel_metrics`: the loss call's `out.metrics`; `selected`: clip_cov's selection.
      - pg_clipfrac of vanilla and gspo, −A·clip(ρ) > −A·ρ, is ρ < 1 − ε_low with A < 0 or
        ρ > 1 + ε_high with A > 0 (ρ clamped as verl clamps it, which the config does too): the
        kernels' `clip_ratio/region`, taken from there.
      - ppo_kl: the mean of −δ (δ = logπ − logπ_old), clamped to ±20 where verl clamps it; kl_cov's
        is the mean of |δ|;
      - pg_clipfrac_lower (vanilla): max(−A·ρ, −A·clip(ρ)) > −A·c with A < 0, which is ρ > c with
        A < 0 since c > 1 ≥ 1 − ε_low;
      - dppo: pg_clipfrac the share of tokens outside the trust region, pg_clipfrac_lower those
        inside it whose ratio exceeds the cap;
      - cispo: pg_clipfrac the share whose detached weight is clamped (ρ outside
        [1 − ε_low, 1 + ε_high], whatever A's sign);
      - clip_cov: pg_clipfrac the share of selected tokens;
      - geo_mean: tokens whose log-ratio is outside [−ε_low, ε_high], with A > 0 (pg_clipfrac) or
        A < 0 (pg_clipfrac_lower).
    """
    if loss_mode == "gpg":
        return {}

    def mean(x):
        return verl_masked_mean(x.to(log_prob.dtype), mask)

    log_ratio = log_prob.detach() - old_log_prob
    if loss_mode in _CLAMPED_KL_MODES:
        log_ratio = log_ratio.clamp(-TOKEN_LOG_RATIO_BOUND, TOKEN_LOG_RATIO_BOUND)
    ratio = log_ratio.exp()
    if loss_mode == "kl_cov":
        return {"actor/ppo_kl": mean(log_ratio.abs())}
    metrics = {"actor/ppo_kl": mean(-log_ratio)}
    if loss_mode == "dro":
        return metrics
    if loss_mode == "clip_cov":
        metrics["actor/pg_clipfrac"] = mean(selected)
        return metrics
    zero = torch.zeros((), dtype=log_prob.dtype, device=log_prob.device)
    clipfrac = lower = zero
    if loss_mode in ("vanilla", "gspo"):
        clipfrac = kernel_metrics["clip_ratio/region"]
    if loss_mode == "vanilla":
        lower = mean((ratio > cfg.dual_clip) & (advantages < 0))
    elif loss_mode in ("dppo_tv", "dppo_kl"):
        inside = dppo_trust_region(advantages, log_prob.detach(), old_log_prob, cfg.params)
        clipfrac, lower = mean(1.0 - inside), mean((ratio > cfg.ratio_cap) * inside)
    elif loss_mode == "cispo":
        clipfrac = mean(ratio != ratio.clamp(cfg.cispo_weight_min, cfg.eps_high))
    elif loss_mode == "geo_mean":
        outside = log_ratio != log_ratio.clamp(-cfg.eps_low, cfg.eps_high)
        clipfrac, lower = mean(outside & (advantages > 0)), mean(outside & (advantages < 0))
    metrics.update({"actor/pg_clipfrac": clipfrac, "actor/pg_clipfrac_lower": lower})
    return {key: metrics[key] for key in ("actor/pg_clipfrac", "actor/ppo_kl", "actor/pg_clipfrac_lower")}


def as_floats(metrics: Dict[str, torch.Tensor]) -> Dict[str, float]:
    """0-d tensors -> Python floats (verl's metric values) in one host read."""
    if not metrics:
        return {}
    values = torch.stack([v.detach().to(torch.float64).reshape(()) for v in metrics.values()]).tolist()
    return dict(zip(metrics, values))


def _fused(cfg: GRPOLossConfig, loss_agg_mode: str, old_log_prob, log_prob, advantages, response_mask, weights,
           global_batch_info, backend: str, validate: bool):
    """(verl's aggregated loss, the kernel's metrics) of cfg's per-token term by our fused objective."""
    if cfg.pg_loss == "geo_mean":  # verl: torch.mean over the micro-batch's rows, whatever the mode
        ours, factor = "seq-mean-token-mean", torch.ones((), dtype=torch.float64, device=log_prob.device)
    else:
        ours, factor = aggregation(loss_agg_mode, response_mask, global_batch_info)
    out = grpo_loss_from_logprobs(
        log_prob, advantages, mask=response_mask, old_logps=old_log_prob, is_weights=weights,
        num_items_in_batch=1 if ours == "token-mean" else None, config=cfg.replace(loss_agg_mode=ours),
        backend=backend, validate=validate,
    )
    return out.loss * factor.to(out.loss.dtype), out.metrics


def _times(weights, factor):
    return factor if weights is None else weights * factor


def _policy_loss(loss_mode, old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config,
                 rollout_is_weights, backend, validate):
    """(loss, metrics as 0-d tensors) of verl's `loss_mode`."""
    info = _option(config, "global_batch_info", {})
    cfg = loss_config(loss_mode, config)
    if loss_mode == "sapo":
        loss_agg_mode = "seq-mean-token-mean"  # verl's sapo ignores the configured mode
    selected = None
    weights = rollout_is_weights
    if loss_mode == "clip_cov":
        selected = clip_cov_selection(
            old_log_prob, log_prob, advantages, response_mask, cfg.eps_low, cfg.eps_high,
            _policy_option(config, "clip_cov_ratio"), _policy_option(config, "clip_cov_lb"),
            _policy_option(config, "clip_cov_ub"))
        weights = _times(weights, (~selected).to(log_prob.dtype))
    elif loss_mode == "geo_mean" and weights is not None:
        # verl's per-sequence geometric mean of the token IS weights, its expression as it is (with a
        # bool, int or fp32 mask, n + 1e-8 rounds to n in fp32).
        weights = torch.exp((torch.log(weights + 1e-10) * response_mask).sum(-1) / (response_mask.sum(-1) + 1e-8))
    if loss_mode == "kl_cov":
        # Two passes of the kl_cov term: coefficient ppo_kl_coef on the selected tokens, 0 on the others.
        selected = kl_cov_selection(log_prob, advantages, response_mask, _policy_option(config, "kl_cov_ratio"))
        chosen = selected.to(log_prob.dtype)
        loss, kernel_metrics = _fused(cfg, loss_agg_mode, old_log_prob, log_prob, advantages, response_mask,
                                      _times(weights, chosen), info, backend, validate)
        rest, _ = _fused(cfg.replace(kl_cov_coef=0.0), loss_agg_mode, old_log_prob, log_prob, advantages,
                         response_mask, _times(weights, 1.0 - chosen), info, backend, validate)
        loss = loss + rest
    else:
        loss, kernel_metrics = _fused(cfg, loss_agg_mode, old_log_prob, log_prob, advantages, response_mask, weights,
                                      info, backend, validate)
    metrics = policy_metrics(loss_mode, cfg, kernel_metrics, old_log_prob, log_prob, advantages, response_mask,
                             selected)
    return loss, metrics


def _bypass_mode(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config, backend, validate):
    """verl's bypass_mode: old_log_prob is the rollout's. The rollout correction of (log_prob, rollout),
    ours (verl's compute_rollout_correction_and_rejection_mask in one host read), gives the IS
    weights, the rejection mask and its metrics; then vanilla on the kept tokens without the weights
    ("ppo_clip", the ratio is already the IS ratio) or gpg with them ("reinforce")."""
    settings = _bypass_settings(config)
    loss_type = settings.pop("loss_type")
    with torch.no_grad():
        weights_proto, kept, rollout_metrics = rollout_correction(
            old_log_prob=log_prob.detach(), rollout_log_prob=old_log_prob, response_mask=response_mask, **settings)
    if loss_type == "ppo_clip":
        loss, metrics = _policy_loss("vanilla", old_log_prob, log_prob, advantages, kept, loss_agg_mode, config, None,
                                     backend, validate)
    else:
        weights = weights_proto.batch["rollout_is_weights"] if weights_proto else None
        loss, _ = _policy_loss("gpg", old_log_prob, log_prob, advantages, kept, loss_agg_mode, config, weights, backend,
                               validate)
        metrics = {"actor/ppo_kl": verl_masked_mean(old_log_prob - log_prob.detach(), kept)}
    return loss, metrics, rollout_metrics


def policy_loss_fn(loss_mode: str, backend: str = "auto", validate: bool = True):
    """verl's `loss_mode` policy loss, computed by our fused objective, with verl's signature:
    (old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config, rollout_is_weights)
    -> (loss, metrics). All tensors (B, T); only `log_prob` is differentiated. The metrics come
    back as Python floats, as verl's, in one host read. Host reads per call: that one, plus one
    per fused pass with `validate` (as grpo_loss_from_logprobs; kl_cov makes two passes), plus
    clip_cov's candidate count; bypass_mode adds the rollout correction's one.
    """
    _check_loss_mode(loss_mode)

    def policy_loss(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode: str = "token-mean",
                    config=None, rollout_is_weights=None):
        if loss_mode == "bypass_mode":  # verl ignores the given rollout_is_weights: it computes its own
            if config is None:
                raise ValueError("config (verl's actor config) is required by the grpo_kernels policy losses")
            loss, metrics, extra = _bypass_mode(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode,
                                                config, backend, validate)
            return loss, {**as_floats(metrics), **extra}
        loss, metrics = _policy_loss(loss_mode, old_log_prob, log_prob, advantages, response_mask, loss_agg_mode,
                                     config, rollout_is_weights, backend, validate)
        return loss, as_floats(metrics)

    policy_loss.__name__ = f"{LOSS_NAME_PREFIX}{loss_mode}"
    policy_loss.__qualname__ = policy_loss.__name__
    return policy_loss


def verls_own_policy_loss(loss_mode: str):
    """verl's own `loss_mode` policy loss, as it runs without grpo_kernels: its bypass_mode with
    verl's own rollout correction (our plugin, loaded by `import verl`, puts ours where verl looks
    it up). The oracle of our tests and benchmarks."""
    verl_fn = core_algos.get_policy_loss_fn(loss_mode)

    def policy_loss(*args, **kwargs):
        with verls_own_rollout_correction():
            return verl_fn(*args, **kwargs)

    policy_loss.__name__ = policy_loss.__qualname__ = f"verl_{loss_mode}"
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
    return out.loss * factor.to(out.loss.dtype)


def register(backend: str = "auto", prefix: str = LOSS_NAME_PREFIX) -> Tuple[str, ...]:
    """Register our versions of verl's policy losses under `prefix` + loss mode in verl's
    registry (`policy_loss.loss_mode=grpo_kernels_vanilla`, ...). Returns the names."""
    names = []
    for mode in LOSS_MODES:
        name = f"{prefix}{mode}"
        core_algos.register_policy_loss(name)(policy_loss_fn(mode, backend))
        names.append(name)
    return tuple(names)

"""verl's rollout correction (`verl.trainer.ppo.rollout_corr_helper.compute_rollout_correction_and_rejection_mask`)
with one host read per call: `rollout_correction(...)`, and `patch_rollout_correction()`, which
puts it where verl's trainer looks it up.

The same arguments, return types, weights, mask and metrics as verl's:
  - importance sampling (rollout_is "token" | "sequence"): truncated IS (TIS: a float, or a
    float string, is the upper clamp) or IcePop (a "lower_upper" string: weights outside the
    bounds are 0), optionally normalised to batch mean 1 (rollout_is_batch_normalize);
  - rejection sampling (rollout_rs, options chained with commas: token_k1..k3, seq_sum_k1..k3,
    seq_mean_k1..k3, seq_max_k2/k3; rollout_rs_threshold one shared or one per option, k1's as
    "lower_upper" ratio bounds or an upper u with lower 1/u), combined by logical AND;
  - verl's IS, rejection and off-policy metrics (KL, k3 KL, PPLs, χ²), keys "rollout_corr/...".
verl reads every metric with its own `.item()` (and branches on data: the batch-normalisation
guard, the "> 1 valid token" std guards, boolean indexing of the valid sequences): dozens of
device syncs per call. Here every branch on data is a `torch.where`, every metric stays on the
device, and they are read together, with the "at least one valid token" check, in one `.tolist()`.
"""
from __future__ import annotations

import contextlib
import math
from typing import Dict, Iterator, List, Optional, Tuple, Union

import torch
from torch import Tensor

try:
    import verl.utils.torch_functional as verl_F
    from verl.protocol import DataProto
    from verl.trainer.ppo import rollout_corr_helper as verl_rollout_corr
except ImportError as exc:  # pragma: no cover - exercised only without verl
    raise ImportError("grpo_kernels.integrations.verl needs verl: pip install 'grpo_kernels[verl]'") from exc

# verl's thresholds parsers: pure host code, its exact rules and error messages.
from verl.trainer.ppo.rollout_corr_helper import (  # noqa: E402
    SAFETY_BOUND,
    SUPPORTED_ROLLOUT_RS_OPTIONS,
    TOKEN_LEVEL_ROLLOUT_RS_OPTIONS,
    _parse_rollout_is_threshold,
    _parse_rollout_rs_thresholds,
)

IS_LEVELS = ("token", "sequence")
METRIC_PREFIX = "rollout_corr/"
NO_VALID_TOKEN = "response_mask must contain at least one valid token (1)."


class _Metrics:
    """Metric name -> device scalar (or a host float), read together in one `.tolist()`.
    `reciprocal` names are read as 1 / value, as verl computes them on the host."""

    def __init__(self):
        self.values: Dict[str, Union[Tensor, float]] = {}
        self.reciprocal = set()

    def __setitem__(self, name: str, value):
        self.values[name] = value

    def read(self, guard: Tensor) -> Tuple[bool, Dict[str, float]]:
        """(guard, {METRIC_PREFIX + name: float}) with one host read."""
        names = [n for n, v in self.values.items() if isinstance(v, Tensor)]
        stacked = torch.stack([guard.double()] + [self.values[n].detach().double().reshape(()) for n in names])
        host = stacked.tolist()
        if not host[0]:
            return False, {}
        read = dict(zip(names, host[1:]))
        out = {}
        for name, value in self.values.items():
            value = read.get(name, value)
            out[METRIC_PREFIX + name] = 1.0 / value if name in self.reciprocal else float(value)
        return bool(host[0]), out


def _masked_mean(values: Tensor, mask: Tensor, axis=None) -> Tensor:
    return verl_F.masked_mean(values, mask, axis)


def _masked_max(values: Tensor, keep: Tensor) -> Tensor:
    return values.masked_fill(~keep, float("-inf")).max()


def _masked_min(values: Tensor, keep: Tensor) -> Tensor:
    return values.masked_fill(~keep, float("inf")).min()


def _subset_mean_std(values: Tensor, keep: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """Mean, Bessel std (0 for <= 1 entry) and count of values[keep], without indexing by keep
    (a data-dependent shape is a device sync)."""
    count = keep.sum()
    mean = torch.where(keep, values, 0).sum() / count
    var = torch.where(keep, (values - mean) ** 2, 0).sum() / (count - 1).clamp(min=1)
    return mean, torch.where(count > 1, var.sqrt(), torch.zeros_like(var)), count


def _clamped_std(values: Tensor, mask: Tensor, low: float, high: float) -> Tensor:
    """verl's std of the statistic clamped to [low, high], masked; 0 for <= 1 valid token."""
    clamped = values.clamp(min=low, max=high)
    mean = _masked_mean(clamped, mask)
    std = torch.sqrt(torch.clamp(_masked_mean(clamped.square(), mask) - mean.square(), min=0.0))
    return torch.where(mask.sum() > 1, std, torch.zeros_like(std))


# --------------------------------------------------------------------------------- importance sampling
def _is_weights(log_ratio: Tensor, mask: Tensor, level: str, threshold, batch_normalize: bool,
                metrics: _Metrics) -> Tensor:
    """verl's compute_rollout_correction_weights (+ compute_is_metrics): (B, T) detached weights."""
    if level not in IS_LEVELS:
        raise ValueError(f"Invalid rollout_is: {level}. Must be one of {set(IS_LEVELS)}.")
    upper, lower = _parse_rollout_is_threshold(threshold)
    icepop = lower is not None
    if level == "token":
        metric_log_ratio = log_ratio
        raw = torch.exp(torch.clamp(log_ratio, min=-SAFETY_BOUND, max=SAFETY_BOUND))
    else:
        metric_log_ratio = verl_F.masked_sum(log_ratio, mask, axis=-1).unsqueeze(-1)
        raw = torch.exp(torch.clamp(metric_log_ratio, min=-SAFETY_BOUND, max=SAFETY_BOUND)).expand_as(log_ratio)
    raw = raw * mask
    if icepop:
        weights = torch.where((raw >= lower) & (raw <= upper), raw, torch.zeros_like(raw))
    else:
        weights = raw.clamp(max=upper)

    metric_lower = 1.0 / upper if lower is None else lower
    keep = mask.bool()
    if level == "sequence":
        # verl compares in log space against fp32 log thresholds
        log_upper = torch.log(torch.tensor(upper, device=log_ratio.device))
        log_lower = torch.log(torch.tensor(metric_lower, device=log_ratio.device))
        metrics["rollout_is_max"] = torch.exp(torch.clamp(metric_log_ratio.max(), max=SAFETY_BOUND))
        metrics["rollout_is_min"] = torch.exp(metric_log_ratio.min())
        metrics["rollout_is_mean"] = _masked_mean(weights, mask)
        metrics["rollout_is_ratio_fraction_high"] = (metric_log_ratio > log_upper).float().mean()
        metrics["rollout_is_ratio_fraction_low"] = (metric_log_ratio < log_lower).float().mean()
    else:
        metrics["rollout_is_mean"] = _masked_mean(weights, mask)
        metrics["rollout_is_ratio_fraction_high"] = _masked_mean((raw > upper).float(), mask)
        metrics["rollout_is_ratio_fraction_low"] = _masked_mean((raw < metric_lower).float(), mask)
        metrics["rollout_is_max"] = _masked_max(weights, keep)
        metrics["rollout_is_min"] = _masked_min(weights, keep)
    metrics["rollout_is_std"] = _clamped_std(weights, mask, 0.0, upper)
    ess_weights = weights.clamp(min=0.0, max=upper)
    normalised = ess_weights / (_masked_mean(ess_weights, mask) + 1e-8)
    metrics["rollout_is_eff_sample_size"] = _masked_mean(normalised.square(), mask)
    metrics.reciprocal.add("rollout_is_eff_sample_size")
    seq_mean = _masked_mean(weights, mask, axis=-1)
    metrics["rollout_is_seq_mean"] = seq_mean.mean()
    metrics["rollout_is_seq_std"] = seq_mean.std() if seq_mean.numel() > 1 else 0.0
    metrics["rollout_is_seq_max"] = seq_mean.max()
    metrics["rollout_is_seq_min"] = seq_mean.min()
    metrics["rollout_is_seq_max_deviation"] = (seq_mean - 1.0).abs().max()
    raw_seq_mean = _masked_mean(raw, mask, axis=-1)
    metrics["rollout_is_seq_fraction_high"] = (raw_seq_mean > upper).float().mean()
    metrics["rollout_is_seq_fraction_low"] = (raw_seq_mean < metric_lower).float().mean()
    if icepop:
        metrics["rollout_is_oob_ratio"] = _masked_mean(((raw < lower) | (raw > upper)).float(), mask)
    weights = weights.detach()

    if batch_normalize:
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        if level == "token":
            mask_float = mask.to(dtype=weights.dtype)
            mean = (verl_F.distributed_masked_mean(weights, mask_float) if distributed
                    else _masked_mean(weights, mask))
        else:
            seq_weights = _masked_mean(weights, mask, axis=-1)
            seq_mask = (mask.sum(dim=-1) > 0).to(dtype=weights.dtype)
            mean = (verl_F.distributed_masked_mean(seq_weights, seq_mask) if distributed
                    else (seq_weights * seq_mask).sum() / seq_mask.sum().clamp_min(1e-8))
        usable = mean > 1e-8  # verl: normalise only then, read on the host; a select here
        weights = torch.where(usable, weights / mean, weights)
        metrics["rollout_is_batch_norm_factor"] = torch.where(usable, mean, torch.ones_like(mean))
    return weights


# --------------------------------------------------------------------------------- rejection sampling
def _rs_options(rollout_rs) -> List[str]:
    if rollout_rs is None or not isinstance(rollout_rs, str):
        raise ValueError("rollout_rs must be a non-empty string (comma separated for multiple options).")
    options = []
    for opt in (o.strip() for o in rollout_rs.split(",")):
        if not opt:
            continue
        if opt not in SUPPORTED_ROLLOUT_RS_OPTIONS:
            raise ValueError(f"Invalid rollout_rs option: {opt}. "
                             f"Must be one of {sorted(SUPPORTED_ROLLOUT_RS_OPTIONS)}.")
        if opt not in options:
            options.append(opt)
    if not options:
        raise ValueError("rollout_rs must contain at least one valid option.")
    return options


def _rs_statistic(option: str, divergences: Dict[str, Tensor], mask: Tensor) -> Tuple[Optional[Tensor],
                                                                                      Optional[Tensor]]:
    """One option's statistic: (per token (B, T), None) for token_*, (None, per sequence (B,)) else."""
    estimator = divergences[option[-2:]]
    if option in TOKEN_LEVEL_ROLLOUT_RS_OPTIONS:
        return estimator, None
    if option.startswith("seq_sum"):
        seq = verl_F.masked_sum(estimator, mask, axis=-1)
    elif option.startswith("seq_mean"):
        seq = _masked_mean(estimator, mask, axis=-1)
    else:  # seq_max: the largest valid token's divergence, 0 for a sequence without valid tokens
        seq = estimator.masked_fill(~mask.bool(), float("-inf")).max(dim=-1).values
        seq = torch.where(seq == float("-inf"), torch.zeros_like(seq), seq)
    return None, seq


class _TokenWeights:
    """Masked token means of a per-sequence value broadcast over its tokens, from (B,) values:
    Σ_b v_b·len_b / (Σ len + 1e-8), verl's masked_mean of the broadcast (B, T) tensor without
    building it."""

    def __init__(self, mask: Tensor, dtype: torch.dtype):
        self.lengths = mask.sum(dim=-1).to(dtype)
        self.count = mask.sum()
        self.total = self.count + 1e-8  # verl's masked_mean denominator, in the same dtype

    def mean(self, per_sequence: Tensor) -> Tensor:
        return (per_sequence * self.lengths).sum() / self.total

    def clamped_std(self, per_sequence: Tensor, low: float, high: float) -> Tensor:
        clamped = per_sequence.clamp(min=low, max=high)
        var = self.mean(clamped.square()) - self.mean(clamped).square()
        std = torch.sqrt(torch.clamp(var, min=0.0))
        return torch.where(self.count > 1, std, torch.zeros_like(std))


def _rejection_mask(log_ratio: Tensor, mask: Tensor, rollout_rs: str, rollout_rs_threshold,
                    metrics: _Metrics) -> Tensor:
    """verl's compute_rollout_rejection_mask (+ compute_rs_metrics): the response mask with the
    rejected tokens (every option must pass) set to 0, in the mask's dtype. A sequence-level
    option's keep flag and statistics stay per sequence (B,): its token means are length-weighted
    sums, not passes over a broadcast (B, T) tensor."""
    if rollout_rs_threshold is None:
        raise ValueError("rollout_rs_threshold must be provided for rejection sampling.")
    if log_ratio.shape[0] == 0:
        return mask
    options = _rs_options(rollout_rs)
    thresholds = _parse_rollout_rs_thresholds(options, rollout_rs_threshold)
    safe = torch.clamp(log_ratio, min=-SAFETY_BOUND, max=SAFETY_BOUND)
    divergences = {"k1": -safe, "k2": 0.5 * safe ** 2, "k3": torch.exp(safe) - 1.0 - safe}
    valid = mask.bool()
    seq_valid = mask.sum(dim=-1) > 0
    n_valid = seq_valid.sum()
    per_token = _TokenWeights(mask, log_ratio.dtype)
    token_combined = torch.ones_like(mask, dtype=log_ratio.dtype)  # the token options' keep, multiplied
    seq_combined = torch.ones(mask.shape[0], dtype=log_ratio.dtype, device=mask.device)  # the sequence options'
    for option in options:
        is_k1 = option.endswith("k1")
        upper, lower = thresholds[option]["upper"], thresholds[option]["lower"]
        if is_k1:  # bounds on the log-ratio
            upper, lower = math.log(upper), math.log(lower)
        token_stat, seq_stat = _rs_statistic(option, divergences, mask)
        stat = token_stat if seq_stat is None else seq_stat
        keep = stat <= upper
        if is_k1:
            keep = keep & (stat >= lower)
        metric_lower = lower if is_k1 else 0.0
        _rs_metrics(metrics, f"rollout_rs_{option}", token_stat, seq_stat, mask, seq_valid, per_token, upper,
                    metric_lower, is_k1)
        keep_float = keep.to(dtype=log_ratio.dtype)
        if seq_stat is None:
            token_combined = token_combined * keep_float
            metrics[f"rollout_rs_{option}_masked_fraction"] = _masked_mean(1 - keep_float, mask)
            rejected_seq = (~keep & valid).any(dim=-1)
        else:
            seq_combined = seq_combined * keep_float
            metrics[f"rollout_rs_{option}_masked_fraction"] = per_token.mean(1 - keep_float)
            rejected_seq = ~keep & seq_valid
        metrics[f"rollout_rs_{option}_seq_masked_fraction"] = rejected_seq.to(log_ratio.dtype).sum() / n_valid
    combined = token_combined * seq_combined.unsqueeze(-1)
    metrics["rollout_rs_masked_fraction"] = _masked_mean(1 - combined, mask)
    final_keep = (combined > 0.5) & valid
    metrics["rollout_rs_seq_masked_fraction"] = (~final_keep & valid).any(dim=-1).float().mean()
    return (mask * combined).to(dtype=mask.dtype)


def _rs_metrics(metrics: _Metrics, prefix: str, token_stat: Optional[Tensor], seq_stat: Optional[Tensor],
                mask: Tensor, seq_valid: Tensor, per_token: _TokenWeights, upper: float, lower: float,
                use_lower: bool) -> None:
    """verl's compute_rs_metrics for one option, token_stat (B, T) or seq_stat (B,) given (the
    caller guarantees a valid token, as verl's raise does: so some sequence is valid)."""
    n_valid = seq_valid.sum()

    def fraction_of_valid_sequences(flags):
        return (flags & seq_valid).sum() / n_valid

    if seq_stat is not None:  # sequence level: token means from the sequences, max/min/fractions over them
        seq_values = seq_stat
        metrics[f"{prefix}_mean"] = per_token.mean(seq_stat)
        metrics[f"{prefix}_max"] = _masked_max(seq_values, seq_valid)
        metrics[f"{prefix}_min"] = _masked_min(seq_values, seq_valid)
        metrics[f"{prefix}_fraction_high"] = fraction_of_valid_sequences(seq_values > upper)
        metrics[f"{prefix}_fraction_low"] = fraction_of_valid_sequences(seq_values < lower) if use_lower else 0.0
        metrics[f"{prefix}_std"] = per_token.clamped_std(seq_stat, lower if use_lower else 0.0, upper)
    else:
        keep = mask.bool()
        seq_values = _masked_mean(token_stat, mask, axis=-1)
        metrics[f"{prefix}_mean"] = _masked_mean(token_stat, mask)
        metrics[f"{prefix}_max"] = _masked_max(token_stat, keep)
        metrics[f"{prefix}_min"] = _masked_min(token_stat, keep)
        metrics[f"{prefix}_fraction_high"] = _masked_mean((token_stat > upper).float(), mask)
        metrics[f"{prefix}_fraction_low"] = (_masked_mean((token_stat < lower).float(), mask) if use_lower
                                             else 0.0)
        metrics[f"{prefix}_std"] = _clamped_std(token_stat, mask, lower if use_lower else 0.0, upper)
    mean, std, _ = _subset_mean_std(seq_values, seq_valid)
    metrics[f"{prefix}_seq_mean"] = mean
    metrics[f"{prefix}_seq_std"] = std
    metrics[f"{prefix}_seq_max"] = _masked_max(seq_values, seq_valid)
    metrics[f"{prefix}_seq_min"] = _masked_min(seq_values, seq_valid)
    metrics[f"{prefix}_seq_max_deviation"] = _masked_max(seq_values.abs(), seq_valid)
    metrics[f"{prefix}_seq_fraction_high"] = fraction_of_valid_sequences(seq_values > upper)
    if use_lower:
        metrics[f"{prefix}_seq_fraction_low"] = fraction_of_valid_sequences(seq_values < lower)


# --------------------------------------------------------------------------------- off-policy metrics
def _offpolicy_metrics(old_log_prob: Tensor, rollout_log_prob: Tensor, mask: Tensor, metrics: _Metrics) -> None:
    """verl's compute_offpolicy_metrics: PPLs, KL, k3 KL, log-PPL differences, token and sequence χ²."""
    mean_train = _masked_mean(old_log_prob, mask, axis=-1)
    metrics["training_ppl"] = torch.exp(-mean_train).mean()
    metrics["training_log_ppl"] = (-mean_train).mean()
    metrics["kl"] = _masked_mean(rollout_log_prob - old_log_prob, mask)
    log_ratio = old_log_prob - rollout_log_prob
    metrics["k3_kl"] = _masked_mean(torch.exp(log_ratio) - log_ratio - 1, mask)
    mean_rollout = _masked_mean(rollout_log_prob, mask, axis=-1)
    metrics["rollout_ppl"] = torch.exp(-mean_rollout).mean()
    metrics["rollout_log_ppl"] = (-mean_rollout).mean()
    log_ppl_diff = mean_rollout - mean_train
    metrics["log_ppl_diff"] = log_ppl_diff.mean()
    metrics["log_ppl_abs_diff"] = log_ppl_diff.abs().mean()
    metrics["log_ppl_diff_max"] = log_ppl_diff.max()
    metrics["log_ppl_diff_min"] = log_ppl_diff.min()
    metrics["ppl_ratio"] = torch.exp(log_ppl_diff).mean()
    rho = torch.exp(torch.clamp(log_ratio, min=-SAFETY_BOUND, max=SAFETY_BOUND))
    metrics["chi2_token"] = _masked_mean(rho.square(), mask) - 1.0
    log_ratio_sum = torch.clamp(verl_F.masked_sum(log_ratio, mask, axis=-1), min=-SAFETY_BOUND, max=SAFETY_BOUND)
    metrics["chi2_seq"] = torch.exp(2.0 * log_ratio_sum).mean() - 1.0


# --------------------------------------------------------------------------------- entry points
def rollout_correction(
    old_log_prob: Tensor,
    rollout_log_prob: Tensor,
    response_mask: Tensor,
    rollout_is: Optional[str] = None,
    rollout_is_threshold: Optional[Union[str, float]] = 2.0,
    rollout_is_batch_normalize: bool = False,
    rollout_rs: Optional[str] = None,
    rollout_rs_threshold: Optional[Union[str, float]] = None,
) -> Tuple[Optional[DataProto], Tensor, Dict[str, float]]:
    """verl's compute_rollout_correction_and_rejection_mask with one host read.

    old_log_prob, rollout_log_prob: (B, T) the training and the rollout policy's log-probs;
    response_mask (B, T) (1 valid). Returns (DataProto {"rollout_is_weights": (B, T)} or None
    when rollout_is or rollout_is_threshold is None, the response mask with rejected tokens 0
    (its dtype), {"rollout_corr/<metric>": float}). Errors as verl's: a bad option or threshold,
    mismatched shapes, and a mask without a valid token (found by the one read).
    """
    if old_log_prob.shape != rollout_log_prob.shape:
        raise ValueError(f"old_log_prob shape {old_log_prob.shape} does not match rollout_log_prob shape "
                         f"{rollout_log_prob.shape}.")
    if old_log_prob.shape != response_mask.shape:
        raise ValueError(f"log_prob shape {old_log_prob.shape} does not match response_mask shape "
                         f"{response_mask.shape}.")
    if rollout_rs is not None and rollout_rs_threshold is None:
        raise ValueError("rollout_rs_threshold must be explicitly provided when rollout_rs is enabled. "
                         "Set rollout_rs_threshold to the desired threshold value.")
    with torch.no_grad():
        log_ratio = old_log_prob - rollout_log_prob
        metrics = _Metrics()
        weights = None
        if rollout_is is not None and rollout_is_threshold is not None:
            weights = _is_weights(log_ratio, response_mask, rollout_is, rollout_is_threshold,
                                  rollout_is_batch_normalize, metrics)
        modified_mask = response_mask.clone()
        if rollout_rs is not None:
            modified_mask = _rejection_mask(log_ratio, response_mask, rollout_rs, rollout_rs_threshold, metrics)
        _offpolicy_metrics(old_log_prob, rollout_log_prob, response_mask, metrics)
        any_valid, values = metrics.read(response_mask.any())
    if not any_valid:
        raise ValueError(NO_VALID_TOKEN)
    proto = None if weights is None else DataProto.from_dict(tensors={"rollout_is_weights": weights})
    return proto, modified_mask, values


def _verls_function():
    """verl's own compute_rollout_correction_and_rejection_mask, also when this module is imported
    (or reloaded) after the plugin put ours in verl's module: then the one recorded before is kept."""
    installed = verl_rollout_corr.compute_rollout_correction_and_rejection_mask
    if installed.__module__ == verl_rollout_corr.__name__:
        return installed
    recorded = globals().get("VERL_FUNCTION")  # survives importlib.reload of this module
    if recorded is None or recorded.__module__ != verl_rollout_corr.__name__:
        raise RuntimeError(f"verl's rollout_corr_helper.compute_rollout_correction_and_rejection_mask is "
                           f"{installed.__module__}.{installed.__name__}, and verl's own was not recorded")
    return recorded


VERL_FUNCTION = _verls_function()


def patch_rollout_correction() -> None:
    """Make verl's trainer use `rollout_correction`: verl's callers
    (`compute_rollout_correction_and_add_to_batch`, the bypass-mode policy loss) look the function
    up in `verl.trainer.ppo.rollout_corr_helper` when called, so replacing it there is enough."""
    verl_rollout_corr.compute_rollout_correction_and_rejection_mask = rollout_correction


def unpatch_rollout_correction() -> None:
    """Put verl's own function back."""
    verl_rollout_corr.compute_rollout_correction_and_rejection_mask = VERL_FUNCTION


@contextlib.contextmanager
def verls_own_rollout_correction() -> Iterator[None]:
    """Within: verl's call sites (its bypass_mode policy loss, its trainer) run verl's own rollout
    correction, whatever is installed (the plugin installs ours when verl is imported); the
    installed function is put back after. For comparing ours with verl's, in tests and benchmarks."""
    installed = verl_rollout_corr.compute_rollout_correction_and_rejection_mask
    verl_rollout_corr.compute_rollout_correction_and_rejection_mask = VERL_FUNCTION
    try:
        yield
    finally:
        verl_rollout_corr.compute_rollout_correction_and_rejection_mask = installed

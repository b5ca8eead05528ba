"""`GRPOLossConfig`: every knob of the GRPO loss, named as in TRL's `GRPOConfig`.

Defaults follow TRL (loss_type="dapo", epsilon=0.2, beta=0.0, ...). The config is
validated when it is built, so a typo fails at construction with the field's name,
not deep inside a kernel.
"""
from __future__ import annotations

import dataclasses
import math
import operator
from dataclasses import dataclass
from typing import Optional

import torch

from .options import Agg, IsMode, KlKind, Level, LossParams, PolicyLoss
from .transform import LogitTransform, kernel_transform
from .truncation import Truncation, make_truncation

LOSS_TYPE_PRESETS = {
    # loss_type: (policy_loss, loss_agg_mode)
    "grpo": ("clip", "seq-mean-token-mean"),
    "bnpo": ("clip", "token-mean"),
    "dr_grpo": ("clip", "seq-mean-token-sum-norm"),
    "dapo": ("clip", "token-mean"),
    "cispo": ("cispo", "token-mean"),
    "sapo": ("sapo", "seq-mean-token-mean"),
    "luspo": ("clip", "seq-mean-token-sum"),
    "vespo": ("vespo", "token-mean"),
}
POLICY_LOSSES = PolicyLoss.names()
LOSS_AGG_MODES = Agg.names()
IMPORTANCE_SAMPLING_LEVELS = Level.names()
KL_ESTIMATOR_ALIASES = {"k1": "k1", "kl": "k1", "k2": "k2", "mse": "k2", "k3": "k3", "low_var_kl": "k3"}
IS_CORRECTION_MODES = IsMode.names()[1:]


# Fields with a fixed set of values (those in _OPTIONAL_CHOICES may also be None).
_CHOICES = {"loss_type": LOSS_TYPE_PRESETS, "policy_loss": POLICY_LOSSES, "loss_agg_mode": LOSS_AGG_MODES,
            "kl_estimator": KL_ESTIMATOR_ALIASES, "importance_sampling_level": IMPORTANCE_SAMPLING_LEVELS,
            "is_correction": IS_CORRECTION_MODES}
_OPTIONAL_CHOICES = ("policy_loss", "loss_agg_mode", "is_correction")
# Numeric fields: (lower bound or None, bound excluded, None allowed). Cross-field rules follow in __post_init__.
_NUMBERS = {
    "epsilon": (0, False, False), "epsilon_high": (0, False, True), "cispo_weight_min": (0, False, True),
    "delta": (1, True, True), "dual_clip": (1, True, True), "beta": (None, False, False),
    "kl_clamp": (0, True, True), "temperature": (0, True, False), "logit_scale": (0, True, False),
    "final_logit_softcapping": (0, True, True), "log_ratio_min": (None, False, True),
    "log_ratio_max": (0, True, True), "sapo_temperature_pos": (0, True, False),
    "sapo_temperature_neg": (0, True, False), "vespo_k_pos": (None, False, False),
    "vespo_lambda_pos": (0, False, False), "vespo_k_neg": (None, False, False),
    "vespo_lambda_neg": (0, False, False), "entropy_coef": (None, False, False),
    "off_policy_mask_threshold": (None, False, True), "top_entropy_quantile": (0, True, False),
    "is_clip_min": (0, False, True), "is_clip_max": (0, True, True),
}


@dataclass
class GRPOLossConfig:
    """Configuration of the GRPO loss (see docs/math.md).

    Attributes mirror TRL's `GRPOConfig` where TRL has the concept:
        loss_type: preset among grpo, bnpo, dr_grpo, dapo (default), cispo, sapo, luspo, vespo.
        policy_loss / loss_agg_mode: override the preset ("clip" | "cispo" | "sapo" | "vespo";
            "seq-mean-token-mean" | "token-mean" | "seq-mean-token-sum" | "seq-mean-token-sum-norm").
        epsilon, epsilon_high: lower / upper clip range (epsilon_high defaults to epsilon;
            for cispo it is the absolute cap on the ratio, e.g. 5.0).
        cispo_weight_min: lower bound of cispo's detached weight (None in TRL; verl clamps the
            weight to [1 - clip_ratio_low, 1 + clip_ratio_high]).
        log_ratio_min / log_ratio_max: clamp the log importance weight before exp (None: no
            clamp). verl clamps token log-ratios to [-20, 20] and GSPO's to <= 10.
        delta: two-sided clipping, caps the unclipped ratio at delta (> 1).
        dual_clip: dual-clip constant c > 1 for negative advantages (verl's clip_ratio_c).
        beta, kl_estimator ("k1"|"k2"|"k3" and aliases "kl"|"mse"|"low_var_kl"), kl_clamp,
            use_bias_correction_kl: the KL penalty to the reference policy.
        temperature: divides the logits before the softmax.
        logit_scale: multiplies the logits first (Cohere's `logit_scale`; 1.0 = none).
        final_logit_softcapping: z -> c * tanh(z / c) after the scale (Gemma 2/3; None = none).
        importance_sampling_level: "token" | "sequence" (GSPO) | "sequence_token" (GSPO-token).
        max_completion_length: needed by "seq-mean-token-sum-norm" (dr_grpo).
        sapo_temperature_pos / sapo_temperature_neg: SAPO gate temperatures.
        vespo_k_pos / vespo_lambda_pos / vespo_k_neg / vespo_lambda_neg: VESPO's Gamma weight
            phi(w) = exp(lambda + k log w - lambda w), (k, lambda) by the advantage's sign (TRL's defaults).
        entropy_coef: entropy bonus coefficient.
        off_policy_mask_threshold: drop negative-advantage sequences whose mean KL exceeds it.
        top_entropy_quantile: keep only the top-q entropy tokens in the policy term (1.0 = all).
        is_correction: rollout importance-sampling correction mode, or None (off).
        is_clip_min / is_clip_max: its truncation / masking bounds.
        top_k, top_p, min_p: the rollout sampler's truncation (vLLM's and `generate`'s settings;
            0 / 1.0 / 0.0 or None: off). The log-probs, entropy and gradient are then those of the
            distribution the tokens were sampled from: the softmax renormalised over the kept set
            (docs/math.md "Truncated sampling"). They steer the log-prob pass, not the objective.
    """

    loss_type: str = "dapo"
    policy_loss: Optional[str] = None
    loss_agg_mode: Optional[str] = None
    epsilon: float = 0.2
    epsilon_high: Optional[float] = None
    cispo_weight_min: Optional[float] = None
    delta: Optional[float] = None
    dual_clip: Optional[float] = None
    beta: float = 0.0
    kl_estimator: str = "k3"
    kl_clamp: Optional[float] = None
    use_bias_correction_kl: bool = True
    temperature: float = 1.0
    logit_scale: float = 1.0
    final_logit_softcapping: Optional[float] = None
    importance_sampling_level: str = "token"
    log_ratio_min: Optional[float] = None
    log_ratio_max: Optional[float] = None
    max_completion_length: Optional[int] = None
    sapo_temperature_pos: float = 1.0
    sapo_temperature_neg: float = 1.05
    vespo_k_pos: float = 2.0
    vespo_lambda_pos: float = 3.0
    vespo_k_neg: float = 3.0
    vespo_lambda_neg: float = 2.0
    entropy_coef: float = 0.0
    off_policy_mask_threshold: Optional[float] = None
    top_entropy_quantile: float = 1.0
    is_correction: Optional[str] = None
    is_clip_min: Optional[float] = None
    is_clip_max: Optional[float] = 3.0
    top_k: Optional[int] = 0
    top_p: Optional[float] = 1.0
    min_p: Optional[float] = 0.0

    def __post_init__(self) -> None:
        # One loop over the tables below (no call per field: a config is built on every call
        # that passes keyword overrides).
        for field, allowed in _CHOICES.items():
            value = getattr(self, field)
            if value not in allowed and not (value is None and field in _OPTIONAL_CHOICES):
                raise ValueError(f"GRPOLossConfig.{field}={value!r} is not valid; expected one of {sorted(allowed)}")
        for field, (lower, strict, allow_none) in _NUMBERS.items():
            value = getattr(self, field)
            if value is None:
                if allow_none:
                    continue
                raise ValueError(f"GRPOLossConfig.{field} must be a number, got None")
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"GRPOLossConfig.{field} must be a finite number, got {value!r}")
            if lower is not None and (value <= lower if strict else value < lower):
                raise ValueError(f"GRPOLossConfig.{field} must be {'>' if strict else '>='} {lower}, got {value!r}")
        if self.cispo_weight_min is not None and self.pg_loss != "cispo":
            raise ValueError(
                f"GRPOLossConfig.cispo_weight_min only applies to the cispo policy loss, not {self.pg_loss!r}"
            )
        if self.cispo_weight_min is not None and self.cispo_weight_min > self.eps_high:
            raise ValueError(
                f"GRPOLossConfig.cispo_weight_min ({self.cispo_weight_min}) must be <= the cispo cap "
                f"epsilon_high ({self.eps_high})"
            )
        if not isinstance(self.use_bias_correction_kl, bool):
            raise ValueError(
                f"GRPOLossConfig.use_bias_correction_kl must be a bool, got {self.use_bias_correction_kl!r}")
        # The bounds must keep log-ratio 0 inside, or an on-policy call would not have ratio 1.
        if self.log_ratio_min is not None and self.log_ratio_min >= 0:
            raise ValueError(f"GRPOLossConfig.log_ratio_min must be < 0, got {self.log_ratio_min!r}")
        if self.max_completion_length is not None and (
            isinstance(self.max_completion_length, bool)
            or not isinstance(self.max_completion_length, int)
            or self.max_completion_length < 1
        ):
            raise ValueError(
                f"GRPOLossConfig.max_completion_length must be a positive int, got {self.max_completion_length!r}"
            )
        if self.agg_mode == "seq-mean-token-sum-norm" and self.max_completion_length is None:
            raise ValueError(
                "GRPOLossConfig.max_completion_length is required by loss_agg_mode='seq-mean-token-sum-norm' "
                f"(loss_type={self.loss_type!r})"
            )
        if self.top_entropy_quantile > 1:
            raise ValueError(
                f"GRPOLossConfig.top_entropy_quantile must be in (0, 1], got {self.top_entropy_quantile!r}")
        if self.is_clip_min is not None and self.is_clip_max is not None and self.is_clip_min >= self.is_clip_max:
            raise ValueError(
                f"GRPOLossConfig.is_clip_min ({self.is_clip_min}) must be < is_clip_max ({self.is_clip_max})"
            )
        if self.is_correction is not None and self.is_clip_min is None and self.is_clip_max is None:
            raise ValueError(
                f"GRPOLossConfig.is_correction={self.is_correction!r} needs is_clip_min and/or is_clip_max"
            )
        try:
            make_truncation(self.top_k, self.top_p, self.min_p)
        except ValueError as exc:
            raise ValueError(f"GRPOLossConfig.{exc}") from None

    # Resolved views: what the math actually uses once presets and aliases are applied.
    @property
    def pg_loss(self) -> str:
        return self.policy_loss or LOSS_TYPE_PRESETS[self.loss_type][0]

    @property
    def agg_mode(self) -> str:
        return self.loss_agg_mode or LOSS_TYPE_PRESETS[self.loss_type][1]

    @property
    def eps_low(self) -> float:
        return self.params.eps_low

    @property
    def eps_high(self) -> float:
        return self.params.eps_high

    @property
    def logit_transform(self) -> "LogitTransform":
        return LogitTransform(self.temperature, self.logit_scale, self.final_logit_softcapping)

    @property
    def truncation(self) -> Truncation:
        """The sampler's truncation (top_k, top_p, min_p) as the log-prob pass takes it."""
        return make_truncation(self.top_k, self.top_p, self.min_p)

    @property
    def kl_kind(self) -> str:
        return KL_ESTIMATOR_ALIASES[self.kl_estimator]

    @property
    def couples_tokens(self) -> bool:
        """Whether a token's gradient depends on the log-probs of the other tokens of its sequence:
        GSPO's sequence ratio, VESPO's sequence weight, the off-policy mask's sequence KL and the
        sequence-level IS weights. Otherwise it depends on its own log-prob and batch-wide
        normalisers only, and the fused-linear path may cut a long sequence into row blocks."""
        return (self.importance_sampling_level != "token" or self.pg_loss == "vespo"
                or self.off_policy_mask_threshold is not None
                or self.is_correction in ("sequence_truncate", "sequence_mask"))

    @property
    def uses_num_items_in_batch(self) -> bool:
        """bnpo normalises by the local token count, as TRL does; other token-mean users take the global count."""
        return self.agg_mode == "token-mean" and not (self.loss_type == "bnpo" and self.loss_agg_mode is None)

    @property
    def params(self) -> LossParams:
        """The config as the plain scalars every layer below the public API takes (options.LossParams),
        built once per config object and set of field values (a field may be reassigned)."""
        if torch.compiler.is_compiling():  # traced once by torch.compile: the values become graph constants
            return self._build_params()
        values = _field_values(self)  # one C-level tuple of every field
        cached = self.__dict__.get("_params")  # not a field: asdict, replace and == ignore it
        if cached is None or cached[0] != values:
            cached = self.__dict__["_params"] = (values, self._build_params())
        return cached[1]

    def _build_params(self) -> LossParams:
        inf, pg, agg = math.inf, self.pg_loss, self.agg_mode
        transform = kernel_transform(self.temperature, self.logit_scale, self.final_logit_softcapping)
        # Absent bounds are ±inf: every clamp then needs no flag.
        delta, dual_clip, kl_clamp, off_thresh, is_hi, log_ratio_hi = [inf if x is None else float(x) for x in (
            self.delta, self.dual_clip, self.kl_clamp, self.off_policy_mask_threshold, self.is_clip_max,
            self.log_ratio_max)]
        is_lo, log_ratio_lo, cispo_lo = [-inf if x is None else float(x) for x in (
            self.is_clip_min, self.log_ratio_min, self.cispo_weight_min)]
        return LossParams(
            pg=_CODES[PolicyLoss][pg], level=_CODES[Level][self.importance_sampling_level],
            kl=_CODES[KlKind][KL_ESTIMATOR_ALIASES[self.kl_estimator] if self.beta != 0.0 else None],
            is_mode=_CODES[IsMode][self.is_correction], agg=_CODES[Agg][agg],
            has_delta=int(self.delta is not None), has_dual=int(self.dual_clip is not None),
            has_kl_clamp=int(self.kl_clamp is not None), bias_corr=int(self.use_bias_correction_kl),
            has_off_policy=int(self.off_policy_mask_threshold is not None),
            has_entropy_mask=int(self.top_entropy_quantile < 1.0), uses_num_items=int(self.uses_num_items_in_batch),
            couples_tokens=int(self.couples_tokens), max_completion_length=self.max_completion_length or 0,
            eps_low=float(self.epsilon),
            eps_high=float(self.epsilon if self.epsilon_high is None else self.epsilon_high),
            delta=delta, dual_clip=dual_clip, sapo_pos=float(self.sapo_temperature_pos),
            sapo_neg=float(self.sapo_temperature_neg), beta=float(self.beta), kl_clamp=kl_clamp, off_thresh=off_thresh,
            is_lo=is_lo, is_hi=is_hi, entropy_coef=float(self.entropy_coef), log_ratio_lo=log_ratio_lo,
            log_ratio_hi=log_ratio_hi, cispo_lo=cispo_lo, vespo_k_pos=float(self.vespo_k_pos),
            vespo_lambda_pos=float(self.vespo_lambda_pos), vespo_k_neg=float(self.vespo_k_neg),
            vespo_lambda_neg=float(self.vespo_lambda_neg), top_entropy_quantile=float(self.top_entropy_quantile),
            transform_scale=transform.scale, transform_cap=transform.cap,
        )

    def replace(self, **overrides) -> "GRPOLossConfig":
        """A validated copy with some fields changed; unknown names raise TypeError naming them."""
        known = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise TypeError(f"unknown GRPOLossConfig option(s) {unknown}; valid options are {sorted(known)}")
        return dataclasses.replace(self, **overrides) if overrides else self


# The kernels' code of each public name (plain ints), by enumeration.
_CODES = {cls: {member.public: int(member) for member in cls} for cls in (PolicyLoss, Level, KlKind, IsMode, Agg)}
_field_values = operator.attrgetter(*(f.name for f in dataclasses.fields(GRPOLossConfig)))
_DEFAULT: list = []  # the default config, built on first use (calls without config= share it)


def resolve_config(config: Optional[GRPOLossConfig], overrides: dict) -> GRPOLossConfig:
    """`config` (default GRPOLossConfig()) with keyword overrides of its fields, validated.

    Plain Python: under torch.compile it runs at trace time, and the values it yields reach the
    custom ops as constants of the graph (overrides included)."""
    if config is None:
        if overrides:
            return GRPOLossConfig(**overrides)
        if not _DEFAULT:
            _DEFAULT.append(GRPOLossConfig())
        return _DEFAULT[0]
    if not isinstance(config, GRPOLossConfig):
        raise TypeError(f"config must be a GRPOLossConfig, got {type(config).__name__}")
    return config.replace(**overrides) if overrides else config

"""The logit transforms of real models, applied before the softmax (docs/math.md, "One token").

    z' = c · tanh(s · z / c) / τ        with softcap c (Gemma 2/3 `final_logit_softcapping`)
    z' = s · z / τ                      without it

s is `logit_scale` (Cohere), τ the sampling temperature. −inf logits (top-k/top-p masked
entries) stay −inf: they mean "never sampled", whatever the transform.

Every kernel takes the transform as two floats, (scale, cap):
    no softcap:   scale = s / τ, cap = 0       z' = scale · z
    softcap c:    scale = s / c, cap = c / τ   z' = cap · tanh(scale · z)
so dz'/dz = scale without softcap and cap · scale · (1 − (z'/cap)²) with it: the backward
gets the derivative from z' itself, with no second tanh.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch


def _positive(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")


class KernelTransform(NamedTuple):
    """The transform as every kernel takes it: z' = scale·z (cap = 0) or cap·tanh(scale·z)."""

    scale: float = 1.0
    cap: float = 0.0

    @property
    def is_identity(self) -> bool:
        return self.cap == 0.0 and self.scale == 1.0

    def apply(self, z: torch.Tensor) -> torch.Tensor:
        """z' from logits z (any float dtype, computed in z's dtype), −inf kept."""
        if self.cap == 0.0:
            return z if self.scale == 1.0 else z * self.scale
        return torch.where(torch.isneginf(z), z, torch.tanh(z * self.scale) * self.cap)

    def derivative(self, z_prime: torch.Tensor) -> torch.Tensor:
        """dz'/dz as a function of z' (0 where z' = −inf)."""
        if self.cap == 0.0:
            return torch.full_like(z_prime, self.scale)
        t = z_prime / self.cap
        return torch.where(torch.isneginf(z_prime), 0.0, (1.0 - t * t) * (self.cap * self.scale))


@dataclass(frozen=True)
class LogitTransform:
    """The user's (temperature, logit_scale, final_logit_softcapping), validated."""

    temperature: float = 1.0
    logit_scale: float = 1.0
    softcap: Optional[float] = None

    def __post_init__(self) -> None:
        _positive("temperature", self.temperature)
        _positive("logit_scale", self.logit_scale)
        if self.softcap is not None:
            _positive("final_logit_softcapping", self.softcap)

    @property
    def kernel(self) -> KernelTransform:
        return kernel_transform(self.temperature, self.logit_scale, self.softcap)


def kernel_transform(temperature: float, logit_scale: float = 1.0, softcap: Optional[float] = None) -> KernelTransform:
    """(scale, cap) as every kernel takes them (arguments already validated); cap = 0 means no softcap."""
    if softcap is None:
        return KernelTransform(float(logit_scale) / float(temperature), 0.0)
    return KernelTransform(float(logit_scale) / float(softcap), float(softcap) / float(temperature))


def model_logit_options(model_config) -> dict:
    """The logit transform a Hugging Face model applies after its lm_head, as GRPOLossConfig fields.

    Reads the text config as TRL 1.16's fused LM head does: `final_logit_softcapping` (Gemma 2/3)
    and a pre-softcap multiplier from `logit_scale` (Cohere), `output_multiplier`,
    `lm_head_multiplier` (Falcon-H1) or `logits_scaling` (Granite, MiniCPM3 divide by it;
    HyperCLOVA X multiplies). Missing entries mean no transform.
    """
    text = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    scale = getattr(text, "logit_scale", None)
    for name in ("output_multiplier", "lm_head_multiplier"):
        if scale is None:
            scale = getattr(text, name, None)
    scaling = getattr(text, "logits_scaling", None)
    if scale is None and scaling is not None:
        scale = scaling if getattr(text, "model_type", None) == "hyperclovax" else 1.0 / scaling
    return dict(logit_scale=1.0 if scale is None else float(scale),
                final_logit_softcapping=getattr(text, "final_logit_softcapping", None))


def with_model_logit_options(loss_config, model_config):
    """`loss_config` with the model's logit transform filled in; a conflicting explicit value raises."""
    found = model_logit_options(model_config)
    defaults = dict(logit_scale=1.0, final_logit_softcapping=None)
    for name, value in found.items():
        current = getattr(loss_config, name)
        if current != defaults[name] and current != value:
            raise ValueError(f"GRPOLossConfig.{name}={current!r} disagrees with the model config's {value!r}")
    return loss_config.replace(**found)

"""The option table: every enumeration, constant and parameter the kernels share, declared once.

The C++ header `csrc/options.h` and the Triton constants `grpo_kernels/ops/triton/options.py`
are generated from this file by `python -m grpo_kernels.codegen` (committed; a test fails when
they are stale). Everything else refers to these names, never to the numbers.

- Enumerations (`Option` subclasses): each member has a code (what kernels compare) and a public
  name (what users pass: `GRPOLossConfig(policy_loss="cispo")`).
- `Slot`: the per-sequence partial sums an objective pass adds up; `METRICS`: the metrics a loss
  call reports, in the order of the fused op's metric vector.
- `LossParams`: the loss configuration resolved into plain scalars (config.py builds it once per
  call). Its fields are the C++ `LossParams` struct's, in order: the integer fields first
  (`LOSS_INT_FIELDS`, codes and flags), then the float ones (`LOSS_FLOAT_FIELDS`).

Adding a loss kind: a member of `PolicyLoss` (and its parameters in `LossParams`), regenerate,
then one branch per language (ops/torch_objective.py, ops/triton/math.py, csrc/grpo_math.h), the
oracle (reference.py), docs/math.md and the tests.
"""
from __future__ import annotations

import enum
import math
from typing import NamedTuple


class Option(enum.IntEnum):
    """An enumeration shared with the kernels: `Member = code, "public name"`."""

    def __new__(cls, code: int, public):
        member = int.__new__(cls, code)
        member._value_ = code
        member.public = public
        return member

    @classmethod
    def names(cls) -> tuple:
        """The public names, in code order (None for an "off" member)."""
        return tuple(m.public for m in cls)

    @classmethod
    def parse(cls, name) -> "Option":
        """The member whose public name is `name`; KeyError otherwise (callers word the error)."""
        for member in cls:
            if member.public == name:
                return member
        raise KeyError(name)


class PolicyLoss(Option):
    CLIP = 0, "clip"
    CISPO = 1, "cispo"
    SAPO = 2, "sapo"
    VESPO = 3, "vespo"
    DPPO_TV = 4, "dppo_tv"  # DPPO: detached min(ρ, ratio_cap)·A·logp inside a total-variation trust region
    DPPO_KL = 5, "dppo_kl"  # ... inside a binary-KL trust region
    DRO = 6, "dro"  # −A·logp + ½β(logp − old)²
    KL_COV = 7, "kl_cov"  # −A·ρ + c·|logp − old| (KL-Cov's term on its selected tokens)
    GEO_MEAN = 8, "geo_mean"  # GMPO: −A·exp(mean of sign-clipped token log-ratios), sequence level


class Level(Option):
    """importance_sampling_level."""
    TOKEN = 0, "token"
    SEQUENCE = 1, "sequence"
    SEQUENCE_TOKEN = 2, "sequence_token"


class KlKind(Option):
    """kl_estimator after its aliases (config.py); NONE when beta = 0."""
    NONE = 0, None
    K1 = 1, "k1"
    K2 = 2, "k2"
    K3 = 3, "k3"


class IsMode(Option):
    """is_correction: the rollout importance-sampling correction."""
    NONE = 0, None
    TOKEN_TRUNCATE = 1, "token_truncate"
    TOKEN_MASK = 2, "token_mask"
    SEQUENCE_TRUNCATE = 3, "sequence_truncate"
    SEQUENCE_MASK = 4, "sequence_mask"


class Agg(Option):
    """loss_agg_mode."""
    SEQ_MEAN_TOKEN_MEAN = 0, "seq-mean-token-mean"
    TOKEN_MEAN = 1, "token-mean"
    SEQ_MEAN_TOKEN_SUM = 2, "seq-mean-token-sum"
    SEQ_MEAN_TOKEN_SUM_NORM = 3, "seq-mean-token-sum-norm"


class AdvantageMode(Option):
    """scale_rewards of group_advantages; GDPO is the batch z-score of normalize_then_sum."""
    GROUP = 0, "group"
    BATCH = 1, "batch"
    NONE = 2, "none"
    RLOO = 3, "rloo"
    REINFORCE_PP = 4, "reinforce++"
    GDPO = 5, "gdpo"


class Slot(Option):
    """Per-sequence partial sums of an objective pass (RATIO_MAX is a running max)."""
    LOSS = 0, "loss"
    COUNT = 1, "count"
    ENTROPY = 2, "entropy"
    LOW = 3, "clip_low"
    HIGH = 4, "clip_high"
    REGION = 5, "clip_region"
    RATIO_SUM = 6, "ratio_sum"
    RATIO_MAX = 7, "ratio_max"
    KL = 8, "kl"
    IS = 9, "is_ratio"
    CISPO_CLIP = 10, "cispo_clip"
    VESPO_PHI = 11, "vespo_phi"


NUM_SLOTS = len(Slot)

# Every metric a loss call may report, in the order of the fused op's metric vector.
METRICS = ("entropy", "clip_ratio/low", "clip_ratio/high", "clip_ratio/region", "ratio/mean", "ratio/max", "kl",
           "is_ratio/mean", "cispo_clip_ratio", "vespo/phi_seq_mean")

# Constants of the formulas (docs/math.md), shared by every language.
CONSTANTS = {
    "VESPO_W_MIN": 1e-8,  # TRL's clamp of VESPO's log weights: [log 1e-8, 20]
    "VESPO_LOG_W_MIN": math.log(1e-8),
    "VESPO_LOG_W_MAX": 20.0,
    "VESPO_LAMBDA_MIN": 1e-4,  # TRL's floor of VESPO's λ
    "VESPO_TOKEN_LOG_RATIO": 20.0,  # VESPO clamps each token's log-ratio to ±this before summing
    "KL_LOG_RATIO_CLAMP": 20.0,  # with kl_clamp, k3's x = ref − logp is clamped to ±this (verl)
}
VESPO_W_MIN = CONSTANTS["VESPO_W_MIN"]
VESPO_LOG_W_MIN = CONSTANTS["VESPO_LOG_W_MIN"]
VESPO_LOG_W_MAX = CONSTANTS["VESPO_LOG_W_MAX"]
VESPO_LAMBDA_MIN = CONSTANTS["VESPO_LAMBDA_MIN"]
VESPO_TOKEN_LOG_RATIO = CONSTANTS["VESPO_TOKEN_LOG_RATIO"]
KL_LOG_RATIO_CLAMP = CONSTANTS["KL_LOG_RATIO_CLAMP"]


class LossParams(NamedTuple):
    """The loss configuration as plain scalars: what every layer below the public API receives.

    Absent bounds are ±inf (so clamps need no flag); flags are 0/1. Built by
    `GRPOLossConfig.params` (config.py), immutable and hashable.
    """

    # Integer fields (codes and flags): constexprs in Triton, ints in C++.
    pg: int  # PolicyLoss
    level: int  # Level
    kl: int  # KlKind (NONE when beta = 0)
    is_mode: int  # IsMode
    agg: int  # Agg
    has_delta: int
    has_dual: int
    has_kl_clamp: int
    bias_corr: int  # use_bias_correction_kl
    has_off_policy: int  # off_policy_mask_threshold is set
    has_entropy_mask: int  # top_entropy_quantile < 1
    uses_num_items: int  # token-mean normalised by num_items_in_batch when given
    couples_tokens: int  # a token's gradient depends on other tokens of its sequence
    max_completion_length: int  # 0: not set
    # Float fields.
    eps_low: float
    eps_high: float
    delta: float
    dual_clip: float
    sapo_pos: float
    sapo_neg: float
    beta: float
    kl_clamp: float
    off_thresh: float
    is_lo: float
    is_hi: float
    entropy_coef: float
    log_ratio_lo: float
    log_ratio_hi: float
    cispo_lo: float
    vespo_k_pos: float
    vespo_lambda_pos: float
    vespo_k_neg: float
    vespo_lambda_neg: float
    top_entropy_quantile: float
    ratio_cap: float  # DPPO's cap of its detached ratio weight (inf: none)
    dro_beta: float  # DRO's quadratic log-ratio penalty
    kl_cov_coef: float  # KL-Cov's |log-ratio| penalty
    transform_scale: float  # the logit transform as every log-prob kernel takes it (transform.KernelTransform)
    transform_cap: float

    @property
    def ints(self) -> tuple:
        return self[:NUM_LOSS_INT_FIELDS]

    @property
    def floats(self) -> tuple:
        return self[NUM_LOSS_INT_FIELDS:]

    @classmethod
    def from_parts(cls, ints, floats) -> "LossParams":
        """The record from its two halves (how the custom ops take it: int[] and float[])."""
        return cls(*ints, *floats)


# Field name -> "int" | "float" (annotations are strings or ForwardRefs under postponed evaluation).
LOSS_FIELD_TYPES = {name: getattr(kind, "__forward_arg__", kind) for name, kind in LossParams.__annotations__.items()}
LOSS_INT_FIELDS = tuple(name for name, kind in LOSS_FIELD_TYPES.items() if kind == "int")
LOSS_FLOAT_FIELDS = tuple(name for name, kind in LOSS_FIELD_TYPES.items() if kind == "float")
NUM_LOSS_INT_FIELDS = len(LOSS_INT_FIELDS)
assert LossParams._fields == LOSS_INT_FIELDS + LOSS_FLOAT_FIELDS, "integer fields come first"

# The objective's buffers, in the order every backend and the C++ ObjectiveBuffers struct take them
# (see ops/objective_inputs.py for shapes): (name, C element type, written by the pass, optional).
OBJECTIVE_BUFFERS = (
    ("logp", "float", False, False),
    ("entropy", "float", False, False),
    ("mask", "uint8_t", False, False),  # bool tensors: one byte holding 0 or 1
    ("cu_seqlens", "int64_t", False, False),
    ("counts", "float", False, False),
    ("advantages", "float", False, False),
    ("old", "float", False, True),
    ("ref", "float", False, True),
    ("sampling", "float", False, True),
    ("token_weights", "float", False, True),
    ("keep_entropy", "uint8_t", False, True),
    ("norm", "float", False, False),
    ("ent_norm", "float", False, False),
    ("per_token_loss", "float", True, False),
    ("g_logp", "float", True, False),
    ("g_entropy", "float", True, False),
    ("partials", "float", True, False),
)
OBJECTIVE_BUFFER_NAMES = tuple(b[0] for b in OBJECTIVE_BUFFERS)

ENUMS = (PolicyLoss, Level, KlKind, IsMode, Agg, AdvantageMode, Slot)

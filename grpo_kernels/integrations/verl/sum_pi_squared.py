"""Σ_v π_v² per token for verl's optimal-token-baseline estimators, from our fused-linear pass.

verl's actor computes `sum_pi_squared` (actor.calculate_sum_pi_squared=True, asked for in
`ray_trainer._compute_old_log_prob`) from materialised logits in
`FSDPEngineWithLMHead.prepare_model_outputs`, and refuses it with use_fused_kernels=True ("fused kernels do
not materialize the full logits tensor needed for Σπ²"). Our fused-linear log-probs return it
from the same vocabulary sweep as the log-prob and entropy (`return_sum_pi_squared=True`), so
`patch_sum_pi_squared()` lifts that refusal:
  - `FSDPEngine.prepare_model_inputs` notes, per micro-batch, whether Σπ² is asked for with fused
    kernels on;
  - our fused-linear drop-ins (verl/fused_linear.py, as patch_fused_linear installs them, with or
    without a truncation) then also compute Σπ² and keep it for this micro-batch;
  - `FSDPEngine.prepare_model_outputs` runs verl's own output code for the log-probs, then verl's
    same code on Σπ² in the log-probs' place (so it is unpadded, gathered across Ulysses ranks
    and nested exactly as the log-probs are), and adds it as model_output["sum_pi_squared"].
FSDP engine only (verl's Megatron engine keeps its refusal).
"""
from __future__ import annotations

import functools
from types import SimpleNamespace

from .fused_linear import SUM_PI_SQUARED as _STATE
from .fused_linear import FusedLinearForPPO, patch_fused_linear

REQUEST_KEY = "calculate_sum_pi_squared"


def take_sum_pi_squared():
    """The Σπ² the last fused-linear forward kept (then forgotten), or None."""
    value, _STATE.value = getattr(_STATE, "value", None), None
    return value


def wrap_prepare_model_inputs(prepare_model_inputs):
    """Note for this micro-batch whether Σπ² is asked for with fused kernels on."""
    if getattr(prepare_model_inputs, "grpo_kernels_wrapped", False):
        return prepare_model_inputs
    from verl.utils import tensordict_utils as tu

    @functools.wraps(prepare_model_inputs)
    def wrapped(self, micro_batch):
        _STATE.requested = bool(tu.get_non_tensor_data(data=micro_batch, key=REQUEST_KEY, default=False)
                                and tu.get_non_tensor_data(data=micro_batch, key="use_fused_kernels", default=False))
        _STATE.value = None
        return prepare_model_inputs(self, micro_batch)

    wrapped.grpo_kernels_wrapped = True
    return wrapped


def wrap_prepare_model_outputs(prepare_model_outputs):
    """verl's output code, with Σπ² from our fused pass where verl would refuse it."""
    if getattr(prepare_model_outputs, "grpo_kernels_wrapped", False):
        return prepare_model_outputs
    from verl.utils import tensordict_utils as tu

    @functools.wraps(prepare_model_outputs)
    def wrapped(self, output, output_args, micro_batch, logits_processor_func):
        wanted = tu.get_non_tensor_data(data=micro_batch, key=REQUEST_KEY, default=False)
        fused = tu.get_non_tensor_data(data=micro_batch, key="use_fused_kernels", default=False)
        if not (wanted and fused):
            return prepare_model_outputs(self, output, output_args, micro_batch, logits_processor_func)
        sum_pi_sq = take_sum_pi_squared()
        if sum_pi_sq is None:
            raise RuntimeError("calculate_sum_pi_squared=True with use_fused_kernels=True needs grpo_kernels' fused "
                               "linear log-probs in the model forward: call "
                               "grpo_kernels.integrations.verl.patch_sum_pi_squared() (the verl plugin does with "
                               "GRPO_KERNELS_VERL_FUSED_LINEAR=1)")
        quiet = micro_batch.copy()  # shallow: the flags below change for verl's code only
        tu.assign_non_tensor(quiet, **{REQUEST_KEY: False})
        model_output = prepare_model_outputs(self, output, output_args, quiet, logits_processor_func)
        # verl's own layout code once more, on Σπ² in the log-probs' place.
        tu.assign_non_tensor(quiet, calculate_entropy=False, distillation_use_topk=False, distillation_only=False)
        laid_out = prepare_model_outputs(self, SimpleNamespace(log_probs=sum_pi_sq, entropy=None), output_args, quiet,
                                         logits_processor_func)
        model_output[REQUEST_KEY.replace("calculate_", "")] = laid_out["log_probs"]
        return model_output

    wrapped.grpo_kernels_wrapped = True
    return wrapped


def patch_sum_pi_squared(backend: str = "auto", engine_class=None) -> None:
    """Let verl's FSDP engine give `sum_pi_squared` with use_fused_kernels=True, from our fused pass.
    Installs our fused-linear forwards in verl's fused model forwards (patch_fused_linear) unless
    they are already there, and wraps `engine_class` (default verl's FSDPEngineWithLMHead, the actor's
    engine)'s prepare_model_inputs / prepare_model_outputs."""
    import verl.utils.experimental.torch_functional as torch_functional

    if engine_class is None:
        from verl.workers.engine.fsdp.transformer_impl import FSDPEngineWithLMHead as engine_class
    # Our drop-ins give Σπ² whenever the engine asks; keep them as installed (with a truncation,
    # say), else install them.
    if getattr(torch_functional.FusedLinearForPPO, "func", None) is not FusedLinearForPPO:
        patch_fused_linear(backend)
    engine_class.prepare_model_inputs = wrap_prepare_model_inputs(engine_class.prepare_model_inputs)
    engine_class.prepare_model_outputs = wrap_prepare_model_outputs(engine_class.prepare_model_outputs)

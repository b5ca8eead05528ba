"""Drop-in use from TRL: `FusedGRPOTrainer`, a `trl.GRPOTrainer` whose loss is `fused_linear_grpo_loss`.

    from grpo_kernels.integrations.trl import FusedGRPOTrainer
    trainer = FusedGRPOTrainer(model=model, reward_funcs=..., args=GRPOConfig(...), train_dataset=...)

Everything but the loss is TRL's (generation, rewards, advantages, old/reference log-probs,
logging). The loss is computed from the last hidden state and the lm_head, and the logits are
never materialised. GRPOConfig options map 1:1 (see `config_from_trl`), MoE models get TRL's
router aux loss and vision-language models their multimodal inputs as TRL passes them. An option
this trainer cannot honour raises at construction instead of silently training something else,
naming the option, the setting that turns it off and the entry point used. TRL's metric names are
logged. `patch_trl()` does the same for `trl.GRPOTrainer` objects that users construct themselves.

`truncation_aware_logprobs=True` (on either entry point) computes the loss and the old and
reference log-probs over the kept set of TRL's own sampler settings (GRPOConfig top_k, top_p,
min_p and their generation_kwargs overrides): the log-probs of the distribution that was sampled.
"""
from __future__ import annotations

from typing import Callable

import torch

from ..config import GRPOLossConfig
from ..entropy_control import applied_entropy_coef, next_entropy_coef
from ..fused_linear import fused_linear_grpo_loss, fused_linear_selective_logprobs
from ..transform import model_logit_options
from ..truncation import NO_TRUNCATION, Truncation, sampler_truncation

try:
    import transformers
    from packaging.version import Version
    from trl import GRPOTrainer
    from trl.trainer.utils import FusedCausalLMOutput, nanmax, nanmin
except ImportError as exc:  # pragma: no cover - exercised only without trl
    raise ImportError("grpo_kernels.integrations.trl needs trl: pip install 'grpo_kernels[trl]'") from exc

SUPPORTED_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo")
TOKEN_MEAN_GLOBAL = ("dapo", "cispo", "vespo")  # TRL normalises these by num_items_in_batch
TRANSFORMERS_5 = Version(transformers.__version__) >= Version("5.0.0")

FUSED_TRAINER = "FusedGRPOTrainer"
PATCH_TRL = "patch_trl()"
# How a user stops using each entry point (the last resort every "not supported" error offers).
_WITHOUT = {FUSED_TRAINER: "use trl.GRPOTrainer instead of grpo_kernels' FusedGRPOTrainer",
            PATCH_TRL: "do not call grpo_kernels.integrations.trl.patch_trl() (or call the function it returned)"}


def unsupported(entry: str, what: str, turn_off: str) -> ValueError:
    """The error for an option the drop-in cannot honour: the option, how to turn it off, the entry point."""
    return ValueError(f"{what} is not supported by grpo_kernels' {entry}: {turn_off}, or {_WITHOUT[entry]}")


def trl_sampling_truncation(trainer, entry: str = FUSED_TRAINER) -> Truncation:
    """The truncation TRL's sampler applies: GRPOConfig top_k/top_p/min_p, overridden by
    `generation_kwargs` as TRL overrides them (for vLLM and for transformers' generate).

    Raises where the kept set cannot be that of our semantics (docs/math.md: min_p, then top_k,
    then top_p, vLLM V1's order): transformers' generate applies min_p after top_p, which keeps a
    different set when both are on.
    """
    args = trainer.args
    settings = dict(top_k=args.top_k, top_p=args.top_p, min_p=args.min_p)
    overrides = args.generation_kwargs if isinstance(args.generation_kwargs, dict) else {}
    settings.update({key: overrides[key] for key in settings if key in overrides})
    truncation = sampler_truncation(**settings)
    if not args.use_vllm and truncation.top_p < 1.0 and truncation.min_p > 0.0:
        raise unsupported(
            entry, f"truncation_aware_logprobs=True with GRPOConfig.top_p={truncation.top_p} and "
                   f"min_p={truncation.min_p} under transformers' generate (which applies min_p after top_p; "
                   "vLLM and grpo_kernels apply it before)",
            "set min_p=None or top_p=1.0, generate with use_vllm=True, or pass truncation_aware_logprobs=False")
    return truncation


def config_from_trl(args, trainer=None, *, entry: str = FUSED_TRAINER,
                    truncation: Truncation = NO_TRUNCATION) -> GRPOLossConfig:
    """The GRPOLossConfig equivalent of a TRL GRPOConfig; raises for what we cannot honour.

    With `trainer`, the model's logit transform (softcap, logit scale) comes from its config,
    as TRL's fused LM head reads it. `entry` names the entry point in errors; `truncation` is the
    sampler's kept set the log-probs are computed over (`trl_sampling_truncation`), off by default.
    """
    if args.loss_type not in SUPPORTED_LOSS_TYPES:
        raise unsupported(entry, f"GRPOConfig.loss_type={args.loss_type!r}",
                          f"set loss_type to one of {list(SUPPORTED_LOSS_TYPES)}")
    use_is = bool(getattr(args, "use_vllm", False) and getattr(args, "vllm_importance_sampling_correction", False))
    logit_options = {}
    if trainer is not None:
        logit_options = model_logit_options(trainer.accelerator.unwrap_model(trainer.model).config)
    if truncation.active:
        logit_options.update(truncation._asdict())
    return GRPOLossConfig(
        loss_type=args.loss_type, epsilon=args.epsilon, epsilon_high=args.epsilon_high, delta=args.delta,
        beta=args.beta, kl_estimator="k3", use_bias_correction_kl=bool(args.use_bias_correction_kl),
        temperature=args.temperature, importance_sampling_level=args.importance_sampling_level,
        max_completion_length=args.max_completion_length, sapo_temperature_pos=args.sapo_temperature_pos,
        sapo_temperature_neg=args.sapo_temperature_neg, entropy_coef=float(getattr(args, "entropy_coef", 0.0) or 0.0),
        off_policy_mask_threshold=args.off_policy_mask_threshold, top_entropy_quantile=args.top_entropy_quantile,
        is_correction=args.vllm_importance_sampling_mode if use_is else None,
        is_clip_min=args.vllm_importance_sampling_clip_min, is_clip_max=args.vllm_importance_sampling_clip_max,
        vespo_k_pos=args.vespo_k_pos, vespo_lambda_pos=args.vespo_lambda_pos, vespo_k_neg=args.vespo_k_neg,
        vespo_lambda_neg=args.vespo_lambda_neg, **logit_options,
    )


def _causal_lm(model):
    """The Hugging Face model under a PEFT wrapper (the one TRL's fused LM head patches)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _backbone(model):
    """The module that returns last_hidden_state, and the lm_head, looked up as TRL's fused LM head
    does: `base_model`, or `model` for a vision-language model before transformers 5."""
    base = _causal_lm(model)
    vision_language = base.config.get_text_config() is not base.config
    backbone = base.model if vision_language and not TRANSFORMERS_5 else base.base_model
    return backbone, base.get_output_embeddings()


def multimodal_model_inputs(inputs: dict) -> dict:
    """The multimodal model inputs TRL's `_compute_loss` passes to the model for the whole batch
    (TRL's `_get_per_token_logps_and_entropies` without chunks): the image tensors that go with
    `pixel_values` (the first of image_grid_thw, image_position_ids, spatial_shapes), and the
    pixel attention mask, image sizes and token-type ids wherever present."""
    found = {}
    if inputs.get("pixel_values") is not None:
        found["pixel_values"] = inputs["pixel_values"]
        for key in ("image_grid_thw", "image_position_ids", "spatial_shapes"):
            if inputs.get(key) is not None:
                found[key] = inputs[key]
                break
    for key in ("pixel_attention_mask", "image_sizes", "token_type_ids", "mm_token_type_ids"):
        if inputs.get(key) is not None:
            found[key] = inputs[key]
    return found


def router_aux_loss(model, router_logits, attention_mask):
    """The MoE load-balancing loss as TRL 1.16's fused LM head computes it (Mixtral's function,
    which every MoE family shares), with the expert counts read where TRL reads them."""
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    base = _causal_lm(model)
    text_config = base.config.get_text_config()
    if not TRANSFORMERS_5:
        num_experts, per_token = base.num_experts, base.num_experts_per_tok
    else:
        num_experts = getattr(text_config, "num_experts", None)
        num_experts = base.num_experts if num_experts is None else num_experts  # GPT-OSS before transformers 5.6
        per_token = text_config.num_experts_per_tok
    return load_balancing_loss_func(router_logits, num_experts, per_token, attention_mask)


def _hidden_states(model, model_inputs: dict, with_aux_loss: bool):
    """The backbone's last hidden state (B, T, H) and, with `with_aux_loss`, the router aux loss,
    computed as TRL's fused LM head does (no KV cache; router logits wherever the config or the
    caller asks). Call it under the accelerator's autocast, as TRL calls its model."""
    backbone, _ = _backbone(model)
    text_config = _causal_lm(model).config.get_text_config()
    kwargs = dict(model_inputs, use_cache=False)
    if with_aux_loss or getattr(text_config, "output_router_logits", False):
        kwargs["output_router_logits"] = True
    outputs = backbone(**kwargs)
    aux = router_aux_loss(model, outputs.router_logits, model_inputs.get("attention_mask")) if with_aux_loss else None
    return outputs.last_hidden_state, aux


def _lm_head_inputs(hidden, lm_head, cast_to_fp32: bool):
    """(hidden, weight, bias) for the fused lm_head; fp32 with GRPOConfig.cast_lm_head_to_fp32, as TRL."""
    weight, bias = lm_head.weight, getattr(lm_head, "bias", None)
    if cast_to_fp32:
        hidden, weight = hidden.float(), weight.float()
        bias = None if bias is None else bias.float()
    return hidden, weight, bias


def _fused_compute_loss(self, model, inputs):
    """TRL's `_compute_loss`, with the per-token log-probs and the loss fused from hidden states."""
    cfg = _loss_config(self)
    prompt_ids, prompt_mask = inputs["prompt_ids"], inputs["prompt_mask"]
    completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
    mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]
    input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
    attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
    logits_to_keep = completion_ids.size(1)

    unwrapped = self.accelerator.unwrap_model(model)
    model_inputs = dict(input_ids=input_ids, attention_mask=attention_mask, **multimodal_model_inputs(inputs))
    with self.accelerator.autocast():
        hidden, aux_loss = _hidden_states(unwrapped, model_inputs, self.aux_loss_enabled)
    hidden, weight, bias = _lm_head_inputs(hidden[:, -logits_to_keep - 1:-1], _backbone(unwrapped)[1],
                                           self.args.cast_lm_head_to_fp32)

    mode = "train" if self.model.training else "eval"
    accumulation = self.current_gradient_accumulation_steps if mode == "train" else 1.0
    num_items = None
    if cfg.uses_num_items_in_batch and cfg.loss_type in TOKEN_MEAN_GLOBAL:
        # As TRL: num_items_in_batch spans the generation batch; rescale it to one accumulation window.
        num_items = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
        if mode == "train":
            num_items = num_items * accumulation / self.args.steps_per_generation
    global_count = num_items is not None
    # The entropy coefficient applied this step: TRL's adaptive controller gates it on the entropy
    # measured at the end of the previous optimizer step.
    coef = applied_entropy_coef(self.entropy_coef if self._entropy_bonus_enabled else 0.0, self._last_world_entropy,
                                adaptive=self.use_adaptive_entropy, target=self.args.entropy_target)
    if global_count:  # TRL scales only the bonus by the accumulation steps
        coef = coef / accumulation
    cfg = cfg.replace(entropy_coef=float(coef))
    old = inputs.get("old_per_token_logps")
    sampling = inputs.get("sampling_per_token_logps")
    out = fused_linear_grpo_loss(
        hidden, weight, completion_ids, inputs["advantages"], bias=bias,
        mask=mask, old_logps=old, ref_logps=inputs.get("ref_per_token_logps"),
        sampling_logps=(sampling if (cfg.is_correction is not None or cfg.off_policy_mask_threshold is not None)
                        else None),
        num_items_in_batch=num_items, config=cfg, backend=getattr(self, "_grpo_kernels_backend", "auto"))
    loss = out.loss if global_count else out.loss / accumulation
    if self._entropy_bonus_enabled:
        _entropy_controller(self, mode, out, mask, cfg, global_count)
    if aux_loss is not None:  # TRL scales the aux loss for gradient accumulation whatever the loss type
        loss = loss + self.router_aux_loss_coef * aux_loss / accumulation
        self._metrics[mode]["aux_loss"].append(self.accelerator.gather_for_metrics(aux_loss).mean().item())
    _log_trl_metrics(self, mode, out, inputs, mask, old, cfg)
    return loss


def _entropy_controller(self, mode, out, mask, cfg, global_count):
    """TRL's policy_loss metric and its adaptive entropy coefficient update, step for step."""
    effective = mask.float()
    if cfg.top_entropy_quantile < 1.0:
        effective = effective * self.get_high_entropy_mask(out.entropy, mask, 1 - cfg.top_entropy_quantile).float()
    stats = torch.stack([(out.entropy * effective).sum(), effective.sum()]).detach()
    # out.loss = policy − coef·bonus with bonus the mean entropy over the effective mask.
    bonus = stats[0] / stats[1].clamp(min=1.0)
    policy_loss = out.loss.detach() + cfg.entropy_coef * bonus
    self._metrics[mode]["policy_loss"].append(self.accelerator.gather(policy_loss).nanmean().item())
    if self.use_adaptive_entropy and mode == "train":
        window = self._entropy_window_stats
        self._entropy_window_stats = stats if window is None else window + stats
        if self.accelerator.sync_gradients:
            totals = self.accelerator.reduce(self._entropy_window_stats, reduction="sum")
            world_entropy = (totals[0] / totals[1].clamp(min=1.0)).item()
            args = self.args
            self.entropy_coef = next_entropy_coef(self.entropy_coef, world_entropy, target=args.entropy_target,
                                                  delta=args.entropy_coef_delta, low=args.entropy_coef_min,
                                                  high=args.entropy_coef_max)
            self._last_world_entropy = world_entropy
            self._entropy_window_stats = None
    if mode == "train" and self.accelerator.sync_gradients:
        self._metrics[mode]["entropy_coef"].append(self.entropy_coef)


def _log_trl_metrics(self, mode, out, inputs, mask, old, cfg):
    """The metrics TRL's _compute_loss logs, under TRL's names, reduced across processes as TRL does.

    TRL's `global_masked_mean` is a masked token mean, as the kernels' metrics are, except of a
    (B, 1) tensor: a ratio and advantages both one per sequence (importance_sampling_level=
    "sequence" with (B,) advantages) or one-token completions, which it averages over the rows,
    masked or not. So a metric is the kernels' where TRL's is a token mean of the same values, and
    TRL's own computation otherwise (and for the per-sequence clip fractions no kernel reports).
    kl and entropy are always the kernels': TRL's row mean of one-token completions, which
    counts masked tokens, differs only where a completion's one token is masked.
    """
    metrics = self._metrics[mode]
    m = mask.float()
    count = m.sum()

    def reduce_mean(local_sum, local_count):  # sum over processes / count over processes
        totals = self.accelerator.reduce(torch.stack([local_sum.float(), local_count.float()]), reduction="sum")
        return (totals[0] / totals[1].clamp(min=1.0)).item()

    def kernel_mean(name, rows=None):  # the kernels' mean over this call's tokens (or `rows` rows)
        local_count = count if rows is None else count.new_tensor(float(rows))
        return reduce_mean(out.metrics[name] * local_count, local_count)

    def trl_mean(x):  # TRL's global_masked_mean
        if x.shape[1] == 1:
            return reduce_mean(x.sum(), x.new_tensor(float(x.shape[0])))
        return reduce_mean((x * m).sum(), count)

    if cfg.beta != 0.0:
        metrics["kl"].append(kernel_mean("kl"))
    metrics["entropy"].append(kernel_mean("entropy"))
    adv = inputs["advantages"]
    adv = adv.unsqueeze(1) if adv.dim() == 1 else adv
    # TRL's clip indicators are (B, 1), one per sequence, when its ratio and the advantages both are.
    per_row = adv.shape[1] == 1 and (cfg.importance_sampling_level == "sequence" or mask.shape[1] == 1)
    if cfg.pg_loss == "clip":
        ratio = _trl_ratio(out.logps, old, mask, cfg.importance_sampling_level)
        if cfg.delta is not None:
            ratio = ratio.clamp(max=cfg.delta)  # TRL caps its ratio at delta before it counts clipping
        low = ((ratio < 1 - cfg.eps_low) & (adv < 0)).float()
        high = ((ratio > 1 + cfg.eps_high) & (adv > 0)).float()
        # The kernels count ρ > 1 + ε_high, TRL min(ρ, δ) > 1 + ε_high: the same unless δ ≤ 1 + ε_high.
        from_kernels = not per_row and (cfg.delta is None or cfg.delta > 1 + cfg.eps_high)
        for name, clipped in (("low", low), ("high", high), ("region", torch.maximum(low, high))):
            metrics[f"clip_ratio/{name}_mean"].append(
                kernel_mean(f"clip_ratio/{name}") if from_kernels else trl_mean(clipped))

        def seq_mean(x):  # TRL's masked_seq_mean: NaN for a (B, T) row without tokens
            return x.squeeze(1) if x.shape[1] == 1 else (x * m).sum(-1) / m.sum(-1)

        metrics["clip_ratio/low_min"].append(nanmin(self.accelerator.gather(seq_mean(low))).item())
        metrics["clip_ratio/high_max"].append(nanmax(self.accelerator.gather(seq_mean(high))).item())
    elif cfg.pg_loss == "cispo":
        if per_row:
            ratio = _trl_ratio(out.logps, old, mask, cfg.importance_sampling_level)
            metrics["cispo_clip_ratio"].append(trl_mean(((ratio > cfg.eps_high) & (adv > 0)).float()))
        else:
            metrics["cispo_clip_ratio"].append(kernel_mean("cispo_clip_ratio"))
    elif cfg.pg_loss == "vespo":
        # The kernels average phi over sequences when the advantages are one per sequence, as TRL.
        metrics["vespo/phi_seq_mean"].append(kernel_mean("vespo/phi_seq_mean",
                                                         rows=adv.shape[0] if adv.shape[1] == 1 else None))


def _trl_ratio(logps, old, mask, level):
    """TRL's coef_1: the token ratio (B, T), or at importance_sampling_level="sequence" the
    sequence ratio (B, 1); 1 without old log-probs (TRL's are then the current ones, detached)."""
    if old is None:
        return torch.ones_like(logps if level == "token" else logps[:, :1])
    log_ratio = torch.where(mask.bool(), logps - old, 0.0)
    if level == "token":
        return torch.exp(log_ratio)
    return torch.exp(log_ratio.sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1))


def _loss_config(trainer) -> GRPOLossConfig:
    """The trainer's loss config, made on first use for a trainer built before `patch_trl()`."""
    cfg = getattr(trainer, "_grpo_kernels_config", None)
    if cfg is None:
        cfg = config_from_trl(trainer.args, trainer, entry=PATCH_TRL)
        trainer._grpo_kernels_config = cfg
    return cfg


def _truncated_lm_head(model, temperature: float, truncation: Truncation, cast_to_fp32: bool, backend: str) -> None:
    """Make `model(..., labels=labels, fused_lm_head=True)` (TRL's call for old and reference
    log-probs) return the log-probs and entropies over the sampler's kept set, computed by
    `fused_linear_selective_logprobs` from the hidden states; other calls (generation) are unchanged.

    Wraps the forward TRL's `add_fused_lm_head` installed, on the same module, so TRL's chunking
    and per-chunk multimodal inputs are used as they are. Returns TRL's FusedCausalLMOutput.
    """
    model = _causal_lm(model)
    previous = model.forward
    logit_options = model_logit_options(model.config)

    def forward(*args, fused_lm_head=False, labels=None, shift_labels=None, **kwargs):
        if not fused_lm_head:
            return previous(*args, labels=labels, shift_labels=shift_labels, **kwargs)
        kwargs.pop("num_items_in_batch", None)
        # TRL passes output_router_logits=True only when it wants the aux loss back
        hidden, aux = _hidden_states(model, kwargs, bool(kwargs.pop("output_router_logits", False)))
        if shift_labels is None:
            hidden, ids = hidden[:, :-1], labels[:, 1:]
        else:  # pre-shifted (context / sequence parallelism), scored without shifting, as TRL's head
            ids = shift_labels
        hidden, weight, bias = _lm_head_inputs(hidden, model.get_output_embeddings(), cast_to_fp32)
        mask = ids != -100
        logp, entropy = fused_linear_selective_logprobs(
            hidden, weight, ids.clamp(min=0), bias=bias, mask=mask, temperature=temperature, return_entropy=True,
            backend=backend, **truncation._asdict(), **logit_options)
        return FusedCausalLMOutput(log_probs=logp, entropy=entropy, label_mask=mask, aux_loss=aux)

    model.forward = forward


def _prepare(trainer, entry: str, truncation_aware_logprobs: bool, backend: str) -> None:
    """Validate the options now (raising names `entry`) and, when asked, compute old/reference
    log-probs over the sampler's kept set."""
    trainer._grpo_kernels_entry = entry
    trainer._grpo_kernels_backend = backend
    truncation = trl_sampling_truncation(trainer, entry) if truncation_aware_logprobs else NO_TRUNCATION
    trainer._grpo_kernels_config = config_from_trl(trainer.args, trainer, entry=entry, truncation=truncation)
    if truncation.active:
        for model in (trainer.model, trainer.ref_model):
            if model is not None:
                _truncated_lm_head(model, trainer.temperature, truncation, trainer.args.cast_lm_head_to_fp32, backend)


class FusedGRPOTrainer(GRPOTrainer):
    """`trl.GRPOTrainer` with the loss computed by `fused_linear_grpo_loss` (no full logits).

    Takes every argument of trl.GRPOTrainer, plus `grpo_kernels_backend` ("auto", "triton", ...)
    and `truncation_aware_logprobs` (False: TRL's full-vocabulary log-probs; True: the loss and the
    old/reference log-probs over the kept set of GRPOConfig's top_k/top_p/min_p).
    """

    def __init__(self, *args, grpo_kernels_backend: str = "auto", truncation_aware_logprobs: bool = False,
                 **kwargs):
        super().__init__(*args, **kwargs)
        _prepare(self, FUSED_TRAINER, truncation_aware_logprobs, grpo_kernels_backend)

    _compute_loss = _fused_compute_loss


def patch_trl(*, truncation_aware_logprobs: bool = False, backend: str = "auto") -> Callable[[], None]:
    """Make every trl.GRPOTrainer compute its loss with grpo_kernels (options checked when a trainer
    is built, errors naming patch_trl()). `truncation_aware_logprobs`, `backend`: as FusedGRPOTrainer's.
    Returns a function that undoes it."""
    original_init, original_loss = GRPOTrainer.__init__, GRPOTrainer._compute_loss

    def __init__(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        if not isinstance(self, FusedGRPOTrainer):  # which prepares itself, under its own name
            _prepare(self, PATCH_TRL, truncation_aware_logprobs, backend)

    GRPOTrainer.__init__, GRPOTrainer._compute_loss = __init__, _fused_compute_loss

    def undo() -> None:
        GRPOTrainer.__init__, GRPOTrainer._compute_loss = original_init, original_loss

    return undo

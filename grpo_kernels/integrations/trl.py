"""Drop-in use from TRL: `FusedGRPOTrainer`, a `trl.GRPOTrainer` whose loss is `fused_linear_grpo_loss`.

    from grpo_kernels.integrations.trl import FusedGRPOTrainer
    trainer = FusedGRPOTrainer(model=model, reward_funcs=..., args=GRPOConfig(...), train_dataset=...)

Everything but the loss is TRL's (generation, rewards, advantages, old/reference log-probs,
logging). The loss is computed from the last hidden state and the lm_head, and the logits are
never materialised. GRPOConfig options map 1:1 (see `config_from_trl`). An option this trainer
cannot honour raises at construction instead of silently training something else. TRL's
metric names are logged. `patch_trl()` does the same for `trl.GRPOTrainer` objects that users
construct themselves.
"""
from __future__ import annotations

from typing import Callable

import torch

from ..config import GRPOLossConfig
from ..entropy_control import applied_entropy_coef, next_entropy_coef
from ..fused_linear import fused_linear_grpo_loss
from ..transform import model_logit_options

try:
    from trl import GRPOTrainer
    from trl.trainer.utils import nanmax, nanmin
except ImportError as exc:  # pragma: no cover - exercised only without trl
    raise ImportError("grpo_kernels.integrations.trl needs trl: pip install 'grpo_kernels[trl]'") from exc

SUPPORTED_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo")
TOKEN_MEAN_GLOBAL = ("dapo", "cispo", "vespo")  # TRL normalises these by num_items_in_batch


def config_from_trl(args, trainer=None) -> GRPOLossConfig:
    """The GRPOLossConfig equivalent of a TRL GRPOConfig; raises for what we cannot honour.

    With `trainer`, the model's logit transform (softcap, logit scale) comes from its config,
    as TRL's fused LM head reads it.
    """
    if args.loss_type not in SUPPORTED_LOSS_TYPES:
        raise ValueError(f"GRPOConfig.loss_type={args.loss_type!r} is not supported by grpo_kernels "
                         f"(supported: {list(SUPPORTED_LOSS_TYPES)})")
    if trainer is not None and getattr(trainer, "aux_loss_enabled", False):
        raise ValueError("MoE router aux loss (output_router_logits) is not supported by FusedGRPOTrainer")
    use_is = bool(getattr(args, "use_vllm", False) and getattr(args, "vllm_importance_sampling_correction", False))
    logit_options = {}
    if trainer is not None:
        logit_options = model_logit_options(trainer.accelerator.unwrap_model(trainer.model).config)
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


def _backbone(model):
    """The module that returns last_hidden_state (PEFT and plain HF models), and the lm_head."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return getattr(base, base.base_model_prefix), base.get_output_embeddings()


def _fused_compute_loss(self, model, inputs):
    """TRL's `_compute_loss`, with the per-token log-probs and the loss fused from hidden states."""
    cfg = _loss_config(self)
    if inputs.get("pixel_values") is not None:
        raise ValueError("FusedGRPOTrainer does not support multimodal inputs (pixel_values)")
    prompt_ids, prompt_mask = inputs["prompt_ids"], inputs["prompt_mask"]
    completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
    mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]
    input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
    attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
    logits_to_keep = completion_ids.size(1)

    unwrapped = self.accelerator.unwrap_model(model)
    backbone, lm_head = _backbone(unwrapped)
    with self.accelerator.autocast():
        hidden = backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
    hidden = hidden[:, -logits_to_keep - 1:-1]

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
        hidden, lm_head.weight, completion_ids, inputs["advantages"], bias=getattr(lm_head, "bias", None),
        mask=mask, old_logps=old, ref_logps=inputs.get("ref_per_token_logps"),
        sampling_logps=(sampling if (cfg.is_correction is not None or cfg.off_policy_mask_threshold is not None)
                        else None),
        num_items_in_batch=num_items, config=cfg, backend=getattr(self, "_grpo_kernels_backend", "auto"))
    loss = out.loss if global_count else out.loss / accumulation
    if self._entropy_bonus_enabled:
        _entropy_controller(self, mode, out, mask, cfg, global_count)
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
    cfg = getattr(trainer, "_grpo_kernels_config", None)
    if cfg is None:
        cfg = config_from_trl(trainer.args, trainer)
        trainer._grpo_kernels_config = cfg
    return cfg


class FusedGRPOTrainer(GRPOTrainer):
    """`trl.GRPOTrainer` with the loss computed by `fused_linear_grpo_loss` (no full logits).

    Takes every argument of trl.GRPOTrainer, plus `grpo_kernels_backend` ("auto", "triton", ...).
    """

    def __init__(self, *args, grpo_kernels_backend: str = "auto", **kwargs):
        super().__init__(*args, **kwargs)
        self._grpo_kernels_backend = grpo_kernels_backend
        _loss_config(self)  # unsupported options raise now, not at the first step

    _compute_loss = _fused_compute_loss


def patch_trl() -> Callable[[], None]:
    """Make every trl.GRPOTrainer compute its loss with grpo_kernels. Returns a function that undoes it."""
    original = GRPOTrainer._compute_loss
    GRPOTrainer._compute_loss = _fused_compute_loss

    def undo() -> None:
        GRPOTrainer._compute_loss = original

    return undo


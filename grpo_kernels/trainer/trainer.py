"""GRPOTrainer: rollout → reward → advantages → fused-linear loss → optimizer step, on the public API."""
from __future__ import annotations

import copy
import json
import math
import os
import time
import warnings
from typing import Callable, Dict, List, Optional, Sequence

import torch

from ..entropy_control import next_entropy_coef
from ..advantages import group_advantages
from ..fused_linear import fused_linear_grpo_loss, fused_linear_selective_logprobs
from ..transform import with_model_logit_options
from . import checkpoint
from .config import TrainerConfig
from .parallel import DataParallel
from .rewards import reward_name, score
from .rollout import Rollout, generate
from .threads import cpu_threads

# stop_at_reward compares the mean reward of this many latest steps.
RECENT_WINDOW = 5


def _lr_lambda(cfg: TrainerConfig):
    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
        if cfg.lr_schedule == "linear":
            return max(0.0, 1.0 - progress)
        if cfg.lr_schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        return 1.0
    return factor


class _PolicyCalls(torch.nn.Module):
    """Every use of the policy (sampling, old/reference log-probs, the micro-batch loss) as one
    module's forward, `policy(method, *args)`: the call in which FSDP2 gathers the parameters it
    shards (and DDP prepares its gradient all-reduce)."""

    def __init__(self, trainer: "GRPOTrainer"):
        super().__init__()
        self.model = trainer.model
        self._trainer = [trainer]  # a list: not a submodule

    def forward(self, method: str, *args, **kwargs):
        return getattr(self._trainer[0], method)(*args, **kwargs)


class GRPOTrainer:
    """A GRPO trainer thin enough to read in one sitting.

    model: an HF causal LM (its backbone gives the last hidden state, its output embedding is
    the lm_head); tokenizer: its HF tokenizer; reward_funcs: TRL-style reward functions.
    `train(dataset)` takes a sequence of dicts with a "prompt" key; the other keys reach the
    reward functions as keyword lists. The full logits are never materialised: log-probs and
    the loss come from `fused_linear_*` on the hidden states.

    Under torchrun (torch.distributed initialised with W > 1 processes) it trains data-parallel
    with FSDP2 (or DDP, `TrainerConfig.data_parallel`): each rank samples prompts_per_step / W
    prompts, and the update is that of the whole batch (see trainer/parallel.py). Rank 0 writes
    the log and the checkpoints.
    """

    def __init__(self, model, tokenizer, reward_funcs: Sequence[Callable], config: Optional[TrainerConfig] = None,
                 ref_model=None):
        self.cfg = config or TrainerConfig()
        if not reward_funcs:
            raise ValueError("reward_funcs must name at least one reward function")
        if self.cfg.reward_weights is not None and len(self.cfg.reward_weights) != len(reward_funcs):
            raise ValueError(f"TrainerConfig.reward_weights has {len(self.cfg.reward_weights)} entries for "
                             f"{len(reward_funcs)} reward functions")
        self.model, self.tokenizer, self.reward_funcs = model, tokenizer, list(reward_funcs)
        # The model's own logit transform (Gemma's softcap, Cohere's scale) is part of its log-probs.
        self.cfg.loss = with_model_logit_options(self.cfg.loss, model.config)
        self.entropy_coef = self.cfg.loss.entropy_coef
        self.last_entropy = math.inf  # TRL's controller starts with the bonus gated off
        tokenizer.padding_side = "left"
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.device = next(model.parameters()).device
        self.ref_model = ref_model
        if self.cfg.loss.beta != 0.0 and ref_model is None and not hasattr(model, "disable_adapter"):
            self.ref_model = copy.deepcopy(model).eval().requires_grad_(False)
        self.parallel = DataParallel(self.device, self.cfg.data_parallel)
        self.parallel.share(self.cfg.prompts_per_step, "TrainerConfig.prompts_per_step")
        # Ranks sample different completions; the prompt sampler is the same everywhere (each
        # rank takes its share of the same draw).
        torch.manual_seed(self.cfg.seed + self.parallel.rank)
        self.sampler = torch.Generator().manual_seed(self.cfg.seed)
        # Before the optimizer: FSDP2 replaces the parameters with their shards.
        self.policy = self.parallel.wrap(_PolicyCalls(self), units=getattr(model, "_no_split_modules", None) or ())
        trainable = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(trainable, lr=self.cfg.learning_rate,
                                           betas=tuple(self.cfg.adam_betas), weight_decay=self.cfg.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, _lr_lambda(self.cfg))
        self.step = 0
        self.history: List[Dict] = []

    # ---------------------------------------------------------------- log-probs and loss
    def _packing(self, model) -> bool:
        """Padding-free batches: on by default with flash-attn on CUDA, selectable everywhere."""
        choice = self.cfg.padding_free
        if choice != "auto":
            return bool(choice)
        import importlib.util

        return self.device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None

    def _token_states(self, model, batch: Rollout) -> Dict:
        """Last hidden states that predict the completion tokens, with the loss's layout arguments.

        Padded: hidden (B, T, H) from the padded batch. Packed (padding-free): every sequence's
        real prompt and completion tokens concatenated into one row, positions restarting per
        sequence, so transformers attends within sequences only (flash-attn's varlen kernel, or
        a block-diagonal mask for SDPA); hidden (N, H) for the N completion tokens, with cu_seqlens.
        """
        backbone = getattr(model, model.base_model_prefix)
        p = batch.prompt_ids.shape[1]
        if not self._packing(model):
            input_ids = torch.cat([batch.prompt_ids, batch.completion_ids], dim=1)
            attention = torch.cat([batch.prompt_mask, batch.completion_mask.long()], dim=1)
            # As generate() does: positions count only real tokens, so left padding shifts nothing.
            positions = (attention.cumsum(-1) - 1).clamp(min=0)
            hidden = backbone(input_ids=input_ids, attention_mask=attention, position_ids=positions,
                              use_cache=False).last_hidden_state
            return dict(hidden=hidden[:, p - 1:p - 1 + batch.completion_ids.shape[1]], ids=batch.completion_ids,
                        mask=batch.completion_mask, cu_seqlens=None, pack=lambda x: x)
        pieces, positions, targets, lengths = [], [], [], []
        offset = 0
        for i in range(batch.completion_ids.shape[0]):
            prompt = batch.prompt_ids[i][batch.prompt_mask[i].bool()]
            completion = batch.completion_ids[i][batch.completion_mask[i]]
            seq = torch.cat([prompt, completion])
            pieces.append(seq)
            positions.append(torch.arange(seq.numel(), device=seq.device))
            targets.append(offset + prompt.numel() - 1 + torch.arange(completion.numel(), device=seq.device))
            lengths.append(completion.numel())
            offset += seq.numel()
        # No attention mask and no cache: transformers then reads the sequence boundaries from the
        # restarting position ids (a KV cache would switch that detection off).
        hidden = backbone(input_ids=torch.cat(pieces)[None], position_ids=torch.cat(positions)[None],
                          use_cache=False).last_hidden_state
        cu = torch.tensor([0] + lengths, device=self.device).cumsum(0).to(torch.int32)
        mask = batch.completion_mask
        return dict(hidden=hidden[0, torch.cat(targets)], ids=batch.completion_ids[mask], mask=None, cu_seqlens=cu,
                    pack=lambda x: x[mask])

    def _lm_head(self, model):
        head = model.get_output_embeddings()
        return head.weight, getattr(head, "bias", None)

    @torch.no_grad()
    def _logps(self, model, batch: Rollout) -> torch.Tensor:
        """Log-probs of the completion tokens in the loss's own layout: (B, T) padded (0 where
        masked), or (N,) packed when padding-free. They go back into the loss as they are."""
        weight, bias = self._lm_head(model)
        states = self._token_states(model, batch)
        loss_cfg = self.cfg.loss
        logp = fused_linear_selective_logprobs(states["hidden"], weight, states["ids"], bias=bias,
                                               temperature=loss_cfg.temperature, logit_scale=loss_cfg.logit_scale,
                                               final_logit_softcapping=loss_cfg.final_logit_softcapping,
                                               mask=states["mask"], backend=self.cfg.backend)
        return logp

    def _reference_logps(self, batch: Rollout) -> torch.Tensor:
        if self.ref_model is not None:
            return self._logps(self.ref_model, batch)
        with self.model.disable_adapter():  # PEFT: the base model is the reference
            return self._logps(self.model, batch)

    def micro_batch_loss(self, micro: Rollout, advantages, old, ref, *, num_items_in_batch=None, config=None):
        """The loss of one micro-batch (padded or packed, as configured): a GRPOLossOutput.

        old and ref: log-probs as `_logps` gives them in this layout ((B, T) or packed (N,)).
        """
        cfg = config or self.cfg.loss
        weight, bias = self._lm_head(self.model)
        states = self._token_states(self.model, micro)
        use_sampling = cfg.is_correction is not None or cfg.off_policy_mask_threshold is not None
        return fused_linear_grpo_loss(
            states["hidden"], weight, states["ids"], advantages, bias=bias, mask=states["mask"],
            old_logps=old, ref_logps=ref,
            # The rollout's own (B, T) sampling log-probs, gathered once into the packed order.
            sampling_logps=states["pack"](micro.sampling_logps) if use_sampling else None,
            num_items_in_batch=num_items_in_batch, cu_seqlens=states["cu_seqlens"], config=cfg,
            backend=self.cfg.backend)

    @staticmethod
    def _token_slice(x, bounds, part: slice):
        """The micro-batch `part`'s tokens of a per-token tensor: rows of (B, T), or the packed
        (N,) span of those sequences, `bounds` being the sequences' packed offsets."""
        if x is None or x.dim() == 2:
            return None if x is None else x[part]
        return x[bounds[part.start]:bounds[part.stop]]

    def _micro_batches(self, size: int):
        step = size // self.cfg.gradient_accumulation_steps
        return [slice(i, i + step) for i in range(0, size, step)]

    def _optimize(self, batch: Rollout, advantages, old, ref) -> Dict[str, float]:
        """One optimizer step over the batch, in gradient-accumulation micro-batches.

        Micro-batch losses are scaled so that their sum over micro-batches and ranks is the loss
        of the whole (global) batch: token-mean losses divide by the global token count, the
        others are weighted by their share of the global batch's sequences. DDP and FSDP2 average
        the ranks' gradients, so each rank's loss is multiplied by W.
        """
        cfg = self.cfg.loss.replace(entropy_coef=self._applied_entropy_coef())
        world = self.parallel.world
        # Packed offsets of the sequences, read once per step: the token count, and the spans of
        # packed old/ref log-probs per micro-batch.
        bounds = [0] + batch.completion_mask.sum(1).cumsum(0).tolist()
        size = batch.completion_ids.shape[0]
        global_size = size * world
        total_tokens = int(self.parallel.sum([bounds[-1]])[0])
        global_count = cfg.uses_num_items_in_batch
        sums: Dict[str, float] = {}
        entropy_sum = 0.0
        parts = self._micro_batches(size)
        for i, part in enumerate(parts):
            share = (part.stop - part.start) / global_size
            micro = Rollout(batch.prompts[part], batch.prompt_ids[part], batch.prompt_mask[part],
                            batch.completion_ids[part], batch.completion_mask[part], batch.sampling_logps[part],
                            batch.texts[part], batch.truncated[part])
            with self.parallel.sync_gradients(self.policy, last=i == len(parts) - 1):
                out = self.policy(
                    "micro_batch_loss", micro, advantages[part], self._token_slice(old, bounds, part),
                    self._token_slice(ref, bounds, part), num_items_in_batch=total_tokens if global_count else None,
                    config=cfg.replace(entropy_coef=cfg.entropy_coef * share) if global_count else cfg)
                (out.loss * world if global_count else out.loss * (share * world)).backward()
            entropy_sum += float(out.entropy.sum())  # 0 at masked tokens
            for key, value in out.metrics.items():
                sums[key] = sums.get(key, 0.0) + float(value) * share
            sums["loss"] = sums.get("loss", 0.0) + float(out.loss.detach()) * (1.0 if global_count else share)
        # The metrics of the whole batch: every rank's share-weighted sums added up.
        keys = sorted(sums)
        totals = self.parallel.sum([sums[k] for k in keys] + [entropy_sum])
        sums, entropy_sum = dict(zip(keys, totals[:-1])), totals[-1]
        params = [p for p in self.model.parameters() if p.requires_grad]
        norm = torch.nn.utils.clip_grad_norm_(params, self.cfg.max_grad_norm or float("inf"))
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        sums["grad_norm"] = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # FSDP2: a DTensor
        if self.cfg.use_adaptive_entropy:
            self._update_entropy_coef(entropy_sum / max(total_tokens, 1))  # token-weighted, as TRL
            sums["entropy_coef"] = self.entropy_coef
        return sums

    def _applied_entropy_coef(self) -> float:
        """The bonus coefficient of this step: gated on the last entropy under adaptive control."""
        if self.cfg.use_adaptive_entropy and self.last_entropy > self.cfg.entropy_target:
            return 0.0
        return self.entropy_coef

    def _update_entropy_coef(self, entropy: float) -> None:
        """TRL's rule: one delta step towards more bonus when entropy is at or below the target."""
        cfg = self.cfg
        self.entropy_coef = next_entropy_coef(self.entropy_coef, entropy, target=cfg.entropy_target,
                                              delta=cfg.entropy_coef_delta, low=cfg.entropy_coef_min,
                                              high=cfg.entropy_coef_max)
        self.last_entropy = entropy

    # ---------------------------------------------------------------- one step
    def train_step(self, dataset) -> Dict[str, float]:
        cfg = self.cfg
        t0 = time.perf_counter()
        index = torch.randint(len(dataset), (cfg.prompts_per_step,), generator=self.sampler).tolist()
        rows = [dataset[i] for i in index[self.parallel.share(cfg.prompts_per_step, "TrainerConfig.prompts_per_step")]]
        with torch.no_grad():
            batch = self.policy("_sample", [r["prompt"] for r in rows])
        columns = {k: [r[k] for r in rows for _ in range(cfg.num_generations)] for k in rows[0] if k != "prompt"}
        rewards = self.parallel.gather_rows(score(self.reward_funcs, batch.prompts, batch.texts, columns, self.device))
        adv = self._advantages(rewards)
        mine = self.parallel.share(rewards.shape[0], "the number of completions")
        with torch.no_grad():
            old = self.policy("_logps", self.model, batch) if cfg.num_iterations > 1 else None
            ref = self.policy("_reference_logps", batch) if cfg.loss.beta != 0.0 else None
        metrics: Dict[str, float] = {}
        for _ in range(cfg.num_iterations):
            metrics = self._optimize(batch, adv.advantages[mine], old, ref)
        weights = torch.tensor(cfg.reward_weights or [1.0] * len(self.reward_funcs), device=self.device)
        total = torch.nansum(rewards * weights, dim=1)
        total = torch.where(torch.isnan(rewards).all(1), float("nan"), total)
        tokens, truncated = self.parallel.sum([batch.completion_mask.sum(), batch.truncated.sum()])
        elapsed = time.perf_counter() - t0
        self.step += 1
        scored = total[~torch.isnan(total)]
        record = {"step": self.step, "reward": float(torch.nanmean(total)),
                  "reward_std": float(scored.std()) if scored.numel() > 1 else 0.0,
                  "frac_reward_zero_std": float(adv.frac_zero_std), "lr": self.scheduler.get_last_lr()[0],
                  "completion_length": tokens / rewards.shape[0], "truncated": truncated / rewards.shape[0],
                  "tokens_per_s": tokens * cfg.num_iterations / elapsed, "step_time_s": elapsed}
        for j, fn in enumerate(self.reward_funcs):
            col = rewards[:, j]
            record[f"rewards/{reward_name(fn)}"] = float(torch.nanmean(col)) if bool((~torch.isnan(col)).any()) else 0.0
        record.update(metrics)
        return record

    def _sample(self, prompts: List[str]) -> Rollout:
        return generate(self.model, self.tokenizer, prompts, self.cfg)

    def _advantages(self, rewards: torch.Tensor):
        """Group advantages of the whole batch's rewards (every rank's, in rank order)."""
        cfg = self.cfg
        return group_advantages(rewards, group_size=cfg.num_generations, scale_rewards=cfg.scale_rewards,
                                reward_weights=cfg.reward_weights)

    # ---------------------------------------------------------------- the loop
    def _save(self):
        """Rank 0 writes the checkpoint (the model and optimizer are the same on every rank) with
        every rank's RNG states; the others wait until it is in place."""
        rng = self.parallel.gather_objects(checkpoint.rng_state(self.sampler))
        model_state, optimizer_state = self.parallel.full_state(self.model, self.optimizer)
        path = None
        if self.parallel.is_main:
            payload = {"model": model_state, "optimizer": optimizer_state,
                       "scheduler": self.scheduler.state_dict(), "step": self.step, "history": self.history,
                       "rng": rng[0], "rng_per_rank": rng, "world_size": self.parallel.world,
                       "data_parallel": self.parallel.strategy, "config": self.cfg.to_dict(),
                       "entropy_control": {"coef": self.entropy_coef, "last_entropy": self.last_entropy}}
            path = checkpoint.save(self.cfg.output_dir, self.step, payload)
        self.parallel.barrier()
        return path

    def _resume(self) -> bool:
        state = checkpoint.load_latest(self.cfg.output_dir)
        if state is None:
            return False
        written_by = state.get("world_size", 1)
        if written_by != self.parallel.world:
            raise ValueError(f"the checkpoint in {self.cfg.output_dir} was written by {written_by} process(es); resume "
                             f"it with the same number (this run has {self.parallel.world})")
        strategy = state.get("data_parallel", self.parallel.strategy)
        if written_by > 1 and strategy != self.parallel.strategy:
            raise ValueError(f"the checkpoint in {self.cfg.output_dir} was written with data_parallel={strategy!r}; "
                             f"resume it with the same (this run has {self.parallel.strategy!r})")
        self.parallel.load_full_state(self.model, self.optimizer, state["model"], state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step, self.history = state["step"], state["history"]
        control = state.get("entropy_control", {"coef": self.entropy_coef, "last_entropy": self.last_entropy})
        self.entropy_coef, self.last_entropy = control["coef"], control["last_entropy"]
        checkpoint.restore_rng(state.get("rng_per_rank", [state["rng"]])[self.parallel.rank], self.sampler)
        return True

    def train(self, dataset, resume: bool = False) -> List[Dict]:
        """Run until max_steps (or stop_at_reward); returns the per-step metrics.

        With `stop_at_reward` set, a run that ends without reaching it warns (RuntimeWarning) and
        leaves `self.reached_target` False. `resume=True` continues from the newest intact
        checkpoint in output_dir (damaged ones are skipped with a message).
        """
        if len(dataset) == 0 or "prompt" not in dataset[0]:
            raise ValueError("dataset must be a non-empty sequence of dicts with a 'prompt' key")
        cfg = self.cfg
        main = self.parallel.is_main
        os.makedirs(cfg.output_dir, exist_ok=True)
        if resume and not self._resume():
            raise FileNotFoundError(f"resume=True but {cfg.output_dir} holds no intact checkpoint")
        self.model.train()
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.max_steps, initial=self.step, desc="GRPO", disable=not (cfg.progress and main),
                   dynamic_ncols=True)
        # The log restarts from the checkpoint's history, so steps run after it before a crash
        # are not logged twice. Only rank 0 writes it (every rank holds the same records).
        log_path = os.path.join(cfg.output_dir, "metrics.jsonl") if main else os.devnull
        with open(log_path, "w") as log, cpu_threads(cfg.num_threads, self.model):
            log.writelines(json.dumps(record) + "\n" for record in self.history)
            while self.step < cfg.max_steps and not self.reached_target:
                record = self.train_step(dataset)
                self.history.append(record)
                log.write(json.dumps(record) + "\n")
                log.flush()
                if self.step % cfg.logging_steps == 0:
                    bar.set_postfix(reward=f"{record['reward']:.3f}", kl=f"{record.get('kl', 0.0):.3f}",
                                    clip=f"{record.get('clip_ratio/region', 0.0):.3f}",
                                    entropy=f"{record.get('entropy', 0.0):.2f}",
                                    tok_s=f"{record['tokens_per_s']:.0f}")
                bar.update(1)
                if cfg.save_steps and self.step % cfg.save_steps == 0:
                    self._save()
        bar.close()
        if cfg.stop_at_reward is not None and not self.reached_target:
            recent = _recent_mean(self.history)
            where = (f"mean reward of the last {RECENT_WINDOW} steps: {recent:.3f}" if recent > -math.inf else
                     f"fewer than the {RECENT_WINDOW} steps the target is averaged over")
            warnings.warn(f"GRPOTrainer: the run ended at step {self.step} without reaching stop_at_reward="
                          f"{cfg.stop_at_reward} ({where}); try more steps, a lower learning rate or an "
                          f"entropy bonus", RuntimeWarning, stacklevel=2)
        return self.history

    @property
    def reached_target(self) -> bool:
        """Whether the mean reward of the last RECENT_WINDOW steps reached stop_at_reward."""
        target = self.cfg.stop_at_reward
        return target is not None and _recent_mean(self.history) >= target


def _recent_mean(history: List[Dict], window: int = RECENT_WINDOW) -> float:
    recent = [h["reward"] for h in history[-window:]]
    return sum(recent) / len(recent) if len(recent) == window else -math.inf

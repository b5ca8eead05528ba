"""GRPOTrainer: rollout → reward → advantages → fused-linear loss → optimizer step, on the public API.

The loop only; batching.py lays out batches and micro-batches, entropy.py holds the adaptive
entropy coefficient, optim.py the optimizer and its schedule, trainer_state.py what a
checkpoint holds (checkpoint.py writes it crash-safely).
"""
from __future__ import annotations

import copy
import math
import os
import time
import warnings
from typing import Callable, Dict, List, Optional, Sequence

import torch

from ..advantages import group_advantages, reward_total
from ..fused_linear import fused_linear_grpo_loss, fused_linear_selective_logprobs
from ..ops.dispatch import BackendUnavailableError, why_unavailable
from ..transform import with_model_logit_options
from . import batching, checkpoint, run_dir, trainer_state
from .config import TrainerConfig
from .entropy import AdaptiveEntropy
from .optim import optimizer_and_schedule
from .parallel import DataParallel
from .rewards import reward_name, score
from .rollout import Rollout, generate
from .stopping import SignalStop, TrainingInterrupted
from .threads import cpu_threads

# stop_at_reward compares the mean reward of this many latest steps.
RECENT_WINDOW = 5


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
        self.entropy = AdaptiveEntropy(self.cfg)
        tokenizer.padding_side = "left"
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.device = next(model.parameters()).device
        if self.cfg.backend != "auto":  # fail here, not at the first step
            reason = why_unavailable(self.cfg.backend, self.device)
            if reason is not None:
                raise BackendUnavailableError(f"TrainerConfig.backend={self.cfg.backend!r} is unavailable: {reason}")
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
        self.optimizer, self.scheduler = optimizer_and_schedule(
            [p for p in model.parameters() if p.requires_grad], self.cfg)
        self.step = 0
        self.history: List[Dict] = []
        self._saved = (0, None)  # (step, path) of the newest checkpoint of this run
        self._run_dir: Optional[str] = None  # the output directory this trainer has written its run into

    # ---------------------------------------------------------------- log-probs and loss
    def _token_states(self, model, batch: Rollout) -> batching.TokenStates:
        """The hidden states predicting the batch's completion tokens, padded or packed as configured."""
        return batching.token_states(model, batch, batching.use_packing(self.cfg.padding_free, self.device))

    @torch.no_grad()
    def _logps(self, model, batch: Rollout) -> torch.Tensor:
        """Log-probs of the completion tokens in the loss's own layout: (B, T) padded (0 where
        masked), or (N,) packed when padding-free. They go back into the loss as they are."""
        weight, bias = _lm_head(model)
        states = self._token_states(model, batch)
        loss_cfg = self.cfg.loss
        return fused_linear_selective_logprobs(states.hidden, weight, states.ids, bias=bias,
                                               temperature=loss_cfg.temperature, logit_scale=loss_cfg.logit_scale,
                                               final_logit_softcapping=loss_cfg.final_logit_softcapping,
                                               mask=states.mask, backend=self.cfg.backend,
                                               **loss_cfg.truncation._asdict())

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
        weight, bias = _lm_head(self.model)
        states = self._token_states(self.model, micro)
        use_sampling = cfg.is_correction is not None or cfg.off_policy_mask_threshold is not None
        return fused_linear_grpo_loss(
            states.hidden, weight, states.ids, advantages, bias=bias, mask=states.mask,
            old_logps=old, ref_logps=ref,
            # The rollout's own (B, T) sampling log-probs, gathered once into the packed order.
            sampling_logps=states.layout(micro.sampling_logps) if use_sampling else None,
            num_items_in_batch=num_items_in_batch, cu_seqlens=states.cu_seqlens, config=cfg,
            backend=self.cfg.backend)

    def _optimize(self, batch: Rollout, advantages, old, ref) -> Dict[str, float]:
        """One optimizer step over the batch, in gradient-accumulation micro-batches.

        Micro-batch losses are scaled so that their sum over micro-batches and ranks is the loss
        of the whole (global) batch: token-mean losses divide by the global token count, the
        others are weighted by their share of the global batch's sequences. DDP and FSDP2 average
        the ranks' gradients, so each rank's loss is multiplied by W.
        """
        cfg = self.cfg.loss.replace(entropy_coef=self._applied_entropy_coef())
        world = self.parallel.world
        micros, tokens = batching.micro_batches(batch, old, ref, self.cfg.gradient_accumulation_steps)
        global_size = batch.completion_ids.shape[0] * world
        total_tokens = int(self.parallel.sum([tokens])[0])
        global_count = cfg.uses_num_items_in_batch
        sums: Dict[str, float] = {}
        entropy_sum = 0.0
        for i, micro in enumerate(micros):
            share = (micro.rows.stop - micro.rows.start) / global_size
            with self.parallel.sync_gradients(self.policy, last=i == len(micros) - 1):
                out = self.policy(
                    "micro_batch_loss", micro.batch, advantages[micro.rows], micro.old, micro.ref,
                    num_items_in_batch=total_tokens if global_count else None,
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
            self.entropy.update(entropy_sum / max(total_tokens, 1))  # token-weighted, as TRL
            sums["entropy_coef"] = self.entropy.coef
        return sums

    def _applied_entropy_coef(self) -> float:
        """The bonus coefficient of this step (gated on the last entropy under adaptive control)."""
        return self.entropy.applied()

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
        total = reward_total(rewards, weights)
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
    def _save(self) -> Optional[str]:
        """Rank 0 writes the checkpoint (every rank gathers its payload); the others wait until it is in place."""
        payload = trainer_state.payload(self)
        path = checkpoint.save(self.cfg.output_dir, self.step, payload) if payload is not None else None
        self.parallel.barrier()
        self._saved = (self.step, path)
        return path

    def _resume(self) -> bool:
        state = checkpoint.load_latest(self.cfg.output_dir)
        if state is None:
            return False
        trainer_state.restore(self, state)
        self._saved = (self.step, checkpoint.checkpoint_dir(self.cfg.output_dir, self.step))
        return True

    def _stop_requested(self, stop: SignalStop) -> bool:
        """Whether a signal asked the run to stop, on any rank (one all-reduce per step when data-parallel):
        every rank stops after the same step."""
        if self.parallel.enabled:
            signum = int(self.parallel.max([stop.signum or 0])[0])
            if signum:
                stop.request(signum)  # another rank's signal, or this rank's own
        return stop.signum is not None

    def train(self, dataset, resume: bool = False, overwrite: bool = False) -> List[Dict]:
        """Run until max_steps (or stop_at_reward); returns the per-step metrics.

        Writes metrics.jsonl and the checkpoints into `cfg.output_dir` (rank 0), and a final
        checkpoint when the run ends (max_steps or stop_at_reward reached), whatever save_steps
        is, unless `cfg.save_final` is False. With `stop_at_reward` set, a run that ends without
        reaching it warns (RuntimeWarning) and leaves `self.reached_target` False.

        The output directory (see trainer/run_dir.py): one that already holds a run (its log,
        checkpoints) is refused with a `RunExistsError` unless `resume=True` continues from its
        newest intact checkpoint (damaged ones are skipped with a message; `NoCheckpointError`
        when there is none) or `overwrite=True` starts a new run there; the earlier run's files
        are then moved into `<output_dir>/replaced-<date>/` once the new run's first step has
        completed, never deleted. Nothing in the directory changes before the first step has
        completed, and the log is only appended to (or written anew and renamed), so a run that
        fails never truncates an earlier run's files. Calling `train` again on the same trainer
        continues its own run.

        SIGINT (Ctrl-C) or SIGTERM, when `train` runs in the main thread, stops the run after
        the step in progress, writes a checkpoint and raises `TrainingInterrupted` (a
        KeyboardInterrupt); the same signal again stops at once (trainer/stopping.py).
        """
        if len(dataset) == 0 or "prompt" not in dataset[0]:
            raise ValueError("dataset must be a non-empty sequence of dicts with a 'prompt' key")
        if resume and overwrite:
            raise ValueError("train(resume=True, overwrite=True): resume continues the run in output_dir, "
                             "overwrite starts a new one; pass one of them")
        cfg = self.cfg
        main = self.parallel.is_main
        ours = self._run_dir == os.path.abspath(cfg.output_dir)  # this trainer's own run: continue it
        if not (resume or overwrite or ours):
            found = run_dir.run_entries(cfg.output_dir)
            if found:
                raise run_dir.RunExistsError(run_dir.refusal(cfg.output_dir, found))
        if resume and not self._resume():
            raise run_dir.NoCheckpointError(f"resume=True but {cfg.output_dir} holds no intact checkpoint")
        self.model.train()
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.max_steps, initial=self.step, desc="GRPO", disable=not (cfg.progress and main),
                   dynamic_ncols=True)
        # Only rank 0 writes the log (every rank holds the same records).
        log = run_dir.RunLog(cfg.output_dir, set_aside_first=overwrite and not ours, enabled=main)
        interrupted = False
        try:
            with SignalStop(announce=main) as stop, cpu_threads(cfg.num_threads, self.model):
                while self.step < cfg.max_steps and not self.reached_target:
                    if self._stop_requested(stop):
                        interrupted = True
                        break
                    record = self.train_step(dataset)
                    self.history.append(record)
                    log.write(self.history)
                    self._run_dir = os.path.abspath(cfg.output_dir)
                    if self.step % cfg.logging_steps == 0:
                        bar.set_postfix(reward=f"{record['reward']:.3f}", kl=f"{record.get('kl', 0.0):.3f}",
                                        clip=f"{record.get('clip_ratio/region', 0.0):.3f}",
                                        entropy=f"{record.get('entropy', 0.0):.2f}",
                                        tok_s=f"{record['tokens_per_s']:.0f}")
                    bar.update(1)
                    if cfg.save_steps and self.step % cfg.save_steps == 0:
                        self._save()
                # The final checkpoint: at max_steps, at stop_at_reward, or on a signal.
                if self.step > 0 and self._saved[0] != self.step and (cfg.save_final or interrupted):
                    self._save()
        finally:
            log.close()
            bar.close()
        if interrupted:
            saved_step, saved_path = self._saved
            raise TrainingInterrupted(stop.signum, self.step, saved_path if saved_step == self.step else None)
        if cfg.stop_at_reward is not None and not self.reached_target:
            recent = _recent_mean(self.history)
            where = (f"mean reward of the last {RECENT_WINDOW} steps: {recent:.3f}" if recent > -math.inf else
                     f"fewer than the {RECENT_WINDOW} steps the target is averaged over")
            warnings.warn(f"GRPOTrainer: the run ended at step {self.step} without reaching stop_at_reward="
                          f"{cfg.stop_at_reward} ({where}); try more steps, a lower learning rate or an "
                          f"entropy bonus", RuntimeWarning, stacklevel=2)
        return self.history

    @property
    def last_checkpoint(self) -> Optional[str]:
        """The newest checkpoint of this run (written, or resumed from); None when there is none."""
        return self._saved[1]

    @property
    def reached_target(self) -> bool:
        """Whether the mean reward of the last RECENT_WINDOW steps reached stop_at_reward."""
        target = self.cfg.stop_at_reward
        return target is not None and _recent_mean(self.history) >= target


def _recent_mean(history: List[Dict], window: int = RECENT_WINDOW) -> float:
    recent = [h["reward"] for h in history[-window:]]
    return sum(recent) / len(recent) if len(recent) == window else -math.inf


def _lm_head(model):
    """(weight (V, H), bias (V,) or None) of the model's output embedding."""
    head = model.get_output_embeddings()
    return head.weight, getattr(head, "bias", None)

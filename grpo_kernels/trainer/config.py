"""TrainerConfig: everything one GRPO run needs besides the model, tokenizer, rewards and data."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import List, Optional

from ..config import GRPOLossConfig
from ..truncation import Truncation, make_truncation

SCHEDULES = ("constant", "linear", "cosine")


@dataclass
class TrainerConfig:
    """Options of `GRPOTrainer` (names follow TRL's GRPOConfig where it has them).

    prompts_per_step × num_generations completions are sampled per optimizer step (a group
    per prompt). `num_iterations` (μ) reuses each rollout batch for that many optimizer steps
    with importance ratios against the sampling-time policy. The loss options live in `loss`;
    its temperature is set to the sampling temperature, as TRL does, and its truncation to the
    sampler's: `top_k`, `top_p`, `min_p` (0 / 1.0 / 0.0: off) truncate the sampled distribution
    (docs/math.md, "Truncated sampling": min_p, then top_k, then top_p, as vLLM's V1 sampler) and
    the old, reference and policy log-probs are those of the same truncation. `padding_free` ("auto",
    True, False) packs each micro-batch into one row without padding; "auto" packs when
    flash-attn is installed and the model is on CUDA.

    Adaptive entropy (TRL's rule): with `use_adaptive_entropy`, `loss.entropy_coef` is the initial
    coefficient; after each optimizer step it moves by `entropy_coef_delta` towards more bonus when
    the step's mean entropy is <= `entropy_target` and towards less otherwise, within
    [entropy_coef_min, entropy_coef_max], and the bonus applies only while the last measured
    entropy is <= entropy_target.

    `num_threads` ("auto" or a positive int) is the number of CPU threads while training on the
    CPU: "auto" takes 1 for models under `threads.SINGLE_THREAD_MAX_PARAMS` parameters (their
    operations are too small to gain from threads, and on a busy machine the threads wait on
    each other), and leaves torch's setting otherwise. See `grpo_kernels.trainer.threads`.

    Outputs: `train()` writes metrics.jsonl and checkpoints into `output_dir` (refusing one that
    already holds a run unless told to resume or overwrite it: see `GRPOTrainer.train`), a
    checkpoint every `save_steps` steps (0: none along the way) and, with `save_final` (the
    default), one when the run ends or is stopped by SIGINT/SIGTERM. `stop_at_reward` (None or a
    finite number) ends the run once the mean reward of the last 5 steps reaches it.

    `data_parallel` ("fsdp2" or "ddp") is how several processes (torchrun) train together; it
    has no effect in one process. See `grpo_kernels.trainer.parallel`.
    """

    prompts_per_step: int = 16
    num_generations: int = 8
    max_new_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    learning_rate: float = 1e-5
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    weight_decay: float = 0.0
    adam_betas: tuple = (0.9, 0.99)
    max_steps: int = 100
    num_iterations: int = 1
    gradient_accumulation_steps: int = 1
    max_grad_norm: Optional[float] = 1.0
    reward_weights: Optional[List[float]] = None
    scale_rewards: str = "group"
    mask_truncated_completions: bool = False
    loss: GRPOLossConfig = field(default_factory=GRPOLossConfig)
    backend: str = "auto"
    padding_free: object = "auto"
    seed: int = 0
    output_dir: str = "runs/grpo"
    logging_steps: int = 1
    save_steps: int = 0
    save_final: bool = True
    progress: bool = True
    stop_at_reward: Optional[float] = None
    use_adaptive_entropy: bool = False
    entropy_target: float = 0.2
    entropy_coef_min: float = 0.0
    entropy_coef_max: float = 1.0
    entropy_coef_delta: float = 0.005
    num_threads: object = "auto"
    data_parallel: str = "fsdp2"

    def __post_init__(self):
        positive = ("prompts_per_step", "num_generations", "max_new_tokens", "max_steps", "num_iterations",
                    "gradient_accumulation_steps", "logging_steps")
        for name in positive:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"TrainerConfig.{name} must be a positive int, got {value!r}")
        if self.num_generations < 2:
            raise ValueError("TrainerConfig.num_generations must be >= 2: GRPO compares completions within a group")
        batch = self.prompts_per_step * self.num_generations
        if batch % self.gradient_accumulation_steps:
            raise ValueError(f"TrainerConfig.gradient_accumulation_steps={self.gradient_accumulation_steps} must "
                             f"divide prompts_per_step * num_generations = {batch}")
        if not self.temperature > 0:
            raise ValueError(f"TrainerConfig.temperature must be > 0, got {self.temperature}")
        try:
            make_truncation(self.top_k, self.top_p, self.min_p)
        except ValueError as error:
            raise ValueError(f"TrainerConfig.{error}") from None
        if not self.learning_rate > 0:
            raise ValueError(f"TrainerConfig.learning_rate must be > 0, got {self.learning_rate}")
        if self.padding_free not in ("auto", True, False):
            raise ValueError(f"TrainerConfig.padding_free must be 'auto', True or False, got {self.padding_free!r}")
        if self.lr_schedule not in SCHEDULES:
            raise ValueError(f"TrainerConfig.lr_schedule={self.lr_schedule!r} is not one of {list(SCHEDULES)}")
        if self.save_steps < 0 or self.warmup_steps < 0:
            raise ValueError("TrainerConfig.save_steps and warmup_steps must be >= 0")
        if self.stop_at_reward is not None and not math.isfinite(self.stop_at_reward):
            raise ValueError(f"TrainerConfig.stop_at_reward must be a finite number or None, got {self.stop_at_reward}")
        if not isinstance(self.loss, GRPOLossConfig):
            raise TypeError(f"TrainerConfig.loss must be a GRPOLossConfig, got {type(self.loss).__name__}")
        if not 0 <= self.entropy_coef_min <= self.entropy_coef_max:
            raise ValueError(f"TrainerConfig needs 0 <= entropy_coef_min <= entropy_coef_max, got "
                             f"{self.entropy_coef_min} and {self.entropy_coef_max}")
        if not self.entropy_coef_delta >= 0:
            raise ValueError(f"TrainerConfig.entropy_coef_delta must be >= 0, got {self.entropy_coef_delta}")
        if self.num_threads != "auto" and (isinstance(self.num_threads, bool) or not isinstance(self.num_threads, int)
                                           or self.num_threads < 1):
            raise ValueError(f"TrainerConfig.num_threads must be 'auto' or a positive int, got {self.num_threads!r}")
        if self.data_parallel not in ("fsdp2", "ddp"):
            raise ValueError(f"TrainerConfig.data_parallel must be 'fsdp2' or 'ddp', got {self.data_parallel!r}")
        if self.loss.temperature != self.temperature:
            self.loss = self.loss.replace(temperature=self.temperature)
        sampler = self.truncation
        loss_truncation = self.loss.truncation
        if loss_truncation.active and loss_truncation != sampler:
            raise ValueError(f"TrainerConfig.loss truncates with {loss_truncation} but the sampler with {sampler}: set "
                             "top_k/top_p/min_p on TrainerConfig (the loss takes the sampler's)")
        if loss_truncation != sampler:
            self.loss = self.loss.replace(**sampler._asdict())

    @property
    def truncation(self) -> Truncation:
        """The sampler's truncation, which the log-probs and the loss use too."""
        return make_truncation(self.top_k, self.top_p, self.min_p)

    def to_dict(self):
        data = dataclasses.asdict(self)
        data["loss"] = dataclasses.asdict(self.loss)
        return data

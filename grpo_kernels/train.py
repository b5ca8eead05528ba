"""The main job: `python -m grpo_kernels.train` trains a tiny LM with GRPO on a toy task.

Everything is built in code (model, tokenizer, data), so nothing is downloaded. By default a
randomly initialised 88k-parameter Llama learns the "next_char" task (prompt "k>", answer "l",
then end-of-sequence; 36 symbols) from a random policy (mean reward ~0.001: it must emit the
right symbol and then EOS among 47 tokens) to a mean reward of at least 0.9, printing the reward
curve and writing it to <output_dir>/reward_curve.png. On a 2-core CPU this takes about 10 s.
`--model PATH` trains any local HF causal LM (with its tokenizer) on the same task instead.

Data-parallel on several processes: `torchrun --nproc_per_node=2 -m grpo_kernels.train` (gloo
on CPU, NCCL with one GPU per process); --prompts-per-step must be divisible by the number of
processes. Rank 0 prints and writes the outputs.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

from .config import LOSS_TYPE_PRESETS, GRPOLossConfig
from .ops.dispatch import BACKENDS
from .trainer import GRPOTrainer, TrainerConfig
from .trainer import toy
from .trainer.curves import reward_png, text_curve
from .trainer.parallel import init_from_environment


def _threads(value: str):
    if value == "auto":
        return value
    try:
        count = int(value)
    except ValueError:
        count = 0
    if count < 1:
        raise argparse.ArgumentTypeError(f"must be 'auto' or a positive integer, got {value!r}")
    return count


def _target(value: str):
    if value.lower() == "none":
        return None
    try:
        return float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number or 'none', got {value!r}") from None


def parse_args(argv=None):
    loss_defaults, trainer_defaults = GRPOLossConfig(), TrainerConfig()
    p = argparse.ArgumentParser(prog="python -m grpo_kernels.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", choices=sorted(toy.TASKS), default="next_char",
                   help="the toy task (default: %(default)s; 'addition' is much harder to learn from scratch)")
    p.add_argument("--model", default=None, help="a local HF causal LM directory (default: a tiny model built in code)")
    p.add_argument("--loss-type", choices=sorted(LOSS_TYPE_PRESETS), default=loss_defaults.loss_type,
                   help="GRPOLossConfig.loss_type (default: %(default)s, as the library and TRL)")
    p.add_argument("--beta", type=float, default=loss_defaults.beta,
                   help="KL penalty coefficient; > 0 keeps a frozen reference model (default: %(default)s)")
    p.add_argument("--steps", type=int, default=1500, help="maximum optimizer steps (default: %(default)s)")
    p.add_argument("--prompts-per-step", type=int, default=trainer_defaults.prompts_per_step,
                   help="prompts sampled per step (default: %(default)s)")
    p.add_argument("--num-generations", type=int, default=trainer_defaults.num_generations,
                   help="completions per prompt, the GRPO group size, >= 2 (default: %(default)s)")
    p.add_argument("--max-new-tokens", type=int, default=2,
                   help="completion length limit (default: %(default)s: the answer and end-of-sequence)")
    p.add_argument("--lr", type=float, default=1e-3,
                   help="AdamW learning rate (default: %(default)s for the tiny model; TrainerConfig's 1e-05 suits "
                        "pretrained LLMs)")
    p.add_argument("--num-iterations", type=int, default=trainer_defaults.num_iterations,
                   help="optimizer steps per rollout batch, TRL's mu (default: %(default)s)")
    p.add_argument("--target-reward", type=_target, default=0.9,
                   help="stop once the mean reward of the last 5 steps reaches it; the job exits with status 1 "
                        "when it is not reached; 'none' runs all --steps (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the model, the data and the sampler (default: %(default)s)")
    p.add_argument("--output-dir", default="runs/toy",
                   help="metrics.jsonl, reward_curve.png and checkpoints go here (default: %(default)s)")
    p.add_argument("--save-steps", type=int, default=100,
                   help="write a checkpoint every this many steps; 0 = never (default: %(default)s)")
    p.add_argument("--resume", action="store_true", help="continue from the newest intact checkpoint in --output-dir")
    p.add_argument("--backend", choices=BACKENDS, default=trainer_defaults.backend,
                   help="kernel backend of the loss and log-probs (default: %(default)s: the fastest built one)")
    p.add_argument("--data-parallel", choices=["fsdp2", "ddp"], default=trainer_defaults.data_parallel,
                   help="how several processes (torchrun) train together: FSDP2 shards parameters, gradients and "
                        "optimizer states, DDP keeps a whole model per process (default: %(default)s)")
    p.add_argument("--threads", type=_threads, default=trainer_defaults.num_threads,
                   help="CPU threads: 'auto' (1 for models under 8M parameters, which the tiny model is; "
                        "torch's default above) or a count (default: %(default)s)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    distributed = init_from_environment()
    try:
        return _train(args)
    finally:
        if distributed:
            torch.distributed.destroy_process_group()


def _train(args) -> int:
    torch.manual_seed(args.seed)
    device = f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu"
    if args.model:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.model, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(args.model, local_files_only=True)
    else:
        tokenizer = toy.char_tokenizer()
        model = toy.tiny_causal_lm(len(tokenizer), seed=args.seed)
    model.to(device)
    cfg = TrainerConfig(
        prompts_per_step=args.prompts_per_step, num_generations=args.num_generations,
        max_new_tokens=args.max_new_tokens, learning_rate=args.lr, max_steps=args.steps,
        num_iterations=args.num_iterations, loss=GRPOLossConfig(loss_type=args.loss_type, beta=args.beta),
        seed=args.seed, output_dir=args.output_dir, save_steps=args.save_steps, backend=args.backend,
        stop_at_reward=args.target_reward, num_threads=args.threads, data_parallel=args.data_parallel)
    dataset = toy.TASKS[args.task](seed=args.seed)
    trainer = GRPOTrainer(model, tokenizer, [toy.exact_answer_reward], cfg)
    start = time.perf_counter()
    history = trainer.train(dataset, resume=args.resume)
    elapsed = time.perf_counter() - start
    if not trainer.parallel.is_main:
        return 0 if args.target_reward is None or trainer.reached_target else 1
    print(text_curve(history))
    png = reward_png(history, os.path.join(args.output_dir, "reward_curve.png"),
                     title=f"GRPO on '{args.task}' ({sum(p.numel() for p in model.parameters()):,} parameters)")
    final = sum(h["reward"] for h in history[-5:]) / min(5, len(history))  # the trainer's stop window
    summary = {"task": args.task, "steps": history[-1]["step"], "seconds": round(elapsed, 1),
               "first_reward": history[0]["reward"], "final_reward_mean5": final, "png": png,
               "metrics": os.path.join(args.output_dir, "metrics.jsonl"), "processes": trainer.parallel.world}
    print(json.dumps(summary))
    if args.target_reward is not None and not trainer.reached_target:
        print(f"FAILED: the mean reward of the last 5 steps is {final:.3f}, below --target-reward "
              f"{args.target_reward}, after {args.steps} steps", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

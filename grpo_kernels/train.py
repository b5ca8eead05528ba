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

Nothing is lost: the run goes into --output-dir (metrics.jsonl, reward_curve.png, checkpoint-<step>/
every --save-steps steps and always at the end). A directory that already holds a run is refused:
--resume continues it, --overwrite starts a new one there and moves the earlier run into
<output-dir>/replaced-<date>/ once the new run's first step has completed (nothing is deleted; a
run that fails before that leaves the directory as it was). Ctrl-C (or SIGTERM) stops after the
current step, writes a checkpoint and prints the command that resumes (exit status 130; 143 for
SIGTERM). Invalid values are refused before anything is built (exit status 2).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
import time
import traceback
from typing import NoReturn

import torch

from .config import LOSS_TYPE_PRESETS, GRPOLossConfig
from .ops.dispatch import BACKENDS, why_unavailable
from .trainer import GRPOTrainer, NoCheckpointError, RunExistsError, TrainerConfig, TrainingInterrupted
from .trainer import checkpoint, run_dir, toy
from .trainer.curves import MATPLOTLIB_MISSING, reward_png, text_curve
from .trainer.parallel import end_worker_process, init_from_environment, launched_by_torchrun, torchrun_world_size
from .trainer.stopping import signal_name

PROG = "python -m grpo_kernels.train"


class _Parser(argparse.ArgumentParser):
    """argparse's errors in one line (`prog: error: argument --steps: ...`, exit status 2),
    without the usage block, which for this many options fills a screen."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def _int(low: int):
    """An argparse type: an integer >= low."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < low:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}, got {text!r}")
        return value
    return parse


def _float(low: float, *, open_low: bool = False, high: float = math.inf):
    """An argparse type: a finite number >= low (> low with open_low), <= high."""
    bound = f"> {low:g}" if open_low else f">= {low:g}"
    allowed = f"a finite number {bound}" + (f" and <= {high:g}" if high < math.inf else "")

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not (math.isfinite(value) and (value > low if open_low else value >= low) and value <= high):
            raise argparse.ArgumentTypeError(f"must be {allowed}, got {text!r}")
        return value
    return parse


def _threads(value: str):
    if value == "auto":
        return value
    try:
        count = int(value)
    except ValueError:
        count = 0
    if count < 1:
        raise argparse.ArgumentTypeError(f"must be 'auto' or an integer >= 1, got {value!r}")
    return count


def _target(value: str):
    if value.lower() == "none":
        return None
    try:
        target = float(value)
    except ValueError:
        target = math.nan
    if not 0.0 <= target <= 1.0:  # also refuses nan and inf
        raise argparse.ArgumentTypeError(f"must be a number in [0, 1] (each completion's reward is 0 or 1) or "
                                         f"'none', got {value!r}")
    return target


def _model_dir(value: str) -> str:
    if not os.path.isdir(value):
        raise argparse.ArgumentTypeError(f"must be a local model directory, and {value!r} is not a directory")
    return value


def build_parser() -> argparse.ArgumentParser:
    loss_defaults, trainer_defaults = GRPOLossConfig(), TrainerConfig()
    p = _Parser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", choices=sorted(toy.TASKS), default="next_char",
                   help="the toy task (default: %(default)s; 'addition' is much harder to learn from scratch)")
    p.add_argument("--model", type=_model_dir, default=None,
                   help="a local HF causal LM directory (default: a tiny model built in code)")
    p.add_argument("--loss-type", choices=sorted(LOSS_TYPE_PRESETS), default=loss_defaults.loss_type,
                   help="GRPOLossConfig.loss_type (default: %(default)s, as the library and TRL)")
    p.add_argument("--beta", type=_float(0.0), default=loss_defaults.beta,
                   help="KL penalty coefficient, >= 0; > 0 keeps a frozen reference model (default: %(default)s)")
    p.add_argument("--steps", type=_int(1), default=1500, help="maximum optimizer steps, >= 1 (default: %(default)s)")
    p.add_argument("--prompts-per-step", type=_int(1), default=trainer_defaults.prompts_per_step,
                   help="prompts sampled per step, >= 1 (default: %(default)s)")
    p.add_argument("--num-generations", type=_int(2), default=trainer_defaults.num_generations,
                   help="completions per prompt, the GRPO group size, >= 2 (default: %(default)s)")
    p.add_argument("--max-new-tokens", type=_int(1), default=2,
                   help="completion length limit, >= 1 (default: %(default)s: the answer and end-of-sequence)")
    p.add_argument("--lr", type=_float(0.0, open_low=True), default=1e-3,
                   help="AdamW learning rate, > 0 (default: %(default)s for the tiny model; TrainerConfig's 1e-05 "
                        "suits pretrained LLMs)")
    p.add_argument("--num-iterations", type=_int(1), default=trainer_defaults.num_iterations,
                   help="optimizer steps per rollout batch, TRL's mu, >= 1 (default: %(default)s)")
    p.add_argument("--top-k", type=_int(0), default=trainer_defaults.top_k,
                   help="sample from the k most likely tokens, >= 0 (0 = off); the log-probs of the loss use the "
                        "same truncation (default: %(default)s)")
    p.add_argument("--top-p", type=_float(0.0, open_low=True, high=1.0), default=trainer_defaults.top_p,
                   help="sample from the smallest top set holding probability mass > 1 - top-p, in (0, 1] (1 = "
                        "off); the log-probs of the loss use the same truncation (default: %(default)s)")
    p.add_argument("--min-p", type=_float(0.0, high=1.0), default=trainer_defaults.min_p,
                   help="drop tokens less likely than min-p times the most likely one, in [0, 1] (0 = off); applied "
                        "before --top-k and --top-p, as vLLM; the log-probs use it too (default: %(default)s)")
    p.add_argument("--target-reward", type=_target, default=0.9,
                   help="stop once the mean reward of the last 5 steps reaches it (a number in [0, 1]); the job "
                        "exits with status 1 when it is not reached; 'none' runs all --steps (default: %(default)s)")
    p.add_argument("--seed", type=_int(0), default=0,
                   help="seed of the model, the data and the sampler, >= 0 (default: %(default)s)")
    p.add_argument("--output-dir", default="runs/toy",
                   help="metrics.jsonl, reward_curve.png and checkpoints go here; a directory that already holds "
                        "a run is refused unless --resume or --overwrite is given (default: %(default)s)")
    p.add_argument("--save-steps", type=_int(0), default=100,
                   help="also write a checkpoint every this many steps, >= 0; a final one is always written when "
                        "the run ends or is stopped (Ctrl-C, SIGTERM); 0 = only that one (default: %(default)s)")
    again = p.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true",
                       help="continue the run in --output-dir from its newest intact checkpoint")
    again.add_argument("--overwrite", action="store_true",
                       help="start a new run in an --output-dir that holds one; nothing is deleted: once the new "
                            "run's first step has completed, the earlier run's files are moved into "
                            "<output-dir>/replaced-<date>/ (a run that fails before that leaves them untouched; "
                            "delete that folder when you no longer need it)")
    p.add_argument("--backend", choices=BACKENDS, default=trainer_defaults.backend,
                   help="kernel backend of the loss and log-probs (default: %(default)s: the fastest built one)")
    p.add_argument("--data-parallel", choices=["fsdp2", "ddp"], default=trainer_defaults.data_parallel,
                   help="how several processes (torchrun) train together: FSDP2 shards parameters, gradients and "
                        "optimizer states, DDP keeps a whole model per process (default: %(default)s)")
    p.add_argument("--threads", type=_threads, default=trainer_defaults.num_threads,
                   help="CPU threads: 'auto' (1 for models under 8M parameters, which the tiny model is; "
                        "torch's default above) or a count (default: %(default)s)")
    return p


def _device() -> torch.device:
    return torch.device(f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu")


def check_args(parser: argparse.ArgumentParser, args) -> None:
    """What the values need from this machine and --output-dir, checked before anything is built
    (parser.error: one line, exit status 2)."""
    world = torchrun_world_size()
    if args.prompts_per_step % world:
        parser.error(f"argument --prompts-per-step: must be divisible by the number of processes ({world}), "
                     f"got {args.prompts_per_step}")
    if args.backend != "auto":
        reason = why_unavailable(args.backend, _device())
        if reason is not None:
            parser.error(f"argument --backend: {args.backend!r} cannot run on this machine: {reason}")
    out = args.output_dir
    if os.path.exists(out) and not os.path.isdir(out):
        parser.error(f"argument --output-dir: {out!r} exists and is not a directory")
    if args.resume:
        if not checkpoint.checkpoints(out):
            parser.error(f"argument --resume: {out} holds no checkpoint to resume from (leave out --resume to "
                         f"start a new run there)")
    elif not args.overwrite:
        found = run_dir.run_entries(out)
        if found:
            parser.error(run_dir.refusal(out, found, resume="--resume", overwrite="--overwrite"))


def parse_args(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    check_args(parser, args)
    return args


def resume_command(args, world: int = 1) -> str:
    """The command line that continues this run: its options (those not at their default, and
    --output-dir) with --resume."""
    parts = ["python", "-m", "grpo_kernels.train"]
    if world > 1:
        parts = ["torchrun", f"--nproc_per_node={world}", "-m", "grpo_kernels.train"]
    for action in build_parser()._actions:
        if not action.option_strings or action.dest in ("help", "resume", "overwrite"):
            continue
        value = getattr(args, action.dest)
        if value == action.default and action.dest != "output_dir":
            continue
        parts += [action.option_strings[0], "none" if value is None else str(value)]
    return shlex.join(parts + ["--resume"])


def main(argv=None) -> int:
    args = parse_args(argv)  # every value checked here: exit status 2 before anything is built
    try:
        distributed = init_from_environment()
        try:
            return _train(args)
        finally:
            if distributed:
                torch.distributed.destroy_process_group()
    except KeyboardInterrupt:  # before training started, or a second Ctrl-C (the trainer's own is handled below)
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


def _train(args) -> int:
    torch.manual_seed(args.seed)
    device = _device()
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
        top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
        num_iterations=args.num_iterations, loss=GRPOLossConfig(loss_type=args.loss_type, beta=args.beta),
        seed=args.seed, output_dir=args.output_dir, save_steps=args.save_steps, backend=args.backend,
        stop_at_reward=args.target_reward, num_threads=args.threads, data_parallel=args.data_parallel)
    dataset = toy.TASKS[args.task](seed=args.seed)
    trainer = GRPOTrainer(model, tokenizer, [toy.exact_answer_reward], cfg)
    start = time.perf_counter()
    try:
        history = trainer.train(dataset, resume=args.resume, overwrite=args.overwrite)
    except TrainingInterrupted as stop:
        if trainer.parallel.is_main:
            _report_stop(args, stop, trainer.parallel.world)
        return 128 + stop.signum
    except KeyboardInterrupt:  # Ctrl-C twice: stopped at once, the steps after the last checkpoint are lost
        if trainer.parallel.is_main:
            if trainer.last_checkpoint is None:
                print(f"{PROG}: stopped at once at step {trainer.step}: no checkpoint of this run was written",
                      file=sys.stderr)
            else:
                print(f"{PROG}: stopped at once at step {trainer.step}; the newest checkpoint is "
                      f"{trainer.last_checkpoint}", file=sys.stderr)
                print(f"resume with: {resume_command(args, trainer.parallel.world)}", file=sys.stderr)
        return 130
    except NoCheckpointError:  # check_args saw checkpoints, all of them damaged (each reported above)
        print(f"{PROG}: error: argument --resume: {args.output_dir} holds no intact checkpoint to resume from",
              file=sys.stderr)
        return 2
    except RunExistsError:  # a run appeared there after check_args
        found = run_dir.run_entries(args.output_dir)
        print(f"{PROG}: error: {run_dir.refusal(args.output_dir, found, '--resume', '--overwrite')}", file=sys.stderr)
        return 2
    elapsed = time.perf_counter() - start
    if not trainer.parallel.is_main:
        return 0 if args.target_reward is None or trainer.reached_target else 1
    print(text_curve(history))
    png = reward_png(history, os.path.join(args.output_dir, "reward_curve.png"),
                     title=f"GRPO on '{args.task}' ({sum(p.numel() for p in model.parameters()):,} parameters)")
    if png is None:
        print(f"{PROG}: reward_curve.png skipped: {MATPLOTLIB_MISSING}", file=sys.stderr)
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


def _report_stop(args, stop: TrainingInterrupted, world: int) -> None:
    """One or two lines: where the stopped run is, and the command that continues it."""
    name = signal_name(stop.signum)
    if stop.checkpoint is not None:
        print(f"{PROG}: stopped by {name} at step {stop.step}; checkpoint {stop.checkpoint}", file=sys.stderr)
    elif args.resume:
        print(f"{PROG}: stopped by {name} before a step completed; the run is still at step {stop.step}",
              file=sys.stderr)
    else:
        untouched = f" ({args.output_dir} is as it was)" if args.overwrite else ""
        print(f"{PROG}: stopped by {name} before the first step completed: nothing was written{untouched}",
              file=sys.stderr)
        return
    print(f"resume with: {resume_command(args, world)}", file=sys.stderr)


def cli() -> NoReturn:
    """The command line (`python -m grpo_kernels.train`, `grpo-kernels-train`): main(), then its
    exit status. A torchrun worker ends through `end_worker_process` once main() has destroyed
    its process group: finalizing the interpreter there can abort it (see that function). An
    error there is printed with its traceback and ends the worker with status 1, not SIGABRT."""
    if not launched_by_torchrun():
        raise SystemExit(main())
    try:
        code = main()
    except SystemExit:  # argparse's refusals (status 2), before any process group exists
        raise
    except BaseException:
        traceback.print_exc()
        code = 1
    end_worker_process(code)


if __name__ == "__main__":
    cli()

"""Data-parallel training: the same batch split over ranks gives the update of one rank holding
all of it, and `torchrun -m grpo_kernels.train` trains, checkpoints and resumes on 2 processes."""
import json
import os
import subprocess
import sys

import pytest
import torch

from distributed import run_ranks
from grpo_kernels import GRPOLossConfig
from grpo_kernels.trainer import GRPOTrainer, TrainerConfig, toy
from grpo_kernels.trainer.rollout import Rollout

PROMPTS, GENERATIONS = 4, 4


# (loss type, padding-free): token-mean with the global token count (dapo), a mean over
# sequences (grpo), a constant normaliser (dr_grpo); padded and packed batches.
SPLIT_CASES = [("dapo", False), ("dapo", True), ("grpo", False), ("dr_grpo", True)]


def split_update_worker(rank, world, accumulation, strategy):
    """For each case, one optimizer step on this rank's share of a fixed batch: the step's
    parameter change and metrics. SGD with lr 1, so the change is exactly −(the gradient):
    AdamW's first step would hide a wrongly scaled gradient."""
    return [_split_update(loss_type, padding_free, accumulation, strategy) for loss_type, padding_free in SPLIT_CASES]


def _whole(p):
    """A parameter's full value (FSDP2 holds a DTensor shard)."""
    p = p.detach()
    return p.full_tensor() if hasattr(p, "full_tensor") else p


def _split_update(loss_type, padding_free, accumulation, strategy):
    tokenizer = toy.char_tokenizer()
    model = toy.tiny_causal_lm(len(tokenizer), seed=0)
    cfg = TrainerConfig(prompts_per_step=PROMPTS, num_generations=GENERATIONS, max_new_tokens=3, max_grad_norm=None,
                        loss=GRPOLossConfig(loss_type=loss_type, max_completion_length=3), padding_free=padding_free,
                        progress=False, gradient_accumulation_steps=accumulation, backend="torch",
                        data_parallel=strategy)
    trainer = GRPOTrainer(model, tokenizer, [toy.exact_answer_reward], cfg)
    trainer.optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    trainer.scheduler = torch.optim.lr_scheduler.LambdaLR(trainer.optimizer, lambda step: 1.0)
    torch.manual_seed(123)  # the same whole batch in every process; each rank keeps its share
    data = toy.next_char_dataset(size=PROMPTS, seed=1)
    with torch.no_grad():
        whole = trainer.policy("_sample", [r["prompt"] for r in data])
    rewards = torch.rand(PROMPTS * GENERATIONS, 1, generator=torch.Generator().manual_seed(5))
    advantages = trainer._advantages(rewards).advantages
    mine = trainer.parallel.share(PROMPTS * GENERATIONS, "completions")
    part = Rollout(whole.prompts[mine], whole.prompt_ids[mine], whole.prompt_mask[mine], whole.completion_ids[mine],
                   whole.completion_mask[mine], whole.sampling_logps[mine], whole.texts[mine], whole.truncated[mine])
    before = [_whole(p).clone() for p in model.parameters()]
    metrics = trainer._optimize(part, advantages[mine], None, None)
    change = torch.cat([(_whole(p) - b).reshape(-1) for p, b in zip(model.parameters(), before)])
    return change.double().tolist(), metrics  # plain lists: tensors would outlive the process's shared memory


@pytest.mark.parametrize("strategy", ["fsdp2", "ddp"])
def test_split_batch_gives_the_single_process_update(strategy):
    """1 rank with 2 accumulation micro-batches against 2 ranks with one each (FSDP2 shards the
    parameters, gradients and optimizer state; DDP keeps whole copies)."""
    (single,) = run_ranks(1, split_update_worker, 2, strategy)
    per_rank = run_ranks(2, split_update_worker, 1, strategy)
    for k, case in enumerate(SPLIT_CASES):
        one, one_metrics = torch.tensor(single[k][0]), single[k][1]
        assert float(one.abs().max()) > 0
        for rank, results in enumerate(per_rank):
            change, metrics = results[k]
            torch.testing.assert_close(torch.tensor(change), one, rtol=1e-5, atol=1e-7,
                                       msg=lambda m: f"{case}, rank {rank}: {m}")
            for key in ("loss", "entropy", "clip_ratio/region_mean"):
                if key in one_metrics:
                    assert metrics[key] == pytest.approx(one_metrics[key], rel=1e-5, abs=1e-7), (case, key)


def test_end_worker_process_flushes_and_exits_with_the_code():
    """A torchrun worker ends with os._exit (trainer/parallel.py says why): what it printed to the
    block-buffered pipes, without a newline, still arrives, and the exit status is the one given."""
    code = ("import sys; from grpo_kernels.trainer.parallel import end_worker_process; "
            "print('summary', end=''); print('warning', end='', file=sys.stderr); end_worker_process(3); "
            "print('never')")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # buffered, as torchrun's pipes are
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert (done.returncode, done.stdout, done.stderr) == (3, "summary", "warning")


def _torchrun(tmp_path, *args):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "grpo_kernels.train", "--output-dir", str(tmp_path), *args]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)


def _rewards(path):
    with open(path) as f:
        return [json.loads(line)["reward"] for line in f]


def test_torchrun_worker_error_ends_with_status_1_and_its_traceback(tmp_path):
    """An error inside a torchrun worker (here: --model names an empty directory, which loads no
    tokenizer) is printed with its traceback and ends each worker with status 1."""
    (tmp_path / "empty_model").mkdir()
    run = _torchrun(tmp_path / "out", "--model", str(tmp_path / "empty_model"))
    assert run.returncode != 0
    assert run.stderr.count("Traceback") >= 3, run.stderr[-3000:]  # each worker's, then torchrun's
    assert "exitcode  : 1 " in run.stderr and "SIGABRT" not in run.stderr, run.stderr[-3000:]


def test_torchrun_trains_checkpoints_and_resumes(tmp_path):
    straight = _torchrun(tmp_path / "straight", "--steps", "5", "--target-reward", "0")
    assert straight.returncode == 0, straight.stderr[-3000:]
    summary = json.loads(straight.stdout.strip().splitlines()[-1])
    assert summary["processes"] == 2 and summary["steps"] == 5

    first = _torchrun(tmp_path / "resumed", "--steps", "2", "--save-steps", "2", "--target-reward", "none")
    second = _torchrun(tmp_path / "resumed", "--steps", "5", "--save-steps", "2", "--target-reward", "0", "--resume")
    for run in (first, second):
        assert run.returncode == 0, run.stderr[-3000:]
    # Every rank's RNG is restored: the resumed run continues exactly as the uninterrupted one.
    assert _rewards(tmp_path / "resumed" / "metrics.jsonl") == _rewards(tmp_path / "straight" / "metrics.jsonl")

    single = subprocess.run([sys.executable, "-m", "grpo_kernels.train", "--output-dir", str(tmp_path / "resumed"),
                             "--steps", "6", "--resume"], capture_output=True, text=True, timeout=300)
    assert single.returncode != 0 and "written by 2 process(es)" in single.stderr

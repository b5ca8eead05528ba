"""The main job's command line (`python -m grpo_kernels.train`): every bad value is refused by the
parser in one line (exit 2) before anything is built; a directory that holds a run is refused
unless --resume or --overwrite; a run that fails leaves the earlier run's files byte for byte;
the final checkpoint is written; SIGTERM writes a checkpoint and prints the resume command; a
missing matplotlib is said in one line. (SIGINT to a running process, and SIGKILL:
tests/test_checkpoint_crash.py.)"""
import json
import pathlib
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
from helpers import snapshot, subprocess_env

from grpo_kernels import train
from grpo_kernels.trainer import checkpoint, trainer as trainer_module

PROG = "python -m grpo_kernels.train: error: "
# A run of a few tenths of a second: 3 steps, checkpoints at 2 and (the final one) 3.
SMALL = ["--steps", "3", "--save-steps", "2", "--prompts-per-step", "2", "--num-generations", "2",
         "--target-reward", "none", "--backend", "torch", "--threads", "1"]


@pytest.fixture
def nothing_built(monkeypatch):
    """Building the model or the trainer fails the test."""
    def built(*args, **kwargs):
        raise AssertionError("the model or trainer was built before the values were checked")

    monkeypatch.setattr(train.toy, "tiny_causal_lm", built)
    monkeypatch.setattr(train, "GRPOTrainer", built)


def refused(argv, capsys):
    """The one line main(argv) exits 2 with."""
    start = time.perf_counter()
    with pytest.raises(SystemExit) as exit_info:
        train.main(argv)
    assert time.perf_counter() - start < 2.0, "the check is not fast"
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert captured.out == "" and len(lines) == 1, captured.err
    assert lines[0].startswith(PROG), lines[0]
    return lines[0][len(PROG):]


BAD_VALUES = [
    (["--steps", "-1"], "argument --steps: must be an integer >= 1, got '-1'"),
    (["--steps", "0"], "argument --steps: must be an integer >= 1, got '0'"),
    (["--steps", "1.5"], "argument --steps: must be an integer >= 1"),
    (["--num-generations", "1"], "argument --num-generations: must be an integer >= 2"),
    (["--prompts-per-step", "0"], "argument --prompts-per-step: must be an integer >= 1"),
    (["--lr", "-1"], "argument --lr: must be a finite number > 0"),
    (["--lr", "0"], "argument --lr: must be a finite number > 0"),
    (["--lr", "nan"], "argument --lr: must be a finite number > 0"),
    (["--lr", "inf"], "argument --lr: must be a finite number > 0"),
    (["--save-steps", "-5"], "argument --save-steps: must be an integer >= 0"),
    (["--max-new-tokens", "0"], "argument --max-new-tokens: must be an integer >= 1"),
    (["--num-iterations", "0"], "argument --num-iterations: must be an integer >= 1"),
    (["--target-reward", "nan"], "argument --target-reward: must be a number in [0, 1]"),
    (["--target-reward", "inf"], "argument --target-reward: must be a number in [0, 1]"),
    (["--target-reward", "1.5"], "argument --target-reward: must be a number in [0, 1]"),
    (["--beta", "-0.1"], "argument --beta: must be a finite number >= 0"),
    (["--beta", "nan"], "argument --beta: must be a finite number >= 0"),
    (["--seed", "-1"], "argument --seed: must be an integer >= 0"),
    (["--top-k", "-1"], "argument --top-k: must be an integer >= 0"),
    (["--top-p", "0"], "argument --top-p: must be a finite number > 0 and <= 1"),
    (["--top-p", "1.2"], "argument --top-p: must be a finite number > 0 and <= 1"),
    (["--min-p", "-0.1"], "argument --min-p: must be a finite number >= 0 and <= 1"),
    (["--threads", "0"], "argument --threads: must be 'auto' or an integer >= 1"),
    (["--task", "chess"], "argument --task: invalid choice: 'chess'"),
    (["--model", "no/such/model"], "argument --model: must be a local model directory"),
    (["--resume", "--overwrite"], "argument --overwrite: not allowed with argument --resume"),
    (["--resume"], "argument --resume: "),  # an empty --output-dir: no checkpoint
]


@pytest.mark.parametrize("bad, message", BAD_VALUES, ids=[" ".join(bad) for bad, _ in BAD_VALUES])
def test_bad_value_is_refused_in_one_line_before_anything_is_built(tmp_path, capsys, nothing_built, bad, message):
    out = tmp_path / "out"
    assert refused(["--output-dir", str(out), *bad], capsys).startswith(message)
    assert not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="the cuda backend can run here")
def test_unavailable_backend_is_refused_before_the_model_is_built(tmp_path, capsys, nothing_built):
    out = tmp_path / "out"
    line = refused(["--backend", "cuda", "--output-dir", str(out)], capsys)
    assert line == "argument --backend: 'cuda' cannot run on this machine: it runs on cuda tensors, got cpu tensors"
    assert not out.exists()


def test_prompts_per_step_must_divide_among_the_processes(tmp_path, capsys, nothing_built, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    line = refused(["--prompts-per-step", "3", "--output-dir", str(tmp_path / "out")], capsys)
    assert line == "argument --prompts-per-step: must be divisible by the number of processes (2), got 3"


def test_bad_value_exits_2_in_a_fresh_process(tmp_path):
    """As a user runs it: exit status 2, one line, no traceback and no runs/ directory."""
    run = subprocess.run([sys.executable, "-m", "grpo_kernels.train", "--steps", "0"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120, env=subprocess_env())
    assert run.returncode == 2 and run.stdout == ""
    assert run.stderr.splitlines() == [PROG + "argument --steps: must be an integer >= 1, got '0'"]
    assert list(tmp_path.iterdir()) == []


def test_final_checkpoint_then_a_rerun_is_refused_and_failures_leave_the_run_intact(tmp_path, capsys, monkeypatch):
    """The final checkpoint exists although 3 is not a multiple of --save-steps 2. A second run in
    the same directory is refused in one line naming --resume and --overwrite; one that fails at
    its first step (a bad backend, an exception), with --overwrite or --resume, leaves every file
    of the first run byte for byte; a successful --overwrite moves them, whole, into replaced-*/."""
    out = tmp_path / "out"
    argv = [*SMALL, "--output-dir", str(out)]
    assert train.main(argv) == 0
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-3"]
    assert (out / "latest").read_text() == "checkpoint-3"
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 3
    capsys.readouterr()
    before = snapshot(out)

    line = refused(argv, capsys)
    assert line.startswith(f"{out} already holds a run (metrics.jsonl, reward_curve.png, checkpoint-3 and 1 older): "
                           "pass --resume to continue it, or --overwrite to start a new one"), line
    if not torch.cuda.is_available():
        assert refused([*argv, "--overwrite", "--backend", "cuda"], capsys).startswith("argument --backend")
    assert snapshot(out) == before

    def fails(self, dataset):
        raise RuntimeError("the first step failed")

    with monkeypatch.context() as patch:
        patch.setattr(trainer_module.GRPOTrainer, "train_step", fails)
        for again in (["--overwrite"], ["--resume", "--steps", "5"]):
            with pytest.raises(RuntimeError, match="the first step failed"):
                train.main([*argv, *again])
            assert snapshot(out) == before, again
    assert not list(out.glob("replaced-*"))

    assert train.main([*argv, "--overwrite", "--seed", "1"]) == 0
    (aside,) = out.glob("replaced-*")
    assert snapshot(aside) == before
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-3"]
    assert (out / "metrics.jsonl").read_bytes() != (aside / "metrics.jsonl").read_bytes()  # the new run's


def test_resume_with_only_damaged_checkpoints_says_so_in_one_line(tmp_path, capsys):
    out = tmp_path / "out"
    checkpoint.save(str(out), 2, {"step": 2})
    (out / "checkpoint-2" / checkpoint.STATE_FILE).write_bytes(b"garbage")
    assert train.main([*SMALL, "--output-dir", str(out), "--resume"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[-1] == PROG + f"argument --resume: {out} holds no intact checkpoint to resume from"
    assert "skipping checkpoint" in err[-2]


def test_sigterm_writes_a_checkpoint_and_prints_the_resume_command(tmp_path, capsys, monkeypatch):
    """SIGTERM (as a scheduler sends it) during step 2: the step completes, checkpoint-2 is
    written, two lines say where and how to resume, exit status 143; the handlers are restored."""
    out = tmp_path / "out"
    real_step = trainer_module.GRPOTrainer.train_step

    def step(self, dataset):
        if self.step == 1:
            signal.raise_signal(signal.SIGTERM)
        return real_step(self, dataset)

    monkeypatch.setattr(trainer_module.GRPOTrainer, "train_step", step)
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    argv = [*SMALL, "--steps", "10", "--output-dir", str(out), "--lr", "0.002"]
    assert train.main(argv) == 128 + signal.SIGTERM
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-2] == f"python -m grpo_kernels.train: stopped by SIGTERM at step 2; checkpoint {out / 'checkpoint-2'}"
    assert err[-1] == ("resume with: python -m grpo_kernels.train --steps 10 --prompts-per-step 2 --num-generations 2 "
                       f"--lr 0.002 --target-reward none --output-dir {out} --save-steps 2 --backend torch "
                       "--threads 1 --resume")
    assert checkpoint.verify(str(out / "checkpoint-2")) is None
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2


def test_ctrl_c_twice_stops_at_once_and_points_at_the_last_checkpoint(tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    real_step = trainer_module.GRPOTrainer.train_step

    def step(self, dataset):
        if self.step == 2:
            raise KeyboardInterrupt  # what a second SIGINT raises, in the middle of step 3
        return real_step(self, dataset)

    monkeypatch.setattr(trainer_module.GRPOTrainer, "train_step", step)
    assert train.main([*SMALL, "--output-dir", str(out)]) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-2] == ("python -m grpo_kernels.train: stopped at once at step 2; the newest checkpoint is "
                       f"{out / 'checkpoint-2'}")
    assert err[-1].startswith("resume with: python -m grpo_kernels.train ") and err[-1].endswith(" --resume")


def test_resume_command_gives_back_the_same_options():
    parser = train.build_parser()
    args = parser.parse_args(["--task", "addition", "--beta", "0.04", "--lr", "3e-4", "--target-reward", "none",
                              "--output-dir", "my runs/a b", "--overwrite", "--threads", "2", "--top-p", "0.8",
                              "--top-k", "5", "--min-p", "0.05"])
    command = train.resume_command(args)
    assert command.startswith("python -m grpo_kernels.train ") and "'my runs/a b'" in command
    import shlex

    again = parser.parse_args(shlex.split(command)[3:])
    assert vars(again) == dict(vars(args), resume=True, overwrite=False)
    assert train.resume_command(args, world=2).startswith("torchrun --nproc_per_node=2 -m grpo_kernels.train ")


def test_missing_matplotlib_is_said_in_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    out = tmp_path / "out"
    assert train.main([*SMALL, "--output-dir", str(out)]) == 0
    captured = capsys.readouterr()
    said = [line for line in captured.err.splitlines() if "matplotlib" in line]
    assert said == ['python -m grpo_kernels.train: reward_curve.png skipped: matplotlib is not installed: '
                    'pip install "grpo_kernels[trainer]" (or pip install matplotlib)']
    assert json.loads(captured.out.strip().splitlines()[-1])["png"] is None
    assert not (out / "reward_curve.png").exists()
    setup = (pathlib.Path(__file__).resolve().parent.parent / "setup.py").read_text()  # the extra it names has it
    assert '"trainer": TRAINER' in setup and re.search(r'^TRAINER = \[.*"matplotlib', setup, re.M)

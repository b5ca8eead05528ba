"""Checkpoints survive a crash: the main job killed by SIGKILL while it writes a checkpoint, and
between two checkpoints, resumes from the last complete one and ends bit for bit where an
uninterrupted run ends. Truncated or corrupt checkpoints are skipped with a message. SIGINT and
SIGTERM write a checkpoint and print the command that resumes, and a second run that is killed
or fails never damages an earlier run's files."""
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from helpers import snapshot, subprocess_env

from grpo_kernels.trainer import checkpoint

ARGS = ["--steps", "12", "--save-steps", "4", "--prompts-per-step", "4", "--num-generations", "4",
        "--target-reward", "none", "--backend", "torch"]

# Runs the main job in this interpreter, with one of these deaths (or delays) planted:
#   write   - at the checkpoint of step 8, write half of state.pt, then SIGKILL (mid-write);
#   between - right after step 6 (checkpoints at 4 and 8), SIGKILL;
#   slow    - every step takes 0.3 s longer (time to send a signal while it runs).
HARNESS = r'''
import io, os, signal, sys, time
import torch
from grpo_kernels.trainer import checkpoint, trainer
mode, argv = sys.argv[1], sys.argv[2:]
real_save, real_step = torch.save, trainer.GRPOTrainer.train_step

def save_and_die(obj, path, *args, **kwargs):
    if obj.get("step") == 8:
        buffer = io.BytesIO()
        real_save(obj, buffer)
        with open(path, "wb") as f:
            f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
        os.kill(os.getpid(), signal.SIGKILL)
    return real_save(obj, path, *args, **kwargs)

def step_and_die(self, dataset):
    record = real_step(self, dataset)
    if self.step == 6:
        os.kill(os.getpid(), signal.SIGKILL)
    return record

def slow_step(self, dataset):
    time.sleep(0.3)
    return real_step(self, dataset)

if mode == "write":
    checkpoint.torch.save = save_and_die
elif mode == "between":
    trainer.GRPOTrainer.train_step = step_and_die
elif mode == "slow":
    trainer.GRPOTrainer.train_step = slow_step
from grpo_kernels.train import main
sys.exit(main(argv))
'''


def main_job(tmp_path, out, mode="none", extra=()):
    cmd = [sys.executable, "-c", HARNESS, mode, *ARGS, "--output-dir", str(out), *extra]
    return subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600, env=subprocess_env())


def final_state(out):
    path = out / "checkpoint-12" / checkpoint.STATE_FILE
    return torch.load(path, map_location="cpu", weights_only=False)


def deterministic(history):
    return [{k: v for k, v in h.items() if k not in ("tokens_per_s", "step_time_s")} for h in history]


@pytest.fixture(scope="module")
def straight_dir(tmp_path_factory):
    """An uninterrupted run of the main job (checkpoints 4, 8, 12); copy it before changing it."""
    tmp = tmp_path_factory.mktemp("straight")
    run = main_job(tmp, tmp / "out")
    assert run.returncode == 0, run.stderr[-3000:]
    return tmp / "out"


@pytest.fixture(scope="module")
def straight(straight_dir):
    return final_state(straight_dir)


def assert_same_run(state, straight):
    for name, value in straight["model"].items():
        assert torch.equal(value, state["model"][name]), name
    assert deterministic(state["history"]) == deterministic(straight["history"])


@pytest.mark.parametrize("mode, last_complete", [("write", 4), ("between", 4)])
def test_sigkill_then_resume_is_bit_for_bit(tmp_path, straight, mode, last_complete):
    out = tmp_path / "out"
    crashed = main_job(tmp_path, out, mode)
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr[-3000:]
    finished = sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint-"))
    assert finished == [f"checkpoint-{last_complete}"]
    if mode == "write":
        assert (out / ".tmp-checkpoint-8").exists()  # the half-written one never got its final name
    resumed = main_job(tmp_path, out, extra=["--resume"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_run(final_state(out), straight)
    logged = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert logged == list(range(1, 13))  # steps run after the checkpoint and lost are logged once


def test_sigkill_during_an_overwriting_run_keeps_the_earlier_run(tmp_path, straight_dir):
    """--overwrite moves the earlier run aside (whole, byte for byte) and deletes nothing, even
    when the new run is killed."""
    out = tmp_path / "out"
    shutil.copytree(straight_dir, out)
    before = snapshot(out)
    crashed = main_job(tmp_path, out, "between", extra=["--overwrite"])
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr[-3000:]
    (aside,) = out.glob("replaced-*")
    assert snapshot(aside) == before
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-4"]  # the new run's
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 5  # killed before logging step 6


def _wait_for_steps(path, count, process, timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        if path.exists() and len(path.read_text().splitlines()) >= count:
            return
        time.sleep(0.05)
    raise AssertionError(f"the run logged fewer than {count} steps (exit status {process.poll()})")


def test_sigint_writes_a_checkpoint_and_prints_the_command_that_resumes(tmp_path, straight):
    """SIGINT (Ctrl-C) while the main job runs: it finishes the step in progress, writes a
    checkpoint, prints two lines (no traceback) and exits 130; the printed command resumes and
    ends bit for bit where the uninterrupted run ends. (SIGTERM: tests/test_train_cli.py.)"""
    signum = signal.SIGINT
    out = tmp_path / "out"
    cmd = [sys.executable, "-c", HARNESS, "slow", *ARGS, "--output-dir", str(out)]
    job = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           env=subprocess_env())
    try:
        _wait_for_steps(out / "metrics.jsonl", 2, job)
        job.send_signal(signum)
        _, err = job.communicate(timeout=120)
    finally:
        job.kill()
    assert job.returncode == 128 + signum, err[-3000:]
    assert "Traceback" not in err
    stopped, resume = err.strip().splitlines()[-2:]
    step = len((out / "metrics.jsonl").read_text().splitlines())
    assert 2 <= step < 12
    assert stopped.endswith(f"stopped by {signal.Signals(signum).name} at step {step}; checkpoint "
                            f"{out / f'checkpoint-{step}'}"), stopped
    assert (out / f"checkpoint-{step}").is_dir() and checkpoint.verify(str(out / f"checkpoint-{step}")) is None
    assert resume.startswith("resume with: python -m grpo_kernels.train ") and resume.endswith(" --resume")
    args = shlex.split(resume[len("resume with: "):])
    assert args[:3] == ["python", "-m", "grpo_kernels.train"]
    resumed = subprocess.run([sys.executable, *args[1:]], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                             env=subprocess_env())
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_run(final_state(out), straight)
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == list(range(1, 13))


def test_damaged_checkpoints_are_skipped_with_a_message(tmp_path, straight, capsys):
    out = tmp_path / "out"
    for step in (4, 8, 12):
        checkpoint.save(str(out), step, {"step": step, "weights": torch.arange(1000.0) * step})
    newest = out / "checkpoint-12" / checkpoint.STATE_FILE
    newest.write_bytes(newest.read_bytes()[:100])  # truncated
    middle = out / "checkpoint-8" / checkpoint.STATE_FILE
    data = bytearray(middle.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte
    middle.write_bytes(bytes(data))
    state = checkpoint.load_latest(str(out))
    assert state["step"] == 4 and torch.equal(state["weights"], torch.arange(1000.0) * 4)
    err = capsys.readouterr().err
    assert "checkpoint-12" in err and "truncated" in err
    assert "checkpoint-8" in err and "corrupt" in err


def test_checkpoint_without_checksum_is_not_loaded(tmp_path, capsys):
    out = tmp_path / "out"
    checkpoint.save(str(out), 3, {"step": 3})
    os.remove(out / "checkpoint-3" / checkpoint.META_FILE)
    assert checkpoint.load_latest(str(out)) is None
    assert "meta.json is missing" in capsys.readouterr().err


def test_resume_with_only_damaged_checkpoints_raises(tmp_path):
    from grpo_kernels.trainer import GRPOTrainer, TrainerConfig, toy

    out = tmp_path / "out"
    checkpoint.save(str(out), 2, {"step": 2})
    (out / "checkpoint-2" / checkpoint.STATE_FILE).write_bytes(b"garbage")
    tokenizer = toy.char_tokenizer()
    trainer = GRPOTrainer(toy.tiny_causal_lm(len(tokenizer)), tokenizer, [toy.exact_answer_reward],
                          TrainerConfig(output_dir=str(out), progress=False))
    with pytest.raises(FileNotFoundError, match="no intact checkpoint"):
        trainer.train(toy.successor_dataset(10), resume=True)

"""Every example runs as a user would run it, and does what its docstring says.

Each runs in a fresh interpreter from a scratch directory (so `runs/` lands there) and must exit
0: the training examples exit 1 when they miss their stated target.
"""
import pathlib
import subprocess
import sys

import pytest
from helpers import subprocess_env

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"


def run_example(name, tmp_path):
    env = subprocess_env(PYTHONWARNINGS="error::RuntimeWarning")  # the grpo_kernels under test
    return subprocess.run([sys.executable, str(EXAMPLES / name)], cwd=tmp_path, capture_output=True, text=True,
                          timeout=600, env=env)


def test_every_example_is_covered():
    assert {p.name for p in EXAMPLES.glob("*.py")} == {"quickstart.py", "custom_loop.py", "custom_rewards.py",
                                                        "train_toy.py", "tensor_parallel.py"}


def test_quickstart(tmp_path):
    out = run_example("quickstart.py", tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "loss" in out.stdout and "'clip_ratio/region'" in out.stdout
    assert "why 0: on-policy every ratio is 1" in out.stdout  # the first loss is 0: it says why


def test_tensor_parallel_launches_two_ranks_and_matches_one_process(tmp_path):
    out = run_example("tensor_parallel.py", tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "on 2 ranks" in out.stdout and "matches the single-process loss: True" in out.stdout


@pytest.mark.parametrize("name, expected", [
    ("custom_loop.py", ">= 0.5"),
    ("custom_rewards.py", "'rewards/short'"),
    ("train_toy.py", "reached the target 0.9: True"),
])
def test_training_example_reaches_its_target(tmp_path, name, expected):
    out = run_example(name, tmp_path)
    assert out.returncode == 0, f"{name} exited {out.returncode}:\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}"
    assert expected in out.stdout

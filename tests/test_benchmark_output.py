"""Benchmarks never clobber the committed results: a fresh directory by default, the committed set
only with --update-committed, every file written once at the end, skipped contenders reported."""
import argparse
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import output  # noqa: E402


def args(*argv):
    parser = argparse.ArgumentParser()
    output.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_default_directory_is_fresh_and_outside_the_committed_set():
    path = output.directory(args(), "AMD EPYC (2 cores)")
    assert path.startswith(os.path.join("runs", "benchmarks", "AMD_EPYC_2_cores-"))
    assert output.directory(args("--out", "x"), "cpu") == "x"
    committed = output.directory(args("--update-committed"), "AMD EPYC (2 cores)")
    assert committed == os.path.join(output.COMMITTED, "AMD_EPYC_2_cores")
    with pytest.raises(SystemExit):
        args("--out", "x", "--update-committed")


def test_publish_writes_everything_or_nothing(tmp_path):
    out = tmp_path / "results"
    out.mkdir()
    (out / "results.md").write_text("old")

    def failing(scratch):
        with open(os.path.join(scratch, "results.md"), "w") as f:
            f.write("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        output.publish(failing, str(out))
    assert (out / "results.md").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results"]  # no scratch left behind

    def complete(scratch):
        for name in ("results.md", "results.csv"):
            with open(os.path.join(scratch, name), "w") as f:
                f.write("new")

    output.publish(complete, str(out))
    assert (out / "results.md").read_text() == "new" and (out / "results.csv").read_text() == "new"


def test_a_run_reports_skipped_contenders_and_leaves_the_committed_set_alone(tmp_path, capsys):
    pytest.importorskip("verl")
    from benchmarks.run import main

    before = {p: os.path.getmtime(os.path.join(dp, p)) for dp, _, fs in os.walk(output.COMMITTED) for p in fs}
    assert main(["--quick", "--tasks", "verl_policy", "--no-memory", "--repeats", "1", "--time-cap", "0",
                 "--out", str(tmp_path)]) == 0
    report = (tmp_path / "results.md").read_text()
    assert "verl 'vanilla' (eager)" in report and "grpo_kernels[torch] 'grpo_kernels_vanilla'" in report
    assert "## Not run here" in report and "needs CUDA" in report
    assert "skipped verl_policy / grpo_kernels[cuda] 'grpo_kernels_vanilla': needs CUDA" in capsys.readouterr().err
    after = {p: os.path.getmtime(os.path.join(dp, p)) for dp, _, fs in os.walk(output.COMMITTED) for p in fs}
    assert after == before


def test_vocab_parallel_benchmark_runs_on_two_processes(tmp_path):
    """The communication benchmark under torchrun, tiny: its table and the bytes it counts."""
    import subprocess

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
           "benchmarks.vocab_parallel", "--tokens", "64", "--vocab", "512", "--hidden", "16", "--repeats", "1",
           "--out", str(tmp_path)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    table = (tmp_path / "vocab_parallel.md").read_text()
    # 64 tokens: a max and a packed sum of 3 fp32 each (1024 B) and the layout check (32 B); the
    # fused-linear path adds the 64 x 16 fp32 hidden gradient (4096 B); the all-gather 64 x 256 fp32.
    assert "| ours, logits slice | 1,056 |" in table
    assert "| ours, fused-linear (lm_head rows) | 5,152 |" in table
    assert "| all-gather the logits | 65,536 |" in table


@pytest.mark.skipif(torch.cuda.is_available(), reason="the dry run is for machines without a GPU")
@pytest.mark.parametrize("step", ["all", "build-test", "bench", "tune"])
def test_gpu_check_stops_early_and_clearly_without_a_gpu(tmp_path, step):
    import subprocess

    script = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "gpu_check.sh")
    done = subprocess.run(["bash", script, step, str(tmp_path)], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHON=sys.executable))
    assert done.returncode == 2, done.stdout + done.stderr
    assert "needs a CUDA GPU" in done.stdout and "nothing was run" in done.stdout
    assert "torch:" in (tmp_path / "machine.txt").read_text()
    assert not (tmp_path / "build.log").exists()  # nothing was installed
    usage = subprocess.run(["bash", script, "nonsense", str(tmp_path)], capture_output=True, text=True)
    assert usage.returncode == 64 and "build-test OUT" in usage.stderr

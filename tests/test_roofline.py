"""benchmarks/roofline.py: the committed floor table is current, and its floors are the issue's
byte and FLOP counts over the H100 and H200 rates."""
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import roofline  # noqa: E402
from benchmarks.tasks import Shape  # noqa: E402


def test_committed_table_is_current():
    path = os.path.join(os.path.dirname(roofline.__file__), "results", "roofline.md")
    with open(path) as f:
        assert f.read() == roofline.markdown(), "run `python -m benchmarks.roofline` and commit the table"


@pytest.mark.parametrize("device,shape,seconds", [
    # loss from logits: 3·N·V bf16 bytes at 3.0 TB/s
    ("H100", Shape("loss", 16384, 151936, dtype="bfloat16"), 3 * 16384 * 151936 * 2 / 3.0e12),
    # log-probs: N·V bf16 bytes at 4.3 TB/s
    ("H200", Shape("logprobs", 8192, 151936, dtype="bfloat16"), 8192 * 151936 * 2 / 4.3e12),
    # fused linear: 6·N·H·V FLOPs at 788 TFLOP/s (its bytes take far less)
    ("H200", Shape("linear", 8192, 151936, 4096, dtype="bfloat16"), 6 * 8192 * 4096 * 151936 / 788e12),
])
def test_floor_is_the_binding_bound(device, shape, seconds):
    ms, bound = roofline.floor_ms(shape, *roofline.DEVICES[device])
    assert ms == pytest.approx(seconds * 1e3, rel=1e-12)
    assert bound == ("matmul" if shape.task == "linear" else "memory")


def test_every_workload_has_a_cost():
    for w in roofline.WORKLOADS:
        moved, flops = roofline.cost(w.shape)
        assert moved > 0 and flops >= 0, w.title


def test_rows_get_measured_over_floor_on_a_known_device_only():
    row = dict(task="loss", N=16384, V=151936, H=0, dtype="bfloat16", ms=10.0)
    roofline.attach_floor(row, "NVIDIA H100 80GB HBM3")
    floor = 3 * 16384 * 151936 * 2 / 3.0e12 * 1e3
    assert row["floor_ms"] == pytest.approx(floor) and row["x_floor"] == pytest.approx(10.0 / floor)
    roofline.attach_floor(row, "AMD EPYC 7B13")
    assert "floor_ms" not in row and "x_floor" not in row

"""The quick CPU set under pytest-benchmark: `pytest benchmarks/ --benchmark-only`.

Small shapes, so the run takes about a minute on two cores. Compare commits with
`--benchmark-autosave` and `pytest-benchmark compare`. Benchmarks are not tests: nothing here
asserts a speed.
"""
import pytest
import torch

from benchmarks.tasks import TASKS, Shape, find_contender, split_contenders

SHAPES = [
    Shape("logprobs", 512, 32000, dtype="float32"),
    Shape("loss", 512, 32000, dtype="float32"),
    Shape("linear", 1024, 32000, 256, dtype="float32"),
    Shape("advantages", 4096, 0, dtype="float32"),
]
CASES = [(shape, c.name) for shape in SHAPES for c in split_contenders(shape.task, torch.device("cpu"))[0]
         if "torch.compile" not in c.name]


@pytest.mark.parametrize("shape, contender", CASES, ids=[f"{s.task}-{c}" for s, c in CASES])
def test_cpu(benchmark, shape, contender):
    task = TASKS[shape.task]
    inputs = task.build(shape, torch.device("cpu"))
    fn = find_contender(shape.task, torch.device("cpu"), contender).run
    benchmark.extra_info.update(shape.key())
    benchmark.pedantic(fn, args=(inputs,), rounds=3, warmup_rounds=1)

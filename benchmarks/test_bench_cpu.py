"""The quick CPU set under pytest-benchmark: `pytest benchmarks/ --benchmark-only`.

Small shapes, so the run takes about a minute on two cores. Compare commits with
`--benchmark-autosave` and `pytest-benchmark compare`. Benchmarks are not tests: nothing here
asserts a speed.
"""
import pytest
import torch

from benchmarks.tasks import TASKS, Contender, Shape

SHAPES = [
    Shape("logprobs", 512, 32000, dtype="float32"),
    Shape("loss", 512, 32000, dtype="float32"),
    Shape("linear", 1024, 32000, 256, dtype="float32"),
    Shape("advantages", 4096, 0, dtype="float32"),
]
CASES = [(shape, c.name) for shape in SHAPES for c in TASKS[shape.task].contenders(torch.device("cpu"))
         if isinstance(c, Contender) and "torch.compile" not in c.name]


@pytest.mark.parametrize("shape, contender", CASES, ids=[f"{s.task}-{c}" for s, c in CASES])
def test_cpu(benchmark, shape, contender):
    task = TASKS[shape.task]
    inputs = task.build(shape, torch.device("cpu"))
    fn = next(c for c in task.contenders(torch.device("cpu")) if isinstance(c, Contender) and c.name == contender).run
    benchmark.extra_info.update(shape.key())
    benchmark.pedantic(fn, args=(inputs,), rounds=3, warmup_rounds=1)

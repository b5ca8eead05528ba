"""The Python glue of one call stays thin: a budget of Python calls into grpo_kernels per
grpo_loss forward + backward (the issue's measure: B=8, T=32, V=256, the native CPU kernels,
validate=False). The count is deterministic, unlike a timing: timings live in
benchmarks/results/*/host_overhead.md."""
import pytest
import torch

import grpo_kernels as gk
from benchmarks.host_overhead import count_python_calls
from conftest import BACKENDS

CALL_BUDGET = 100


@pytest.mark.parametrize("validate", [False, True])
@pytest.mark.skipif("cpp" not in BACKENDS, reason="the compiled CPU kernels are not built")
def test_grpo_loss_python_calls_within_budget(validate):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(8, 32, 256, generator=g)
    ids = torch.randint(0, 256, (8, 32), generator=g)
    mask = torch.rand(8, 32, generator=g) > 0.1
    adv, old = torch.randn(8, generator=g), torch.randn(8, 32, generator=g) - 5

    def call():
        x = logits.clone().requires_grad_(True)
        out = gk.grpo_loss(x, ids, adv, mask=mask, old_logps=old, backend="cpp", validate=validate)
        out.loss.backward()
        assert torch.isfinite(x.grad).all()

    call()  # first call: imports, caches
    calls, files = count_python_calls(call)
    # validate=True adds its deferred checks (a few calls each) and their one host read.
    budget = CALL_BUDGET if not validate else CALL_BUDGET + 20
    assert 20 < calls <= budget, f"{calls} Python calls in {sorted(files)}"

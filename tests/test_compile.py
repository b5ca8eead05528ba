"""torch.compile traces through our ops: fullgraph=True proves there is no graph break."""
import pytest
import torch

import grpo_kernels as gk
from cases import make_case
from conftest import BACKENDS
from helpers import to_device


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("option", ["grpo", "gspo", "k3", "is_token_truncate"])
def test_compiled_loss_matches_eager(backend, option):
    case = to_device(make_case(option, seed=13))
    kwargs = case.kwargs()

    def step(logits):
        return gk.grpo_loss(logits, case.ids, case.advantages, backend=backend, **kwargs).loss

    torch._dynamo.reset()
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    x1 = case.logits.clone().requires_grad_(True)
    x2 = case.logits.clone().requires_grad_(True)
    eager, traced = step(x1), compiled(x2)
    eager.backward()
    traced.backward()
    torch.testing.assert_close(traced, eager, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(x2.grad, x1.grad, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("backend", BACKENDS)
def test_compiled_selective_logprobs(backend):
    case = to_device(make_case("grpo", seed=14))
    torch._dynamo.reset()
    fn = torch.compile(lambda x: gk.selective_logprobs(x, case.ids, return_entropy=True, backend=backend),
                       backend="aot_eager", fullgraph=True)
    logp, ent = fn(case.logits)
    ref_logp, ref_ent = gk.selective_logprobs(case.logits, case.ids, return_entropy=True, backend=backend)
    assert torch.equal(logp, ref_logp) and torch.equal(ent, ref_ent)

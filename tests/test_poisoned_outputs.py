"""Every output element is written: allocations inside our ops start as NaN (or a sentinel)."""
import pytest
import torch

import grpo_kernels as gk
from cases import make_case
from conftest import BACKENDS
from helpers import to_device
from test_parity import run_backend


@pytest.fixture
def poisoned_allocations(monkeypatch):
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def poison(t):
        if t.is_floating_point():
            t.fill_(float("nan"))
        elif t.dtype != torch.bool:
            t.fill_(101)
        return t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: poison(real_empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: poison(real_empty_like(*a, **k)))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("option", ["everything", "gspo", "cispo", "per_token_adv"])
def test_every_element_written(backend, option, poisoned_allocations):
    case = to_device(make_case(option, seed=17, v=300))  # V spans several vocabulary tiles only on small tiles
    out, grad = run_backend(case, backend)
    assert torch.isfinite(grad).all()
    assert torch.isfinite(out.loss) and torch.isfinite(out.per_token_loss).all()
    assert torch.isfinite(out.logps).all() and torch.isfinite(out.entropy).all()
    assert all(torch.isfinite(v) for v in out.metrics.values())


@pytest.mark.parametrize("backend", BACKENDS)
def test_advantages_every_element_written(backend, poisoned_allocations):
    rewards = torch.randn(12)
    rewards[3] = float("nan")
    out = gk.group_advantages(rewards.to(to_device(make_case("grpo")).logits.device), group_size=4, backend=backend)
    for t in (out.advantages, out.group_mean, out.group_std, out.frac_zero_std):
        assert torch.isfinite(t).all()

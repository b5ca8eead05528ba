"""GPU-only checks (skipped without CUDA). On a GPU the rest of the suite also runs there:
conftest.BACKENDS then holds torch, triton and (when built) cuda, and tensors live on CUDA."""
import pytest
import torch

import grpo_kernels as gk

pytestmark = pytest.mark.gpu


def _inputs(n_seq=4, t=1024, v=32000, dtype=torch.bfloat16):
    g = torch.Generator(device="cuda").manual_seed(0)
    logits = torch.randn(n_seq, t, v, device="cuda", dtype=dtype, generator=g)
    ids = torch.randint(0, v, (n_seq, t), device="cuda", generator=g)
    return logits, ids, torch.randn(n_seq, device="cuda", generator=g)


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_no_vocab_sized_allocation_beyond_the_logits(backend):
    """With the in-place backward the gradient is the logits buffer: nothing of size N·V is allocated."""
    if backend not in gk.available_backends("cuda"):
        pytest.skip(f"{backend} backend not available")
    logits, ids, adv = _inputs()
    x = logits.clone().requires_grad_(True)
    work = x * 1.0
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    ref = torch.full(ids.shape, -10.0, device="cuda")
    out = gk.grpo_loss(work, ids, adv, backend=backend, inplace_backward=True, beta=0.04, ref_logps=ref)
    torch.autograd.grad(out.loss, work)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    assert extra < 0.05 * logits.numel() * logits.element_size(), f"{extra / 2**20:.0f} MiB allocated"


def test_cuda_backend_matches_triton():
    if "cuda" not in gk.available_backends("cuda"):
        pytest.skip("cuda backend not built")
    logits, ids, adv = _inputs(t=256, v=50257)
    grads = {}
    for backend in ("triton", "cuda"):
        x = logits.clone().requires_grad_(True)
        out = gk.grpo_loss(x, ids, adv, backend=backend, loss_type="grpo", entropy_coef=0.01)
        out.loss.backward()
        grads[backend] = (out.loss.detach(), x.grad.float())
    torch.testing.assert_close(grads["cuda"][0], grads["triton"][0], rtol=1e-5, atol=1e-6)
    scale = grads["triton"][1].abs().max()
    torch.testing.assert_close(grads["cuda"][1], grads["triton"][1], rtol=0, atol=2.0 ** -7 * float(scale))


def test_fused_linear_is_bitwise_chunk_independent_on_gpu():
    g = torch.Generator(device="cuda").manual_seed(1)
    hidden = torch.randn(4, 256, 512, device="cuda", dtype=torch.bfloat16, generator=g)
    weight = torch.randn(32000, 512, device="cuda", dtype=torch.bfloat16, generator=g) / 23
    ids = torch.randint(0, 32000, (4, 256), device="cuda", generator=g)
    adv = torch.randn(4, device="cuda", generator=g)
    results = []
    for chunk in (256, 1024):
        h = hidden.clone().requires_grad_(True)
        out = gk.fused_linear_grpo_loss(h, weight, ids, adv, backend="triton", chunk_size=chunk)
        out.loss.backward()
        results.append((out.loss.detach(), h.grad))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])

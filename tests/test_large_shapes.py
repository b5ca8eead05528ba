"""Logits with more than 2^31 elements: every offset is 64-bit (cpp backend, bf16, on CPU).

N = 16448 rows of V = 131072 (2,155,872,256 elements, 4.0 GiB in bf16) in one packed sequence.
The rows repeat a random 64-row block, so the fp64 oracle needs only that block: log-probs of
every row, and the in-place gradient of the rows past element 2^31, are checked against it.
"""
import pytest
import torch

import grpo_kernels as gk
from grpo_kernels import reference as R
from helpers import assert_close

pytestmark = pytest.mark.skipif("cpp" not in gk.available_backends(), reason="the cpp backend is not built")

N, V, BLOCK = 16448, 131072, 64


def test_logits_beyond_2_pow_31_elements_cpp_bf16():
    assert N * V > 2 ** 31
    g = torch.Generator().manual_seed(0)
    block = (torch.randn(BLOCK, V, generator=g) * 2).bfloat16()
    logits = torch.empty(N, V, dtype=torch.bfloat16)
    logits.view(N // BLOCK, BLOCK, V).copy_(block.expand(N // BLOCK, BLOCK, V))
    ids = torch.randint(0, V, (N,), generator=g)
    rows = torch.arange(N) % BLOCK
    lsm = torch.log_softmax(block.double(), -1)  # (BLOCK, V): every row's oracle
    expected_logp = lsm[rows, ids]
    old = (expected_logp + 0.1 * torch.randn(N, generator=g, dtype=torch.float64)).float()
    cu = torch.tensor([0, N], dtype=torch.int32)
    adv = torch.tensor([0.7])

    leaf = logits.requires_grad_(True)
    out = gk.grpo_loss(leaf, ids, adv, old_logps=old, cu_seqlens=cu, loss_type="dapo", backend="cpp",
                       inplace_backward=True)
    assert_close(out.logps.double(), expected_logp, rtol=0, atol=2e-5, name="logps")
    (grad,) = torch.autograd.grad(out.loss, leaf)
    assert grad.data_ptr() == logits.data_ptr()  # written over the logits

    # The oracle's dL/dlogp, then dL/dz = g·(onehot − p) for the rows past element 2^31.
    logp = expected_logp.clone().requires_grad_(True)
    terms = R.policy_objective(logp[None], torch.zeros_like(logp)[None], adv.double(),
                               torch.ones(1, N, dtype=torch.bool), gk.GRPOLossConfig(loss_type="dapo"),
                               old_logp=old.double()[None])
    (g_logp,) = torch.autograd.grad(terms.loss, logp)
    assert_close(out.loss.double(), terms.loss, rtol=1e-5, atol=0, name="loss")
    tail = torch.arange((2 ** 31) // V + 1, N)
    tail = tail[-BLOCK:]
    p = lsm[rows[tail]].exp()
    expected = -g_logp[tail, None] * p
    expected[torch.arange(tail.numel()), ids[tail]] += g_logp[tail]
    scale = float(expected.abs().max())
    err = float((grad.detach()[tail].double() - expected).abs().max())
    assert err <= scale * 2.0 ** -7, f"gradient past 2^31 elements off by {err:.3e} (scale {scale:.3e})"

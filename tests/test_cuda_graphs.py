"""A training step captured in a CUDA graph replays with the eager numbers (GPU only).

The step is the fused-linear GRPO loss, forward and backward, with validate=False: no host read
(tests/test_sync_free.py proves that on the CPU backends), no host-to-device copy, every
allocation from the graph's pool. It is captured once on static inputs; each replay runs on new
data copied into them and must give what an eager call gives on that data. Skipped without CUDA.
"""
import pytest
import torch

import grpo_kernels as gk
from helpers import assert_grad_close, gpu_backends

pytestmark = pytest.mark.gpu

B, T, H, V = 4, 96, 256, 5000
CHUNK = 160  # 384 rows: two full chunks and a partial one
OPTIONS = {
    # token-level: row chunks, KL, the batch-wide entropy quantile and bonus, dual clip
    "token_level": dict(loss_type="dapo", beta=0.04, top_entropy_quantile=0.5, entropy_coef=0.01, dual_clip=3.0),
    # sequence-coupled: whole padded sequences per chunk (no host read), the GSPO pass through the mean
    "gspo": dict(loss_type="grpo", importance_sampling_level="sequence", epsilon=3e-4, epsilon_high=4e-4),
    # truncated sampling: the threshold search's scratch and the saved thresholds inside the graph
    "truncated": dict(loss_type="dapo", top_k=20, top_p=0.9, min_p=0.02),
}


def _batch(seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    hidden = torch.randn(B, T, H, device="cuda", generator=g)
    weight = torch.randn(V, H, device="cuda", generator=g) / H ** 0.5
    ids = torch.randint(0, V, (B, T), device="cuda", generator=g)
    mask = torch.rand(B, T, device="cuda", generator=g) > 0.2
    old = -torch.rand(B, T, device="cuda", generator=g) * 6 - 2
    return dict(hidden=hidden, weight=weight, ids=ids, mask=mask, old=old, ref=old - 0.1,
                adv=torch.randn(B, device="cuda", generator=g))


def _loss(x, hidden, weight, backend, options):
    return gk.fused_linear_grpo_loss(hidden, weight, x["ids"], x["adv"], mask=x["mask"], old_logps=x["old"],
                                     ref_logps=x["ref"], chunk_size=CHUNK, backend=backend, validate=False,
                                     **options)


def _eager(x, backend, options):
    hidden, weight = x["hidden"].clone().requires_grad_(True), x["weight"].clone().requires_grad_(True)
    out = _loss(x, hidden, weight, backend, options)
    out.loss.backward()
    return out.loss.detach(), {k: v.detach() for k, v in out.metrics.items()}, hidden.grad, weight.grad


@pytest.mark.parametrize("option", sorted(OPTIONS))
@pytest.mark.parametrize("backend", gpu_backends() or ["triton"])
def test_captured_training_step_replays_with_the_eager_numbers(backend, option):
    if backend not in gpu_backends():
        pytest.skip(f"backend {backend} not available on this GPU machine")
    options = OPTIONS[option]
    static = _batch(0)
    static["hidden"].requires_grad_(True)
    static["weight"].requires_grad_(True)

    def step():
        out = _loss(static, static["hidden"], static["weight"], backend, options)
        out.loss.backward()
        return out.loss.detach(), {k: v.detach() for k, v in out.metrics.items()}

    # Warm up on a side stream (Triton compiles, the allocator and cuBLAS settle), as torch's docs do.
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            step()
            static["hidden"].grad = static["weight"].grad = None
    torch.cuda.current_stream().wait_stream(side)

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        loss, metrics = step()
    replayed = []
    for seed in (1, 2):
        fresh = _batch(seed)
        with torch.no_grad():
            for name, tensor in static.items():
                tensor.copy_(fresh[name])
        graph.replay()
        torch.cuda.synchronize()
        want_loss, want_metrics, want_dh, want_dw = _eager(fresh, backend, options)
        torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=1e-6)
        assert metrics.keys() == want_metrics.keys()
        for name in metrics:
            torch.testing.assert_close(metrics[name], want_metrics[name], rtol=1e-5, atol=1e-6, msg=name)
        # relative to the largest element: the gradients are ~1e-6 each, an absolute tolerance would pass anything
        assert_grad_close(static["hidden"].grad, want_dh, rel=1e-5, name="d hidden")
        assert_grad_close(static["weight"].grad, want_dw, rel=1e-5, name="d weight")
        replayed.append(loss.clone())
    assert not torch.equal(replayed[0], replayed[1]), "each replay computes on the data copied in"

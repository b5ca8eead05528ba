"""validate=False: no host synchronisation at all; validate=True: at most one per call.

Under FakeTensorMode any read of a tensor's value on the host (.item(), bool(), .tolist())
raises, so a call that completes there never synchronises. The controls run the same calls
with validate=True and expect that exception: the harness does catch a sync.
"""
import os
import sys

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import grpo_kernels as gk

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.host_overhead import count_host_reads  # noqa: E402
from helpers import gpu_backends  # noqa: E402

CPU_BACKENDS = [b for b in ("torch", "cpp") if b in gk.available_backends("cpu")]
GPU_BACKENDS = gpu_backends()
B, T, V, H = 3, 5, 11, 8
LENGTHS = [4, 6, 5]  # packed: N = 15 tokens
# Token-level options (no token coupling), so the fused-linear path needs no host read either.
TOKEN_LEVEL = dict(loss_type="dapo", beta=0.04, top_entropy_quantile=0.5, entropy_coef=0.01)


def _inputs(packed: bool, generator=None):
    g = generator
    n = sum(LENGTHS) if packed else B * T
    shape = (n,) if packed else (B, T)
    logits = torch.randn(*shape, V, generator=g)
    ids = torch.randint(0, V, shape, generator=g)
    mask = None if packed else torch.rand(shape, generator=g) > 0.2
    cu = torch.tensor([0] + LENGTHS).cumsum(0).to(torch.int32) if packed else None
    logps = torch.randn(shape, generator=g) - 2
    return dict(logits=logits, ids=ids, mask=mask, cu_seqlens=cu, old=logps + 0.05, ref=logps - 0.05,
                hidden=torch.randn(*shape, H, generator=g), weight=torch.randn(V, H, generator=g) / H ** 0.5,
                advantages=torch.randn(B, generator=g), rewards=torch.randn(2 * B, generator=g))


def _every_call(x, backend, validate):
    """Each public function of the lean core once, forward and backward."""
    common = dict(mask=x["mask"], cu_seqlens=x["cu_seqlens"], backend=backend, validate=validate)
    logits = x["logits"].requires_grad_(True)
    out = gk.grpo_loss(logits, x["ids"], x["advantages"], old_logps=x["old"], ref_logps=x["ref"], **common,
                       **TOKEN_LEVEL)
    out.loss.backward()
    gk.selective_logprobs(x["logits"].detach(), x["ids"], return_entropy=True, **common)
    logps = x["old"].clone().requires_grad_(True)
    gk.grpo_loss_from_logprobs(logps, x["advantages"], entropy=torch.ones_like(logps), ref_logps=x["ref"],
                               **common, **TOKEN_LEVEL).loss.backward()
    gk.group_advantages(x["rewards"], group_size=2, backend=backend, validate=validate)
    hidden, weight = x["hidden"].requires_grad_(True), x["weight"].requires_grad_(True)
    fused = gk.fused_linear_grpo_loss(hidden, weight, x["ids"], x["advantages"], old_logps=x["old"],
                                      ref_logps=x["ref"], chunk_size=4, **common, **TOKEN_LEVEL)
    fused.loss.backward()
    linear_common = {k: v for k, v in common.items() if k != "cu_seqlens"}
    gk.fused_linear_selective_logprobs(hidden, weight, x["ids"], chunk_size=4, **linear_common).sum().backward()


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_validate_false_never_reads_the_device(backend, packed):
    with FakeTensorMode():
        _every_call(_inputs(packed), backend, validate=False)


@pytest.mark.gpu
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("backend", GPU_BACKENDS or ["triton"])
def test_validate_false_never_synchronises_on_cuda(backend, packed):
    """On CUDA tensors, torch's sync debug mode makes any synchronising call an error: a host read,
    a pageable host-to-device copy. A first call outside it lets Triton compile and the cached
    parameter buffers be made; the second must not synchronise at all."""
    if backend not in GPU_BACKENDS:
        pytest.skip(f"backend {backend} not available on this GPU machine")

    def on_cuda():
        x = _inputs(packed, torch.Generator().manual_seed(3))
        return {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in x.items()}

    _every_call(on_cuda(), backend, validate=False)
    x = on_cuda()
    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        _every_call(x, backend, validate=False)
    finally:
        torch.cuda.set_sync_debug_mode(previous)


# The sampler's truncation, all three steps, and Σπ²: the search and the extra output read nothing either.
TRUNCATED = dict(top_k=5, top_p=0.8, min_p=0.05)


def _every_truncated_call(x, backend, validate):
    common = dict(mask=x["mask"], backend=backend, validate=validate)
    ref = dict(old_logps=x["old"], ref_logps=x["ref"])
    logits = x["logits"].detach().requires_grad_(True)
    out = gk.grpo_loss(logits, x["ids"], x["advantages"], cu_seqlens=x["cu_seqlens"], **ref, **common,
                       **TOKEN_LEVEL, **TRUNCATED)
    out.loss.backward()
    logp, entropy, sum_pi_sq = gk.selective_logprobs(logits, x["ids"], cu_seqlens=x["cu_seqlens"],
                                                     return_entropy=True, return_sum_pi_squared=True, **common,
                                                     **TRUNCATED)
    (logp.sum() + entropy.sum()).backward()
    hidden, weight = x["hidden"].requires_grad_(True), x["weight"].requires_grad_(True)
    gk.fused_linear_grpo_loss(hidden, weight, x["ids"], x["advantages"], cu_seqlens=x["cu_seqlens"], chunk_size=4,
                              **ref, **common, **TOKEN_LEVEL, **TRUNCATED).loss.backward()
    logp, sum_pi_sq = gk.fused_linear_selective_logprobs(hidden, weight, x["ids"], chunk_size=4,
                                                         return_sum_pi_squared=True, **common, **TRUNCATED)
    logp.sum().backward()


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_truncation_and_sum_pi_squared_never_read_the_device(backend, packed):
    with FakeTensorMode():
        _every_truncated_call(_inputs(packed), backend, validate=False)


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_backend_code_reads_nothing_on_real_tensors(backend, packed):
    """Under FakeTensorMode the dispatcher ops run their fake implementations, not the backends:
    here the same calls run the real backend code (the torch backend's ops, the threshold search,
    the extension's wrapper) on real tensors, counting every host read of a tensor value."""
    reads = count_host_reads(lambda: (_every_call(_inputs(packed), backend, validate=False),
                                      _every_truncated_call(_inputs(packed), backend, validate=False)))
    assert reads == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_threshold_search_never_reads_the_device(dtype):
    """The torch search itself (the torch backend's, and the vocabulary-parallel path's, which runs
    it outside the dispatcher op): no branch on a value."""
    from grpo_kernels.ops.truncation_search import find_threshold
    from grpo_kernels.truncation import Truncation

    with FakeTensorMode():
        logits = torch.randn(4, V).to(dtype)
        threshold = find_threshold(logits, logits.float(), Truncation(**TRUNCATED))
        assert threshold.shape == (4,)


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_control_validate_true_is_caught_reading(packed):
    with FakeTensorMode(), pytest.raises(Exception, match="[Dd]ata.dependent|item|local_scalar_dense"):
        _every_call(_inputs(packed), "torch", validate=True)


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_validate_true_reads_once_per_call(backend, packed):
    """Counted at .item(), .tolist(), bool(), int() and float() of any tensor (benchmarks.host_overhead)."""
    x = _inputs(packed, torch.Generator().manual_seed(0))
    common = dict(mask=x["mask"], cu_seqlens=x["cu_seqlens"], backend=backend)
    calls = {
        "grpo_loss": lambda: gk.grpo_loss(x["logits"], x["ids"], x["advantages"], old_logps=x["old"],
                                          ref_logps=x["ref"], **common, **TOKEN_LEVEL),
        "selective_logprobs": lambda: gk.selective_logprobs(x["logits"], x["ids"], **common),
        "grpo_loss_from_logprobs": lambda: gk.grpo_loss_from_logprobs(x["old"], x["advantages"], **common),
        "group_advantages": lambda: gk.group_advantages(x["rewards"], group_size=2, backend=backend),
        "fused_linear_grpo_loss": lambda: gk.fused_linear_grpo_loss(
            x["hidden"], x["weight"], x["ids"], x["advantages"], old_logps=x["old"], ref_logps=x["ref"],
            chunk_size=4, **common, **TOKEN_LEVEL),
    }
    for name, call in calls.items():
        reads = count_host_reads(call)
        assert reads == 1, (name, reads)


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_validate_false_still_raises_metadata_errors(packed):
    """Shapes, dtypes and devices are checked whatever `validate` says: they cost no sync."""
    x = _inputs(packed)
    with pytest.raises(ValueError, match="advantages must have shape"):
        gk.grpo_loss(x["logits"], x["ids"], torch.zeros(B + 1), mask=x["mask"], cu_seqlens=x["cu_seqlens"],
                     validate=False)


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_validate_false_gives_the_same_numbers(backend, packed):
    x = _inputs(packed, torch.Generator().manual_seed(1))
    kwargs = dict(mask=x["mask"], cu_seqlens=x["cu_seqlens"], backend=backend, old_logps=x["old"],
                  ref_logps=x["ref"], **TOKEN_LEVEL)
    checked = gk.fused_linear_grpo_loss(x["hidden"], x["weight"], x["ids"], x["advantages"], chunk_size=4, **kwargs)
    unchecked = gk.fused_linear_grpo_loss(x["hidden"], x["weight"], x["ids"], x["advantages"], chunk_size=4,
                                          validate=False, **kwargs)
    assert torch.equal(checked.loss, unchecked.loss)
    assert all(torch.equal(checked.metrics[k], unchecked.metrics[k]) for k in checked.metrics)


def test_validate_must_be_a_bool():
    x = _inputs(False)
    with pytest.raises(TypeError, match="validate must be True or False"):
        gk.selective_logprobs(x["logits"], x["ids"], validate="yes")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_compiled_training_step_has_no_graph_break(backend):
    """torch.compile(fullgraph=True) of a step that scores rewards and takes the fused-linear loss."""
    x = _inputs(True, torch.Generator().manual_seed(2))

    def step(hidden, weight, rewards):
        adv = gk.group_advantages(rewards, group_size=2, backend=backend, validate=False).advantages[:B]
        out = gk.fused_linear_grpo_loss(hidden, weight, x["ids"], adv, old_logps=x["old"], ref_logps=x["ref"],
                                        cu_seqlens=x["cu_seqlens"], chunk_size=4, backend=backend, validate=False,
                                        **TOKEN_LEVEL)
        logits = (hidden @ weight.t()).detach()
        plain = gk.grpo_loss(logits, x["ids"], adv, old_logps=x["old"], ref_logps=x["ref"],
                             cu_seqlens=x["cu_seqlens"], backend=backend, validate=False, **TOKEN_LEVEL)
        return out.loss, out.metrics["clip_ratio/region"], plain.loss

    torch._dynamo.reset()
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    leaves = [[t.clone().requires_grad_(t.is_floating_point() and t is not x["rewards"]) for t in
               (x["hidden"], x["weight"])] for _ in range(2)]
    eager, traced = step(*leaves[0], x["rewards"]), compiled(*leaves[1], x["rewards"])
    for a, b in zip(eager, traced):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)
    eager[0].backward()
    traced[0].backward()
    for a, b in zip(leaves[0], leaves[1]):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-6, atol=1e-8)

"""Every backend against the fp64 reference, for every option: values, gradients, metrics."""
import zlib

import pytest
import torch

import grpo_kernels as gk
from cases import OPTION_IDS, make_case, reference_result
from conftest import BACKENDS
from helpers import DEVICE, assert_close, assert_grad_close, to_device


def run_backend(case, backend, **extra):
    logits = case.logits.clone().requires_grad_(True)
    out = gk.grpo_loss(logits, case.ids, case.advantages, backend=backend, **case.kwargs(), **extra)
    out.loss.backward()
    return out, logits.grad


def check_against_reference(out, grad, ref, *, grad_rel):
    assert out.loss.dtype == torch.float32 and out.loss.dim() == 0
    assert_close(out.loss, ref["loss"], rtol=1e-5, atol=1e-6, name="loss")
    assert_grad_close(grad, ref["grad"], rel=grad_rel)
    assert_close(out.per_token_loss, ref["per_token_loss"], rtol=1e-5, atol=1e-6, name="per_token_loss")
    assert_close(out.logps, ref["logps"], rtol=1e-5, atol=1e-5, name="logps")
    assert_close(out.entropy, ref["entropy"], rtol=1e-5, atol=1e-5, name="entropy")
    assert set(out.metrics) == set(ref["metrics"])
    for key, value in ref["metrics"].items():
        assert out.metrics[key].dtype == torch.float32, key
        assert_close(out.metrics[key], value, rtol=1e-5, atol=1e-6, name=key)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("option", OPTION_IDS)
def test_fp32_matches_reference(backend, option):
    case = make_case(option, seed=zlib.crc32(option.encode()) % 1000)
    ref = reference_result(case)
    out, grad = run_backend(to_device(case), backend)
    assert grad.dtype == torch.float32
    check_against_reference(out, grad, ref, grad_rel=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("option", ["grpo", "dapo_num_items", "cispo", "sapo", "gspo", "k3_bias_corr", "everything"])
def test_bf16_matches_reference(backend, option):
    # The reference runs in fp64 on the same bf16 values, so loss, log-probs and metrics differ
    # only by fp32 accumulation (1e-5). The gradient is stored in bf16 (8 significant bits): each
    # element carries a rounding error up to half an ulp, 2^-8 of itself, and an fp32 difference
    # before rounding can flip the rounding direction, hence one ulp, 2^-7 of the largest element.
    case = make_case(option, dtype=torch.bfloat16, seed=7)
    ref = reference_result(case)
    out, grad = run_backend(to_device(case), backend)
    assert grad.dtype == torch.bfloat16
    check_against_reference(out, grad, ref, grad_rel=2.0 ** -7)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp16_storage(backend):
    case = make_case("grpo", dtype=torch.float16, seed=3)
    ref = reference_result(case)
    out, grad = run_backend(to_device(case), backend)
    assert grad.dtype == torch.float16
    check_against_reference(out, grad, ref, grad_rel=2.0 ** -10)  # fp16: 11 bits, one ulp


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("vocab", [1000, 50257, 129920])
def test_selective_logprobs_odd_vocab(backend, vocab):
    from cases import make_logits
    from grpo_kernels import reference as R

    rows = 3 if backend == "triton" and DEVICE == "cpu" else 8
    ids = torch.randint(0, vocab, (1, rows))
    logits = make_logits(1, rows, vocab, seed=vocab, scale=4.0, ids=ids)
    logits[0, 0, :] = logits[0, 0, :] * 2500.0  # magnitude ~1e4
    expected_logp, expected_entropy = R.logprobs_and_entropy(logits.double(), ids)
    x = logits.to(DEVICE).detach().requires_grad_(True)
    logp, entropy = gk.selective_logprobs(x, ids.to(DEVICE), return_entropy=True, backend=backend)
    (logp.sum() + 0.5 * entropy.sum()).backward()
    ref_x = logits.double().requires_grad_(True)
    rl, re = R.logprobs_and_entropy(ref_x, ids)
    (rl.sum() + 0.5 * re.sum()).backward()
    assert_close(logp, expected_logp, rtol=1e-5, atol=1e-4, name="logp")
    assert_close(entropy, expected_entropy, rtol=1e-5, atol=1e-4, name="entropy")
    assert_grad_close(x.grad, ref_x.grad, rel=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_inplace_backward_matches(backend):
    case = to_device(make_case("everything", seed=5))
    _, grad = run_backend(case, backend)
    logits = case.logits.clone().requires_grad_(True)
    buffer = logits * 1.0  # a non-leaf buffer the backward may overwrite
    out = gk.grpo_loss(buffer, case.ids, case.advantages, backend=backend, inplace_backward=True, **case.kwargs())
    out.loss.backward()
    assert torch.equal(logits.grad, grad)
    assert torch.equal(buffer.detach(), grad), "inplace_backward must leave the gradient in the logits buffer"


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_slice_is_read_in_place(backend):
    """`logits[:, :-1]` (the usual shift) is read through its strides: same numbers, and the
    in-place backward writes into the caller's buffer, which proves no copy was made."""
    case = to_device(make_case("everything", seed=19))
    _, expected_grad = run_backend(case, backend)
    b, t, v = case.logits.shape
    buffer = torch.cat([case.logits, torch.randn(b, 1, v, device=DEVICE)], dim=1)
    leaf = buffer.clone().requires_grad_(True)
    work = leaf * 1.0
    out = gk.grpo_loss(work[:, :-1], case.ids, case.advantages, backend=backend, inplace_backward=True,
                       **case.kwargs())
    out.loss.backward()
    assert torch.equal(leaf.grad[:, :-1], expected_grad)
    assert torch.all(leaf.grad[:, -1] == 0)
    assert torch.equal(work.detach()[:, :-1], expected_grad)

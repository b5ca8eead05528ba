"""fused_linear_grpo_loss / fused_linear_selective_logprobs against the reference on materialised logits."""
import pytest
import torch

import grpo_kernels as gk
from cases import OPTION_IDS, make_case
from conftest import BACKENDS
from grpo_kernels import reference as R
from helpers import DEVICE, assert_close, assert_grad_close

H = 16


def linear_inputs(case, seed=5, dtype=torch.float64):
    b, t, v = case.logits.shape
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(b, t, H, dtype=torch.float64, generator=g)
    weight = torch.randn(v, H, dtype=torch.float64, generator=g) * 0.5
    bias = torch.randn(v, dtype=torch.float64, generator=g)
    return hidden.to(dtype), weight.to(dtype), bias.to(dtype)


def reference_linear(case, hidden, weight, bias):
    h, w, bb = (x.detach().double().requires_grad_(True) for x in (hidden, weight, bias))
    as64 = lambda x: None if x is None else x.double()  # noqa: E731
    terms, _, _ = R.grpo_loss(h @ w.T + bb, case.ids, case.advantages.double(), mask=case.mask,
                              old_logps=as64(case.old_logps), ref_logps=as64(case.ref_logps),
                              sampling_logps=as64(case.sampling_logps), is_weights=as64(case.is_weights),
                              num_items_in_batch=case.num_items_in_batch, config=case.config)
    terms.loss.backward()
    return terms, h.grad, w.grad, bb.grad


def run_linear(case, hidden, weight, bias, backend, **kw):
    h, w, bb = (x.detach().to(DEVICE).clone().requires_grad_(True) for x in (hidden, weight, bias))
    dev = lambda x: None if x is None else x.to(DEVICE)  # noqa: E731
    out = gk.fused_linear_grpo_loss(
        h, w, dev(case.ids), dev(case.advantages), bias=bb, mask=dev(case.mask), old_logps=dev(case.old_logps),
        ref_logps=dev(case.ref_logps), sampling_logps=dev(case.sampling_logps), is_weights=dev(case.is_weights),
        num_items_in_batch=case.num_items_in_batch, config=case.config, backend=backend, **kw)
    out.loss.backward()
    return out, h.grad, w.grad, bb.grad


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("option", OPTION_IDS)
def test_matches_reference_on_materialised_logits(backend, option):
    case = make_case(option, seed=3)
    hidden, weight, bias = linear_inputs(case)
    terms, gh, gw, gb = reference_linear(case, hidden, weight, bias)
    out, h, w, b = run_linear(case, hidden.float(), weight.float(), bias.float(), backend, chunk_size=9)
    assert_close(out.loss, terms.loss, rtol=1e-5, atol=1e-6, name="loss")
    assert_grad_close(h, gh, name="d_hidden")
    assert_grad_close(w, gw, name="d_weight")
    assert_grad_close(b, gb, name="d_bias")
    assert_close(out.per_token_loss, terms.per_token_loss, rtol=1e-5, atol=1e-6, name="per_token_loss")
    for key, value in terms.metrics.items():
        assert_close(out.metrics[key], value, rtol=1e-5, atol=1e-6, name=key)


@pytest.mark.parametrize("backend", BACKENDS)
# Token-level options take the row-block path for sequences longer than a chunk; gspo the recompute.
@pytest.mark.parametrize("option", ["gspo", "everything", "entropy_mask_bonus", "grpo", "trl_defaults_kl",
                                    "per_token_adv"])
def test_independent_of_chunk_size(backend, option):
    case = make_case(option, seed=4)
    hidden, weight, bias = (x.float() for x in linear_inputs(case))
    results = [run_linear(case, hidden, weight, bias, backend, chunk_size=c) for c in (1, 9, 10_000)]
    first = results[0]
    # A CPU GEMM blocks differently for different row counts, so a logit may differ by one
    # rounding between chunk sizes; on the GPU the Triton path must be bitwise the same.
    bitwise = DEVICE == "cuda" and backend == "triton"
    for other in results[1:]:
        for a, b_ in zip((other[0].loss,) + other[1:], (first[0].loss,) + first[1:]):
            if bitwise:
                assert torch.equal(a, b_)
            else:
                torch.testing.assert_close(a, b_, rtol=0, atol=5e-6 * float(b_.detach().abs().max()) + 1e-8)


@pytest.mark.parametrize("backend", BACKENDS)
def test_packed_equals_padded(backend):
    case = make_case("gspo", seed=6)
    case.mask[:] = True
    hidden, weight, bias = (x.float() for x in linear_inputs(case))
    out, h, w, b = run_linear(case, hidden, weight, bias, backend, chunk_size=10)
    bsz, t, _ = hidden.shape
    cu = torch.arange(0, (bsz + 1) * t, t, dtype=torch.int32, device=DEVICE)
    hp, wp, bp = (x.detach().to(DEVICE).clone().requires_grad_(True) for x in (hidden.reshape(-1, H), weight, bias))
    out_p = gk.fused_linear_grpo_loss(hp, wp, case.ids.reshape(-1).to(DEVICE), case.advantages.to(DEVICE), bias=bp,
                                      old_logps=case.old_logps.reshape(-1).to(DEVICE), cu_seqlens=cu,
                                      config=case.config, backend=backend, chunk_size=10)
    out_p.loss.backward()
    torch.testing.assert_close(out_p.loss, out.loss, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(hp.grad, h.reshape(-1, H), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(wp.grad, w, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
def test_frozen_weight_and_no_bias(backend):
    case = make_case("k3", seed=7)
    hidden, weight, _ = linear_inputs(case)
    terms, gh, _, _ = reference_linear(case, hidden, weight, torch.zeros(weight.shape[0], dtype=torch.float64))
    h = hidden.float().to(DEVICE).requires_grad_(True)
    w = weight.float().to(DEVICE)  # frozen lm_head (e.g. LoRA)
    dev = lambda x: None if x is None else x.to(DEVICE)  # noqa: E731
    out = gk.fused_linear_grpo_loss(h, w, dev(case.ids), dev(case.advantages), mask=dev(case.mask),
                                    old_logps=dev(case.old_logps), ref_logps=dev(case.ref_logps),
                                    config=case.config, backend=backend)
    out.loss.backward()
    assert w.grad is None
    assert_grad_close(h.grad, gh, name="d_hidden")


@pytest.mark.parametrize("backend", BACKENDS)
def test_tied_embeddings(backend):
    """The lm_head is the embedding matrix: its gradient is the sum of both uses."""
    case = make_case("grpo", seed=8, v=29)
    torch.manual_seed(0)
    emb = torch.nn.Embedding(29, H).to(DEVICE)
    proj = torch.nn.Linear(H, H).to(DEVICE)
    inputs = torch.randint(0, 29, case.ids.shape, device=DEVICE)
    dev = lambda x: None if x is None else x.to(DEVICE)  # noqa: E731

    def loss_with(fused):
        emb.zero_grad()
        proj.zero_grad()
        hidden = torch.tanh(proj(emb(inputs)))
        if fused:
            out = gk.fused_linear_grpo_loss(hidden, emb.weight, dev(case.ids), dev(case.advantages),
                                            mask=dev(case.mask), old_logps=dev(case.old_logps), config=case.config,
                                            backend=backend)
        else:
            out = gk.grpo_loss(hidden @ emb.weight.T, dev(case.ids), dev(case.advantages), mask=dev(case.mask),
                               old_logps=dev(case.old_logps), config=case.config, backend=backend)
        out.loss.backward()
        return emb.weight.grad.clone(), proj.weight.grad.clone()

    (e1, p1), (e2, p2) = loss_with(True), loss_with(False)
    torch.testing.assert_close(e1, e2, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(p1, p2, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
def test_weight_grad_in_weight_dtype(backend):
    case = make_case("dapo", seed=9)
    hidden, weight, bias = (x.float() for x in linear_inputs(case))
    _, _, w32, _ = run_linear(case, hidden, weight, bias, backend, chunk_size=9)
    _, _, w_native, _ = run_linear(case, hidden, weight, bias, backend, chunk_size=9,
                                   accumulate_weight_grad_fp32=False)
    assert w_native.dtype == torch.float32
    torch.testing.assert_close(w_native, w32, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_matches_materialised_bf16_logits(backend):
    """In bf16 the logits GEMM itself rounds (2^-8 relative). The fused path must agree with
    grpo_loss on the same bf16 logits (any difference is GEMM blocking: a few bf16 ulps on a
    logit), and with the fp64 reference within what bf16 logits allow."""
    case = make_case("everything", seed=10)
    hidden, weight, bias = (x.to(torch.bfloat16) for x in linear_inputs(case))
    out, h, w, b = run_linear(case, hidden, weight, bias, backend, chunk_size=9)
    assert h.dtype == w.dtype == b.dtype == torch.bfloat16
    hm, wm, bm = (x.detach().to(DEVICE).clone().requires_grad_(True) for x in (hidden, weight, bias))
    dev = lambda x: None if x is None else x.to(DEVICE)  # noqa: E731
    ref = gk.grpo_loss(torch.nn.functional.linear(hm, wm, bm), dev(case.ids), dev(case.advantages), backend=backend,
                       mask=dev(case.mask), old_logps=dev(case.old_logps), ref_logps=dev(case.ref_logps),
                       sampling_logps=dev(case.sampling_logps), config=case.config)
    ref.loss.backward()
    assert_close(out.loss, ref.loss, rtol=1e-2, atol=1e-3, name="loss vs materialised bf16")
    assert_grad_close(h, hm.grad, rel=2 ** -6, name="d_hidden")
    assert_grad_close(w, wm.grad, rel=2 ** -6, name="d_weight")
    terms, *_ = reference_linear(case, hidden, weight, bias)
    assert_close(out.loss, terms.loss, rtol=5e-2, atol=5e-3, name="loss vs fp64 reference")


@pytest.mark.parametrize("backend", BACKENDS)
def test_selective_logprobs_values_and_grads(backend):
    case = make_case("grpo", seed=11)
    hidden, weight, bias = linear_inputs(case)
    h, w, bb = (x.detach().clone().requires_grad_(True) for x in (hidden, weight, bias))
    logp, ent = R.logprobs_and_entropy(h @ w.T + bb, case.ids, 0.8)
    (logp.sum() + 0.3 * ent.sum()).backward()
    h2, w2, b2 = (x.detach().float().to(DEVICE).clone().requires_grad_(True) for x in (hidden, weight, bias))
    lp, en = gk.fused_linear_selective_logprobs(h2, w2, case.ids.to(DEVICE), bias=b2, temperature=0.8,
                                                return_entropy=True, chunk_size=5, backend=backend)
    (lp.sum() + 0.3 * en.sum()).backward()
    assert_close(lp, logp, rtol=1e-5, atol=1e-5, name="logp")
    assert_close(en, ent, rtol=1e-5, atol=1e-5, name="entropy")
    assert_grad_close(h2.grad, h.grad, name="d_hidden")
    assert_grad_close(w2.grad, w.grad, name="d_weight")
    assert_grad_close(b2.grad, bb.grad, name="d_bias")
    with torch.no_grad():
        again = gk.fused_linear_selective_logprobs(h2, w2, case.ids.to(DEVICE), bias=b2, temperature=0.8,
                                                   chunk_size=5, backend=backend)
    assert torch.equal(again, lp.detach())


def test_module_form():
    case = make_case("grpo", seed=12)
    hidden, weight, bias = (x.float() for x in linear_inputs(case))
    loss_fn = gk.FusedLinearGRPOLoss(gk.GRPOLossConfig(loss_type="grpo"), backend="torch", chunk_size=7)
    out = loss_fn(hidden, weight, case.ids, case.advantages, bias=bias, mask=case.mask, old_logps=case.old_logps)
    direct = gk.fused_linear_grpo_loss(hidden, weight, case.ids, case.advantages, bias=bias, mask=case.mask,
                                       old_logps=case.old_logps, loss_type="grpo", backend="torch", chunk_size=7)
    assert torch.equal(out.loss, direct.loss)


@pytest.mark.parametrize("change, error, words", [
    (lambda h, w, b: dict(weight=w[:, :-1]), ValueError, "weight must be (V, H) with H = hidden.shape[-1] = 16"),
    (lambda h, w, b: dict(weight=w.double()), TypeError, "weight dtype torch.float64 must match hidden dtype"),
    (lambda h, w, b: dict(bias=b[:-1]), ValueError, "bias must have shape (37,)"),
    (lambda h, w, b: dict(hidden=h[0]), ValueError, "hidden must be padded (B, T, H)"),
    (lambda h, w, b: dict(chunk_size=0), ValueError, "chunk_size must be 'auto' or a positive int"),
])
def test_bad_inputs(change, error, words):
    case = make_case("grpo", seed=1)
    hidden, weight, bias = (x.float() for x in linear_inputs(case))
    kw = dict(hidden=hidden, weight=weight, bias=bias, chunk_size="auto")
    kw.update(change(hidden, weight, bias))
    with pytest.raises(error) as info:
        gk.fused_linear_grpo_loss(kw.pop("hidden"), kw.pop("weight"), case.ids, case.advantages, backend="torch",
                                  **kw)
    assert words in str(info.value)

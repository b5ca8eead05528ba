"""The invariants of docs/math.md's last section, for every backend."""
import pytest
import torch

import grpo_kernels as gk
from cases import make_case
from conftest import BACKENDS
from helpers import DEVICE, to_device
from test_parity import run_backend


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "sapo", "cispo"])
def test_on_policy_ratio_is_exactly_one(backend, loss_type):
    case = to_device(make_case("grpo", seed=11))
    case.old_logps = None
    out = gk.grpo_loss(case.logits, case.ids, case.advantages, backend=backend, mask=case.mask, loss_type=loss_type,
                       epsilon_high=1.5 if loss_type == "cispo" else None)
    assert out.metrics["ratio/mean"].item() == 1.0
    assert out.metrics["ratio/max"].item() == 1.0
    for key in ("clip_ratio/low", "clip_ratio/high", "clip_ratio/region"):
        assert out.metrics[key].item() == 0.0, key


@pytest.mark.parametrize("backend", BACKENDS)
def test_deterministic_bitwise(backend):
    case = to_device(make_case("everything", seed=2))
    (o1, g1), (o2, g2) = run_backend(case, backend), run_backend(case, backend)
    assert torch.equal(o1.loss, o2.loss) and torch.equal(g1, g2)
    assert torch.equal(o1.per_token_loss, o2.per_token_loss)


@pytest.mark.parametrize("backend", BACKENDS)
def test_row_depends_only_on_itself(backend):
    """logp, entropy and dlogits of a row are bitwise the same alone or inside a batch."""
    case = to_device(make_case("grpo", b=3, t=5, v=53, seed=4))
    full = case.logits.clone().requires_grad_(True)
    logp, ent = gk.selective_logprobs(full, case.ids, return_entropy=True, backend=backend)
    (logp * 0.7 + ent * 0.3).sum().backward()
    b, t = 1, 2
    alone = case.logits[b:b + 1, t:t + 1].clone().requires_grad_(True)
    lp1, en1 = gk.selective_logprobs(alone, case.ids[b:b + 1, t:t + 1], return_entropy=True, backend=backend)
    (lp1 * 0.7 + en1 * 0.3).sum().backward()
    assert torch.equal(lp1[0, 0], logp[b, t]) and torch.equal(en1[0, 0], ent[b, t])
    assert torch.equal(alone.grad[0, 0], full.grad[b, t])


def test_torch_backend_chunk_size_invariant(monkeypatch):
    from grpo_kernels.ops import torch_backend

    case = to_device(make_case("everything", seed=8))
    o1, g1 = run_backend(case, "torch")
    monkeypatch.setitem(torch_backend.CHUNK_BYTES, "cpu", 3 * 8 * case.logits.shape[-1])  # 3 fp64 rows per chunk
    o2, g2 = run_backend(case, "torch")
    assert torch.equal(o1.loss, o2.loss) and torch.equal(g1, g2)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("option", ["grpo", "gspo", "everything", "per_token_adv"])
def test_masked_tokens_contribute_nothing(backend, option):
    case = to_device(make_case(option, seed=6))
    out, grad = run_backend(case, backend)
    off = ~case.mask
    assert torch.all(grad[off] == 0), "masked rows must get exactly zero gradient"
    assert torch.all(out.per_token_loss[off] == 0) and torch.all(out.logps[off] == 0)
    # Garbage at masked positions (inf, NaN, other ids) must change nothing.
    case.logits = case.logits.clone()
    case.logits[off] = float("nan")
    case.ids = case.ids.masked_fill(off, 0)
    for name in ("old_logps", "ref_logps", "sampling_logps"):
        x = getattr(case, name)
        if x is not None:
            setattr(case, name, x.masked_fill(off, float("-inf")))
    if case.advantages.dim() == 2:
        case.advantages = case.advantages.masked_fill(off, 1e3)
    out2, grad2 = run_backend(case, backend)
    assert torch.equal(out.loss, out2.loss)
    assert torch.equal(grad[case.mask], grad2[case.mask]) and torch.all(grad2[off] == 0)
    for key in out.metrics:
        assert torch.equal(out.metrics[key], out2.metrics[key]), key


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dapo", "luspo", "sapo"])
def test_all_masked_batch_gives_zero(backend, loss_type):
    case = to_device(make_case("k3", seed=1))
    case.mask = torch.zeros_like(case.mask)
    logits = case.logits.clone().requires_grad_(True)
    out = gk.grpo_loss(logits, case.ids, case.advantages, mask=case.mask, old_logps=case.old_logps,
                       ref_logps=case.ref_logps, beta=0.1, entropy_coef=0.1, loss_type=loss_type, backend=backend)
    out.loss.backward()
    assert out.loss.item() == 0.0
    assert torch.all(logits.grad == 0)
    assert all(torch.isfinite(v) for v in out.metrics.values())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("option", ["grpo", "gspo", "dr_grpo", "everything", "per_token_adv", "gspo_bias_corr",
                                    "vespo_is_token", "vespo_seq_is_weights", "softcap_scale"])
def test_packed_equals_padded(backend, option):
    case = to_device(make_case(option, seed=9))
    out, grad = run_backend(case, backend)
    lengths = case.mask.sum(1).tolist()
    # Pack only the valid tokens of right-aligned... here: take each row's first L tokens after
    # moving the valid ones to the front, so the padded run is the same batch.
    order = torch.argsort((~case.mask).int(), dim=1, stable=True)
    pick = lambda x: torch.gather(x, 1, order)  # noqa: E731
    b, t, v = case.logits.shape
    sorted_logits = torch.gather(case.logits, 1, order.unsqueeze(-1).expand(b, t, v))
    keep = torch.arange(t, device=DEVICE).unsqueeze(0) < torch.tensor(lengths, device=DEVICE).unsqueeze(1)
    packed = lambda x: None if x is None else pick(x)[keep]  # noqa: E731
    cu = torch.tensor([0] + lengths, device=DEVICE).cumsum(0).to(torch.int32)
    logits = sorted_logits[keep].clone().requires_grad_(True)
    adv = case.advantages if case.advantages.dim() == 1 else packed(case.advantages)
    per_sequence = case.is_weights is not None and case.is_weights.dim() == 1
    out_p = gk.grpo_loss(logits, packed(case.ids), adv, cu_seqlens=cu, old_logps=packed(case.old_logps),
                         ref_logps=packed(case.ref_logps), sampling_logps=packed(case.sampling_logps),
                         is_weights=case.is_weights if per_sequence else packed(case.is_weights),
                         num_items_in_batch=case.num_items_in_batch, config=case.config, backend=backend)
    out_p.loss.backward()
    torch.testing.assert_close(out_p.loss, out.loss, rtol=1e-6, atol=1e-7)
    assert torch.equal(out_p.logps, packed(out.logps)) and torch.equal(out_p.entropy, packed(out.entropy))
    torch.testing.assert_close(logits.grad, torch.gather(grad, 1, order.unsqueeze(-1).expand(b, t, v))[keep],
                               rtol=1e-6, atol=1e-8)
    for key in out.metrics:
        torch.testing.assert_close(out_p.metrics[key], out.metrics[key], rtol=1e-6, atol=1e-7, msg=key)

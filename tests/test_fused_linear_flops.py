"""The fused-linear path runs at the GEMM floor: 6·N·H·V FLOPs (2 forward, 4 backward), counted at
dispatch over every matrix product it runs, whatever the sequence length for token-level losses.

torch.utils.flop_counter.FlopCounterMode does not count `addmm_` (the d_weight update), so this
counter is our own: it is checked first against products whose FLOPs are known by hand.
"""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import grpo_kernels as gk

aten = torch.ops.aten


class MatmulFlops(TorchDispatchMode):
    """2·m·k·n per (m, k) @ (k, n) product, for mm/addmm/bmm/baddbmm, in-place and out= included."""

    def __init__(self):
        super().__init__()
        self.flops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        packet = func.overloadpacket
        if packet in (aten.mm, aten.addmm, aten.addmm_):
            a, b = (args[0], args[1]) if packet is aten.mm else (args[1], args[2])
            self.flops += 2 * a.shape[0] * a.shape[1] * b.shape[1]
        elif packet in (aten.bmm, aten.baddbmm, aten.baddbmm_):
            a, b = (args[0], args[1]) if packet is aten.bmm else (args[1], args[2])
            self.flops += 2 * a.shape[0] * a.shape[1] * a.shape[2] * b.shape[2]
        return func(*args, **kwargs)


def test_counter_against_hand_counts():
    a, b, c = torch.randn(3, 4), torch.randn(4, 5), torch.randn(3, 5)
    with MatmulFlops() as counter:
        a @ b                                   # mm: 2·3·4·5
        c.addmm_(a, b)                          # addmm_: the in-place update FlopCounterMode misses
        torch.mm(a, b, out=torch.empty(3, 5))   # out= variant
        torch.nn.functional.linear(a, b.t(), torch.zeros(5))  # addmm through linear
        torch.randn(2, 3, 4) @ torch.randn(2, 4, 5)           # bmm: 2·2·3·4·5
    assert counter.flops == 4 * (2 * 3 * 4 * 5) + 2 * 2 * 3 * 4 * 5


def fused_linear_flops(config, seq_len, chunk_rows, backend="torch"):
    b, h, v = 2, 16, 64
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(b, seq_len, h, generator=g, requires_grad=True)
    weight = (torch.randn(v, h, generator=g) / h ** 0.5).requires_grad_(True)
    ids = torch.randint(0, v, (b, seq_len), generator=g)
    with torch.no_grad():
        logp = gk.fused_linear_selective_logprobs(hidden, weight, ids)
    old = logp + 0.1 * torch.randn(b, seq_len, generator=g)
    with MatmulFlops() as counter:
        out = gk.fused_linear_grpo_loss(hidden, weight, ids, torch.tensor([1.0, -0.5]), old_logps=old,
                                        ref_logps=old, config=config, chunk_size=chunk_rows, backend=backend)
        out.loss.backward()
    return counter.flops, 6 * b * seq_len * h * v


@pytest.mark.parametrize("backend", [b for b in ("torch", "cpp") if b in gk.available_backends()])
@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "cispo"])
def test_token_level_long_sequences_cost_six_nhv(loss_type, backend):
    """Sequences 4x longer than a chunk: each row block goes forward and backward once."""
    cfg = gk.GRPOLossConfig(loss_type=loss_type, beta=0.04)
    flops, floor = fused_linear_flops(cfg, seq_len=64, chunk_rows=16, backend=backend)
    assert abs(flops - floor) <= 0.01 * floor, (flops, floor)


def test_sequence_level_that_fits_costs_six_nhv():
    cfg = gk.GRPOLossConfig(loss_type="grpo", importance_sampling_level="sequence")
    flops, floor = fused_linear_flops(cfg, seq_len=64, chunk_rows=128)
    assert abs(flops - floor) <= 0.01 * floor, (flops, floor)


def test_sequence_level_longer_than_a_chunk_recomputes_its_logits():
    """GSPO needs a sequence's every log-prob before any gradient: the recompute is the price (8·N·H·V)."""
    cfg = gk.GRPOLossConfig(loss_type="grpo", importance_sampling_level="sequence")
    flops, floor = fused_linear_flops(cfg, seq_len=64, chunk_rows=16)
    assert flops == floor * 8 // 6

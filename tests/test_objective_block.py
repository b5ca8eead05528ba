"""The CUDA objective's block algorithm, checked on the CPU.

csrc/cuda/objective.cu runs grpo_math.h's objective_sequence_by with a thread block per sequence:
each thread strides over the rows, and the fp64 sums merge in block tree reductions. The C++
extension's test-only objective_block_emulation runs the same pieces with the block's threads one
after another and its reductions in the block's order (csrc/cpu/objective.cpp), so every loss
option's decomposition (the sequence sums, the GSPO pass through the sequence mean, the ratio's
max-reduction) is checked here against the fp64 torch backend, as the GPU run would be.
"""
import pytest
import torch

from cases import OPTION_IDS, make_case
from helpers import prepared_objective
from grpo_kernels.ops.dispatch import backend_module

_C = pytest.importorskip("grpo_kernels._C", reason="the C++ extension is not built")

# Unequal sequences over the case's 4 x 50 tokens: one shorter than a warp, one of 3, two long ones.
CU_SEQLENS = torch.tensor([0, 17, 20, 130, 200])


def _emulate(prep, params, threads, rows, seqs):
    buffers = [0 if t is None else t.data_ptr() for t in prep.buffers()]
    _C.objective_block_emulation(buffers, params.ints, params.floats, *rows, *seqs, prep.adv_per_token,
                                 prep.weights_per_seq, threads)


@pytest.mark.parametrize("threads", [32, 96])  # one warp; three (the second butterfly pads with identity)
@pytest.mark.parametrize("option", OPTION_IDS)
def test_block_algorithm_matches_fp64(option, threads):
    case = make_case(option, b=4, t=50, v=7, seed=4)
    want = prepared_objective(case, torch.float64, poison=False, cu_seqlens=CU_SEQLENS)
    n = want.logp.numel()
    backend_module("torch").objective_pass(want, case.config.params, (0, n), (0, 4))
    got = prepared_objective(case, cu_seqlens=CU_SEQLENS)
    _emulate(got, case.config.params, threads, (0, n), (0, 4))
    for name in ("per_token_loss", "g_logp", "g_entropy", "partials"):
        value = getattr(got, name)
        assert torch.isfinite(value).all(), f"{name} not written in full"
        torch.testing.assert_close(value.double(), getattr(want, name), rtol=2e-5, atol=2e-6, msg=name)


def test_block_algorithm_over_a_row_range():
    """A token-level pass over part of the rows (rows [60, 170) cut sequences 2 and 3) touches only
    those rows and adds their sums to the partials, as the CPU loop does."""
    case = make_case("dapo", b=4, t=50, v=7, seed=5)
    params = case.config.params
    assert not params.couples_tokens, "a row range needs an option whose sequences may be split"
    want, got = (prepared_objective(case, cu_seqlens=CU_SEQLENS) for _ in range(2))
    _C.objective([0 if t is None else t.data_ptr() for t in want.buffers()], params.ints, params.floats, 60, 170,
                 2, 4, want.adv_per_token, want.weights_per_seq, 0)
    _emulate(got, params, 64, (60, 170), (2, 4))
    inside = torch.zeros(200, dtype=torch.bool)
    inside[60:170] = True
    for name in ("per_token_loss", "g_logp", "g_entropy"):
        value = getattr(got, name)
        assert torch.isnan(value[~inside]).all(), f"{name} written outside the pass's rows"
        torch.testing.assert_close(value[inside], getattr(want, name)[inside], rtol=1e-6, atol=1e-7, msg=name)
    torch.testing.assert_close(got.partials, want.partials, rtol=1e-6, atol=1e-7)
    assert (got.partials[:2] == 0).all() and (got.partials[2:, 1] > 0).all()


@pytest.mark.parametrize("threads", [0, 16, 100, 2048])
def test_block_emulation_rejects_a_block_size_cuda_cannot_run(threads):
    case = make_case("grpo", b=4, t=50, v=7)
    prep = prepared_objective(case, cu_seqlens=CU_SEQLENS)
    with pytest.raises(ValueError, match="multiple of 32"):
        _emulate(prep, case.config.params, threads, (0, 200), (0, 4))

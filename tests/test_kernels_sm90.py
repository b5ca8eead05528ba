"""Every Triton kernel variant the dispatch can launch compiles for Hopper (sm_90), and for
Blackwell (sm_100) where the ptxas that triton ships knows it, without a GPU, with no register spill
and shared memory within the limit, and the committed resource table
benchmarks/results/kernels_sm90.csv matches a regeneration. The 218 variants, both archs, take 164 s
with an empty triton cache on the quiet 2-core CI machine (86 s for sm_90 alone), about 7 s warm.

The interpreter that runs our kernels in the other tests accepts code the real compiler rejects and
says nothing of registers; this compiles the real thing. The variants are recorded by running the
launch wrappers (benchmarks/kernel_resources.py), so a kernel or constexpr added later is covered
without a change here. One child process records and compiles everything, once per session; triton's
on-disk cache makes a rerun with unchanged kernels cost seconds per hundred variants.
"""
import importlib
import json
import os
import pkgutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from benchmarks import kernel_resources as KR  # noqa: E402

pytest.importorskip("triton")


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """The --check run's variants, rows, failures and table mismatches (one child process, no interpreter)."""
    path = tmp_path_factory.mktemp("kernels") / "result.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "benchmarks.kernel_resources", "--check", "--json", str(path)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    if not path.exists():
        pytest.fail(f"kernel_resources --check crashed (exit {proc.returncode}):\n{proc.stderr[-6000:]}")
    with open(path) as f:
        return json.load(f)


def _variants_of(compiled, kernel):
    return [v for v in compiled["variants"] if v["kernel"].endswith(":" + kernel)]


def test_every_variant_compiles_without_spills(compiled):
    assert compiled["rows"], "nothing was compiled"
    assert not compiled["failures"], "\n".join(compiled["failures"])


def test_committed_table_matches_a_regeneration(compiled):
    if compiled["note"]:  # registers and spills depend on the compiler: compare like with like
        pytest.skip(compiled["note"])
    assert not compiled["mismatches"], (
        "benchmarks/results/kernels_sm90.csv is stale; regenerate it with "
        "`python -m benchmarks.kernel_resources --write`:\n" + "\n".join(compiled["mismatches"][:20]))


def test_every_kernel_is_launched_by_the_recorder(compiled):
    """Every @triton.jit kernel (a `*_kernel` of grpo_kernels.ops.triton) has recorded variants: a new
    kernel the recorded workload never reaches would otherwise go uncompiled."""
    import grpo_kernels.ops.triton as package

    kernels = set()
    for info in pkgutil.iter_modules(package.__path__):
        module = importlib.import_module(f"{package.__name__}.{info.name}")
        kernels |= {f"{module.__name__}:{name}" for name, obj in vars(module).items()
                    if name.endswith("_kernel") and hasattr(obj, "fn") and obj.fn.__module__ == module.__name__}
    assert kernels, "found no kernels"
    assert kernels <= {v["kernel"] for v in compiled["variants"]}


def test_variants_span_the_dispatch_options(compiled):
    """The recorded workload reaches what the dispatch chooses from: logit dtypes, entropy, softcap,
    aligned and odd vocabularies, each BLOCK_T bucket, every advantage mode."""
    from grpo_kernels.ops.triton.objective import BLOCK_T_BUCKETS
    from grpo_kernels.options import AdvantageMode

    dtypes, flags = ("fp32", "bf16", "fp16"), (False, True)
    fwd = {(v["signature"]["logits_ptr"], v["constexprs"]["WITH_ENTROPY"], v["constexprs"]["HAS_CAP"],
            "V" in v["aligned"]) for v in _variants_of(compiled, "_logprobs_fwd_kernel")}
    assert fwd >= {(f"*{d}", e, c, a) for d in dtypes for e in flags for c in flags for a in flags}
    bwd = {(v["signature"]["out_ptr"], v["constexprs"]["HAS_GRAD_ENTROPY"], v["constexprs"]["HAS_CAP"])
           for v in _variants_of(compiled, "_logprobs_bwd_kernel")}
    assert bwd >= {(f"*{d}", g, c) for d in dtypes for g in flags for c in flags}
    objective = _variants_of(compiled, "_grpo_objective_kernel")
    assert {v["constexprs"]["BLOCK_T"] for v in objective} == set(BLOCK_T_BUCKETS)
    assert {v["constexprs"]["MODE"] for v in _variants_of(compiled, "_group_advantages_kernel")} == {
        int(m) for m in AdvantageMode}


def test_largest_vocabulary_blocks_load_logits_128_bits_at_a_time(compiled):
    """With a vocabulary that is a multiple of 16, the log-prob kernels read logits with 16-byte loads."""
    rows = [r for r in compiled["rows"] if r["kernel"].startswith("_logprobs") and "V%16=0" in r["variant"]
            and "BLOCK_V=4096" in r["variant"]]
    assert rows and all(r["logits_128bit_loads"] == "yes" for r in rows), [r for r in rows if
                                                                          r["logits_128bit_loads"] != "yes"]


def test_block_t_buckets():
    from grpo_kernels.ops.triton.objective import BLOCK_T_BUCKETS, block_t_for

    assert [block_t_for(n) for n in (0, 1, 128, 129, 512, 513, 10 ** 6)] == [128, 128, 128, 512, 512, 512, 512]
    assert BLOCK_T_BUCKETS == tuple(sorted(BLOCK_T_BUCKETS))


def test_max_blocks_per_sm():
    assert KR.max_blocks_per_sm(32, 256, 0) == 8                   # threads and registers: 8 x 256 = 2048
    assert KR.max_blocks_per_sm(255, 128, 0) == 2                  # 255 -> 256 regs/thread: 65536 / (256 x 128)
    assert KR.max_blocks_per_sm(16, 32, 0) == 32                   # the block cap
    assert KR.max_blocks_per_sm(16, 128, 100 * 1024) == 2          # 228 KiB / (100 + 1 KiB)
    assert KR.max_blocks_per_sm(40, 256, 1024) == 6                # 40 x 32 = 1280 regs/warp: 65536 / 10240


def test_load_widths_from_sass():
    sass = "LDG.E.128 R4, desc[UR6][R2.64] ;\n LDG.E.U16 R5 ;\n @P0 LDG.E.64.CONSTANT R6 ;\n LDG.E R7 ;\n STG.E.128 R8"
    assert KR._load_widths(sass) == {128: 1, 16: 1, 64: 1, 32: 1}


def test_argument_types_follow_triton_specialisation():
    """The recorder's argument types and alignments are triton's own, where triton exposes them."""
    import torch
    import triton.runtime.jit as jit

    native = getattr(jit, "native_specialize_impl", None)
    if native is None:
        pytest.skip("this triton has no native_specialize_impl")
    from triton.backends.compiler import BaseBackend

    for value in (0, 1, 16, 37, 2 ** 31, 2 ** 40 + 16, 0.5, torch.empty(8, dtype=torch.bfloat16),
                  torch.empty(8)[1:], torch.empty(4, dtype=torch.int64)):
        for specialise in (True, False):  # False: an argument named in the kernel's do_not_specialize
            kind, divisible = KR._arg_type(value, specialise)
            theirs, spec = native(BaseBackend, value, False, specialise, True)
            assert kind == theirs and divisible == (spec == "D"), (value, specialise, kind, divisible, theirs, spec)


def test_cuda_kernel_names_from_demangled_symbols():
    name = "void gk::cuda::(anonymous namespace)::forward_kernel<2, false>(gk::cuda::RowsView, long const*, float*)"
    assert KR._kernel_and_template(name) == ("forward_kernel", "<2, false>")
    assert KR._kernel_and_template("gk::cuda::objective_kernel(gk::cuda::ObjectiveArgs, long, long)") == (
        "objective_kernel", "")

"""`import grpo_kernels` is light: at most 0.3 s on top of `import torch`, nothing printed, and
torch._dynamo (over a second), triton and the trainer's dependencies loaded only when used;
torch.compile still sees the backend choice as a constant."""
import os
import subprocess
import sys


import grpo_kernels

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(grpo_kernels.__file__)))
BUDGET_S = 0.3
RUNS = 5  # the best of up to RUNS fresh interpreters: a busy machine slows some, never speeds one up
LAZY = ("torch._dynamo", "triton", "transformers", "matplotlib", "trl", "tqdm")
PROBE = f"""
import sys, time
t0 = time.perf_counter()
import torch
with_torch = set(sys.modules)  # torch itself may load some of them (tqdm)
t1 = time.perf_counter()
import grpo_kernels
t2 = time.perf_counter()
print(t1 - t0, t2 - t1, ",".join(m for m in {LAZY!r} if m in sys.modules and m not in with_torch))
"""


def fresh(code):
    """`code` in a new interpreter that imports this checkout's grpo_kernels."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p))
    env.pop("PYTHONWARNINGS", None)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env=env)


def test_import_adds_at_most_its_budget_to_torch_and_prints_nothing():
    runs = []
    for _ in range(RUNS):
        out = fresh(PROBE)
        assert out.returncode == 0, out.stderr[-2000:]
        assert out.stderr == "", f"import grpo_kernels printed to stderr:\n{out.stderr[-2000:]}"
        torch_s, increment_s, loaded = out.stdout.split(" ")
        assert loaded.strip() == "", f"import grpo_kernels loaded {loaded.strip()}: import them where they are used"
        runs.append((float(increment_s), float(torch_s)))
        if min(runs)[0] <= BUDGET_S:
            break
    best = min(runs)
    assert best[0] <= BUDGET_S, (
        f"import grpo_kernels took {best[0]:.3f} s after import torch ({best[1]:.3f} s), best of {len(runs)} "
        f"(budget {BUDGET_S} s); see python -X importtime -c 'import grpo_kernels'")


def test_first_call_compiled_with_fullgraph():
    """Compiled before any eager call (nothing memoised yet), the backend choice must not break the graph."""
    out = fresh(
        "import torch, grpo_kernels as gk\n"
        "x = torch.randn(2, 3, 11, requires_grad=True)\n"
        "ids, adv = torch.zeros(2, 3, dtype=torch.long), torch.tensor([1.0, -1.0])\n"
        "step = torch.compile(lambda x: gk.grpo_loss(x, ids, adv, validate=False).loss, backend='aot_eager',\n"
        "                     fullgraph=True)\n"
        "step(x).backward()\n"
        "print('ok', float(x.grad.abs().sum()) > 0)\n")
    assert out.returncode == 0 and "ok True" in out.stdout, out.stderr[-3000:]

"""The install is light: `import grpo_kernels` needs only torch (and numpy, so that torch does
not warn); triton is an extra; the trainer names its extra."""
import os
import runpy
import subprocess
import sys
from unittest import mock

import setuptools

import grpo_kernels

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(grpo_kernels.__file__)))

BLOCK = "import sys\nfor name in ('transformers', 'tqdm', 'matplotlib'):\n    sys.modules[name] = None\n"


def run(code):
    return subprocess.run([sys.executable, "-c", BLOCK + code], capture_output=True, text=True, timeout=300)


def test_kernels_import_without_the_trainer_extra():
    out = run("import torch, grpo_kernels as gk\n"
              "x = torch.randn(2, 3, 11, requires_grad=True)\n"
              "gk.grpo_loss(x, torch.zeros(2, 3, dtype=torch.long), torch.ones(2)).loss.backward()\n"
              "print('ok')")
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-2000:]


def test_trainer_without_its_extra_names_it():
    out = run("import grpo_kernels.trainer")
    assert out.returncode != 0
    assert 'pip install "grpo_kernels[trainer]"' in out.stderr and "transformers and tqdm" in out.stderr


def setup_arguments():
    """What setup.py passes to setuptools.setup (nothing is built)."""
    captured = {}
    with mock.patch.object(setuptools, "setup", lambda **kw: captured.update(kw)):
        runpy.run_path(os.path.join(ROOT, "setup.py"), run_name="__main__")
    return captured


def test_triton_is_an_extra_and_the_tests_bring_it():
    """A CPU-only `pip install .` does not pull triton (~1 GB it cannot run); torch's CUDA wheels
    bring their own. The tests interpret the Triton kernels on CPU, so the test extra brings it."""
    args = setup_arguments()
    names = lambda reqs: {r.split(";")[0].split(">")[0].split("=")[0].split("<")[0].strip() for r in reqs}  # noqa: E731
    assert names(args["install_requires"]) == {"torch", "numpy"}
    extras = args["extras_require"]
    assert set(extras) == {"triton", "trainer", "test", "bench", "gpu", "trl", "verl", "dev"}
    for extra in ("triton", "test", "dev"):
        assert "triton" in names(extras[extra]), extra
    assert {"transformers", "tqdm", "matplotlib"} <= names(extras["trainer"]) <= names(extras["test"])


def test_kernels_without_triton():
    out = subprocess.run([sys.executable, "-c", "import sys\nsys.modules['triton'] = None\n"
                          "import torch, grpo_kernels as gk\n"
                          "x = torch.randn(2, 3, 11, requires_grad=True)\n"
                          "gk.grpo_loss(x, torch.zeros(2, 3, dtype=torch.long), torch.ones(2)).loss.backward()\n"
                          "assert 'triton' not in gk.available_backends()\n"
                          "try:\n"
                          "    gk.grpo_loss(x, torch.zeros(2, 3, dtype=torch.long), torch.ones(2), backend='triton')\n"
                          "except gk.BackendUnavailableError as exc:\n"
                          "    print(exc)\n"], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    assert 'triton is not installed (torch\'s CUDA wheels bring it; otherwise pip install "grpo_kernels[triton]")' \
        in out.stdout

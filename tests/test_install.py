"""The install is light: `import grpo_kernels` needs only torch; the trainer names its extra."""
import subprocess
import sys

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

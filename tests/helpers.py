import hashlib
import os

import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _as_fp64(x) -> torch.Tensor:
    """Tensors keep their values; Python floats (TRL's logged metrics) stay fp64, not fp32."""
    return x.detach().double().cpu() if isinstance(x, torch.Tensor) else torch.as_tensor(x, dtype=torch.float64)


def assert_close(actual, expected, *, rtol=1e-5, atol=1e-6, name=""):
    actual, expected = _as_fp64(actual), _as_fp64(expected)
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), f"{name}: non-finite values {actual}"
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


def assert_grad_close(actual, expected, *, rel=1e-5, name="grad"):
    """Gradients compared at a tolerance relative to their largest element."""
    scale = float(expected.abs().max()) if expected.numel() else 0.0
    assert_close(actual, expected, rtol=0, atol=rel * scale + 1e-9, name=name)


def to_device(case):
    for f in ("logits", "ids", "mask", "advantages", "old_logps", "ref_logps", "sampling_logps", "is_weights"):
        x = getattr(case, f)
        if x is not None:
            setattr(case, f, x.to(DEVICE))
    return case


def subprocess_env(**extra) -> dict:
    """The environment of a child Python process that imports the grpo_kernels this test process
    imported (a checkout under test, not another installed copy), with `extra` set."""
    import grpo_kernels

    root = os.path.dirname(os.path.dirname(os.path.abspath(grpo_kernels.__file__)))
    path = os.environ.get("PYTHONPATH")
    return dict(os.environ, PYTHONPATH=root + (os.pathsep + path if path else ""), **extra)


def snapshot(directory) -> dict:
    """{relative path: SHA-256} of every file under `directory`: equal snapshots, byte-identical files."""
    found = {}
    for root, _, files in os.walk(directory):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                found[os.path.relpath(path, directory)] = hashlib.sha256(f.read()).hexdigest()
    return found

import hashlib
import os

import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def gpu_backends():
    """The backends that run on CUDA tensors here ([] without a GPU)."""
    import grpo_kernels

    return grpo_kernels.available_backends("cuda") if torch.cuda.is_available() else []


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


def prepared_objective(case, backend_dtype=torch.float32, poison=True, cu_seqlens=None):
    """The objective's inputs for `case` (its log-probs drifted from old_logps by a fixed seed, so the
    fp64 run and a backend's get the same ones), in backend_dtype, with the per-token outputs
    NaN-poisoned. Sequences are the case's rows unless cu_seqlens (B + 1,) regroups its B·T tokens."""
    from grpo_kernels.ops import objective_inputs as io

    g = torch.Generator().manual_seed(11)
    logp = (case.old_logps.double() + torch.randn(case.ids.shape, generator=g, dtype=torch.float64) * 0.3).clamp(
        max=-0.01)
    entropy = torch.rand(case.ids.shape, generator=g, dtype=torch.float64) * 3
    b, t = case.ids.shape
    cu = torch.arange(b + 1) * t if cu_seqlens is None else cu_seqlens
    kw = dict(old_logp=case.old_logps, ref_logp=case.ref_logps, sampling_logp=case.sampling_logps,
              is_weights=case.is_weights, num_items_in_batch=case.num_items_in_batch)
    kw = {k: (v.reshape(-1).to(DEVICE) if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    prep = io.prepare(logp.to(backend_dtype).to(DEVICE), entropy.to(backend_dtype).to(DEVICE),
                      case.mask.reshape(-1).to(DEVICE), case.advantages.reshape(-1).to(DEVICE), cu.to(DEVICE),
                      case.config.params, adv_per_token=case.advantages.dim() == 2,
                      weights_per_seq=case.is_weights is not None and case.is_weights.dim() == 1, **kw)
    if poison:
        for buffer in (prep.per_token_loss, prep.g_logp, prep.g_entropy):
            buffer.fill_(float("nan"))
    return prep


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

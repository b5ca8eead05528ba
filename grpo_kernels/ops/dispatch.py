"""Backend selection: which implementation runs an op for tensors on a given device.

`backend="auto"` picks the fastest available for the device; an explicitly requested
backend that cannot run raises `BackendUnavailableError` and never falls back silently.
fp64 inputs are the validation path (fp64 in, fp64 out): only the torch backend computes in
fp64, so `auto` picks it for them and the fp32 kernels refuse fp64 with a TypeError rather
than downcast silently.
"""
from __future__ import annotations

import importlib
import importlib.util
import os

import torch

from .contract import missing_ops

BACKENDS = ("auto", "torch", "triton", "cuda", "cpp")

class BackendUnavailableError(RuntimeError):
    """The requested backend cannot run here (not installed, not built, wrong device)."""


def _triton_usable(device: torch.device):
    """None where the Triton kernels can run: triton installed (torch's CUDA wheels bring it; the
    `triton` extra otherwise) and CUDA tensors, or TRITON_INTERPRET=1. Looks triton up without
    importing it: the import happens with the backend's first use."""
    if importlib.util.find_spec("triton") is None:
        return ("triton is not installed (torch's CUDA wheels bring it; otherwise "
                "pip install \"grpo_kernels[triton]\")")
    if device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
        return None
    return f"triton kernels need CUDA tensors (got {device.type}); set TRITON_INTERPRET=1 to interpret them on CPU"


_MODULES = {"torch": "grpo_kernels.ops.torch_backend", "triton": "grpo_kernels.ops.triton",
            "cpp": "grpo_kernels.ops.cpp", "cuda": "grpo_kernels.ops.cuda"}
# The device type each backend's tensors must live on (None: any).
_DEVICE = {"torch": None, "triton": "cuda", "cpp": "cpu", "cuda": "cuda"}


_LOADED: dict = {}  # name -> module, imported and checked against the contract once


def _module_for(name: str):
    module = _LOADED.get(name)
    if module is None:
        if name not in _MODULES:
            raise BackendUnavailableError(f"backend={name!r} is not one of {sorted(_MODULES)}")
        module = importlib.import_module(_MODULES[name])
        missing = missing_ops(module)
        if missing:
            raise BackendUnavailableError(f"backend {name!r} lacks the contract's ops {missing} (ops/contract.py)")
        _LOADED[name] = module
    return module


def why_unavailable(name: str, device: torch.device):
    """None when `name` can run on `device`, else the reason it cannot."""
    if name == "torch":
        return None
    if name == "triton":
        reason = _triton_usable(device)
        if reason is None and not torch.compiler.is_compiling():
            try:
                _module_for("triton")
            except ImportError as exc:  # triton present but too old for our kernels
                return f"grpo_kernels' triton kernels failed to import: {exc}"
        return reason
    if device.type != _DEVICE[name]:
        return f"it runs on {_DEVICE[name]} tensors, got {device.type} tensors"
    if torch.compiler.is_compiling():  # traced: look the extension up without importing it
        found = importlib.util.find_spec(f"grpo_kernels.{'_C_cuda' if name == 'cuda' else '_C'}") is not None
        return None if found else "the compiled extension was not built"
    try:
        _module_for(name)
    except ImportError as exc:
        return (f"the compiled extension was not built ({exc}); reinstall with a C++ compiler"
                + (" and nvcc" if name == "cuda" else "") + " to build it")
    return None


# Backends whose kernels compute in fp64 when given fp64 inputs.
FP64_BACKENDS = ("torch",)


def stats_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype of log-probs, entropies, the loss and metrics for inputs like `x`: fp64 for fp64, else fp32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


# (backend, device type, fp64 inputs, TRITON_INTERPRET) -> the name resolve_backend returned
_RESOLVED: dict = {}


def resolve_backend(backend: str, device: torch.device, dtype: torch.dtype = None) -> str:
    """The backend that runs an op on `device` for inputs of `dtype` (None: any float dtype).
    Availability does not change within a process (but for the interpreter switch, part of the
    key), so each answer is found once. Plain Python that torch.compile traces to a constant
    (the key is made of constants; the first answer is found without importing a backend)."""
    key = (backend, device.type, dtype == torch.float64, os.environ.get("TRITON_INTERPRET"))
    name = _RESOLVED.get(key)
    if name is None:
        name = _RESOLVED[key] = _resolve_backend(backend, device, dtype)
    return name


def _resolve_backend(backend: str, device: torch.device, dtype) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not valid; expected one of {list(BACKENDS)}")
    if dtype == torch.float64:
        if backend not in ("auto",) + FP64_BACKENDS:
            raise TypeError(
                f"backend={backend!r} computes in fp32 and does not take fp64 inputs; use backend='torch' "
                "(or 'auto'), which computes in fp64, or cast the inputs to fp32"
            )
        return "torch"
    if backend != "auto":
        reason = why_unavailable(backend, device)
        if reason is not None:
            raise BackendUnavailableError(f"backend={backend!r} is unavailable: {reason}")
        return backend
    preference = ("triton", "cuda", "torch") if device.type == "cuda" else ("cpp", "torch")
    for name in preference:
        if why_unavailable(name, device) is None:
            return name
    return "torch"


def backend_module(name: str):
    """The backend's module (ops/contract.py lists what it provides); imported once."""
    return _LOADED.get(name) or _module_for(name)

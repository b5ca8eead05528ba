"""Fused ops: dispatcher ops (library.py), their autograd, and backend dispatch."""
from .dispatch import BACKENDS, BackendUnavailableError, resolve_backend
from .logprobs import logprobs_with_entropy

__all__ = ["BACKENDS", "BackendUnavailableError", "resolve_backend", "logprobs_with_entropy"]

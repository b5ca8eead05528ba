"""Registering our ops with PyTorch's dispatcher: `torch.library.Library` definitions with one
implementation for every device (it dispatches to the backend named in its arguments) and a fake
implementation (shapes only) for FakeTensorMode and torch.compile.

Autograd is not registered on the ops: the autograd.Functions of ops/logprobs.py and
ops/objective.py call them. That keeps an eager call at a few microseconds of dispatcher
overhead (torch.library.custom_op's Python wrappers cost ~40 µs per differentiable call, more
than the whole eager loss at small sizes), while torch.compile still sees opaque ops with fakes.
"""
from __future__ import annotations

import torch

NAMESPACE = "grpo_kernels"
_LIB = torch.library.Library(NAMESPACE, "DEF")


def define(schema: str, fake):
    """Decorator: define `grpo_kernels::<schema>`, register the decorated function as its
    implementation and `fake` as its fake; returns the op's default overload (cheapest to call)."""
    name = schema.split("(", 1)[0]

    def register(impl):
        _LIB.define(schema)
        _LIB.impl(name, impl, "CompositeExplicitAutograd")
        torch.library.register_fake(f"{NAMESPACE}::{name}", fake, lib=_LIB)
        return getattr(torch.ops.grpo_kernels, name).default

    return register

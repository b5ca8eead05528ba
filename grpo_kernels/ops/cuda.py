"""`backend="cuda"`: the hand-written CUDA kernels of csrc/cuda for CUDA tensors."""
from .. import _C_cuda  # noqa: F401 - ImportError here means the extension was not built
from .native import NativeKernels

_kernels = NativeKernels(_C_cuda)
logprobs_forward = _kernels.logprobs_forward
logprobs_backward = _kernels.logprobs_backward
objective_pass = _kernels.objective_pass
group_advantages = _kernels.group_advantages

"""`backend="cpp"`: the compiled CPU kernels of csrc/ (OpenMP, vectorised) for CPU tensors."""
from .. import _C  # noqa: F401 - ImportError here means the extension was not built
from .native import NativeKernels

_kernels = NativeKernels(_C)
logprobs_forward = _kernels.logprobs_forward
logprobs_backward = _kernels.logprobs_backward
objective_pass = _kernels.objective_pass
group_advantages = _kernels.group_advantages

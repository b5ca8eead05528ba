"""`backend="triton"`: fused Triton kernels, one file per kernel family.

Importing this package needs triton >= 3.2. On a machine without a GPU the kernels run under
`TRITON_INTERPRET=1` (slowly: for tests on small shapes).
"""
from .advantages import group_advantages
from .logprobs import logprobs_backward, logprobs_forward
from .objective import objective_pass

__all__ = ["logprobs_forward", "logprobs_backward", "objective_pass", "group_advantages"]

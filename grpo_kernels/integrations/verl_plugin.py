"""The `verl.plugins` entry point. verl imports this module in every process that imports verl
(Ray workers included), so the registration happens here, at import:
  - our policy losses, as `grpo_kernels_vanilla`, `_gspo`, `_cispo`, `_sapo`;
  - with GRPO_KERNELS_VERL_FUSED_LINEAR=1, our fused-linear log-probs in verl's fused-kernel forwards;
  - with GRPO_KERNELS_VERL_TRUNCATION=1, actor/reference log-probs over the kept set of the rollout
    sampler's top_k/top_p, read from each worker's config (`verl/truncation.py`).
GRPO_KERNELS_VERL_BACKEND picks the backend (default "auto").
"""
import os

from . import verl as _verl

BACKEND = os.environ.get("GRPO_KERNELS_VERL_BACKEND", "auto")
REGISTERED = _verl.register(BACKEND)
if os.environ.get("GRPO_KERNELS_VERL_FUSED_LINEAR", "0") == "1":
    _verl.patch_fused_linear(BACKEND)
if os.environ.get("GRPO_KERNELS_VERL_TRUNCATION", "0") == "1":
    from .verl.truncation import install_worker_hook

    install_worker_hook(BACKEND)

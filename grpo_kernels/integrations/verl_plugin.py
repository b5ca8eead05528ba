"""The `verl.plugins` entry point. verl imports this module in every process that imports verl
(Ray workers included), so the registration happens here, at import:
  - our versions of verl's 12 policy losses, as `grpo_kernels_<name>` (`grpo_kernels_vanilla`, ...);
  - our advantage estimators, as `grpo_kernels_<name>` for every verl estimator but gae, and
    verl's trainer `compute_advantage` made to give them the arguments verl gives its own
    estimator of that name (patched when verl's ray_trainer and v1 trainer utils are imported);
  - our rollout correction (one host read) in place of verl's
    `rollout_corr_helper.compute_rollout_correction_and_rejection_mask`
    (GRPO_KERNELS_VERL_ROLLOUT_CORRECTION=0 keeps verl's);
  - with GRPO_KERNELS_VERL_FUSED_LINEAR=1, our fused-linear log-probs in verl's fused-kernel
    forwards, and Σπ² from them for the optimal-token-baseline estimators (verl's FSDP engine is
    patched when it is imported);
  - with GRPO_KERNELS_VERL_TRUNCATION=1, actor/reference log-probs over the kept set of the rollout
    sampler's top_k/top_p, read from each worker's config (`verl/truncation.py`).
GRPO_KERNELS_VERL_BACKEND picks the backend (default "auto").
"""
import importlib.abc
import importlib.util
import os
import sys
from typing import Callable, Dict, List

from . import verl as _verl

BACKEND = os.environ.get("GRPO_KERNELS_VERL_BACKEND", "auto")


class _AfterImport(importlib.abc.MetaPathFinder):
    """Runs callbacks on a module right after it is first imported: verl's trainer and engine
    modules are imported after this plugin, and some bind the names we patch at their import."""

    def __init__(self):
        self.callbacks: Dict[str, List[Callable]] = {}

    def find_spec(self, fullname, path, target=None):
        callbacks = self.callbacks.pop(fullname, None)
        if not callbacks:
            return None
        spec = importlib.util.find_spec(fullname)  # the real finders (this one no longer knows the name)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        execute = spec.loader.exec_module

        def exec_module(module):
            execute(module)
            for callback in callbacks:
                callback(module)

        spec.loader.exec_module = exec_module
        return spec


# One hook per process, also when this module is reloaded (its class is then a new one).
_HOOK = next((f for f in sys.meta_path if type(f).__name__ == "_AfterImport" and type(f).__module__ == __name__),
             None) or _AfterImport()


def when_imported(module_name: str, callback: Callable) -> None:
    """callback(module) now if `module_name` is imported, else right after its import."""
    module = sys.modules.get(module_name)
    if module is not None:
        callback(module)
        return
    if _HOOK not in sys.meta_path:
        sys.meta_path.insert(0, _HOOK)
    _HOOK.callbacks.setdefault(module_name, []).append(callback)


REGISTERED = _verl.register(BACKEND)
REGISTERED_ESTIMATORS = _verl.register_estimators(BACKEND)
for _trainer in ("verl.trainer.ppo.ray_trainer", "verl.trainer.ppo.v1.utils"):  # each binds the names at import
    when_imported(_trainer, lambda m: _verl.patch_compute_advantage([m.__name__]))
if os.environ.get("GRPO_KERNELS_VERL_ROLLOUT_CORRECTION", "1") != "0":
    _verl.patch_rollout_correction()
if os.environ.get("GRPO_KERNELS_VERL_FUSED_LINEAR", "0") == "1":
    _verl.patch_fused_linear(BACKEND)
    when_imported("verl.workers.engine.fsdp.transformer_impl",
                  lambda m: _verl.patch_sum_pi_squared(BACKEND, m.FSDPEngineWithLMHead))
if os.environ.get("GRPO_KERNELS_VERL_TRUNCATION", "0") == "1":
    from .verl.truncation import install_worker_hook

    install_worker_hook(BACKEND)

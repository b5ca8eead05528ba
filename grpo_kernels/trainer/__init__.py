"""A thin GRPO trainer over the public API (see trainer.py), with toy tasks built in code (toy.py).

Needs the `trainer` extra (transformers, tqdm; matplotlib for the reward-curve PNG):
`pip install "grpo_kernels[trainer]"`. The kernels and losses themselves need only torch.
"""
import importlib.util

_MISSING = [name for name in ("transformers", "tqdm") if importlib.util.find_spec(name) is None]
if _MISSING:
    raise ImportError(f"grpo_kernels.trainer needs {' and '.join(_MISSING)}, which the kernels do not: "
                      f"pip install \"grpo_kernels[trainer]\" (or pip install {' '.join(_MISSING)})")

from .config import TrainerConfig  # noqa: E402
from .run_dir import NoCheckpointError, RunExistsError  # noqa: E402
from .stopping import TrainingInterrupted  # noqa: E402
from .trainer import GRPOTrainer  # noqa: E402

__all__ = ["GRPOTrainer", "TrainerConfig", "TrainingInterrupted", "RunExistsError", "NoCheckpointError"]

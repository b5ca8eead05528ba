"""A thin GRPO trainer over the public API (see trainer.py), with toy tasks built in code (toy.py)."""
from .config import TrainerConfig
from .trainer import GRPOTrainer

__all__ = ["GRPOTrainer", "TrainerConfig"]

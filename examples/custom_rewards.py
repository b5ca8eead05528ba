"""Writing reward functions for GRPOTrainer (TRL's convention).

A reward function takes `prompts`, `completions` and the dataset's other columns as keyword
lists, and returns one float per completion, or None where it cannot judge (that completion
then gets advantage 0). Several functions are combined with TrainerConfig.reward_weights.
Within 60 steps (~8 s on 2 CPU cores) the policy learns the cheap signal first: nearly every
completion becomes a single character (rewards/short >= 0.9) while `correct` starts to rise.
The script exits with status 1 otherwise.

    python examples/custom_rewards.py
"""
import sys

from grpo_kernels.trainer import GRPOTrainer, TrainerConfig, toy


def correct(prompts, completions, answer, **_):
    return [1.0 if c.strip() == a else 0.0 for c, a in zip(completions, answer)]


def short(prompts, completions, **_):
    """Prefer one-character answers; None (unscorable) for empty completions."""
    return [None if not c.strip() else (1.0 if len(c.strip()) == 1 else 0.0) for c in completions]


tokenizer = toy.char_tokenizer()
model = toy.tiny_causal_lm(len(tokenizer))
config = TrainerConfig(prompts_per_step=16, num_generations=8, max_new_tokens=3, learning_rate=3e-3, max_steps=60,
                       reward_weights=[1.0, 0.2], output_dir="runs/custom_rewards")
# overwrite=True: a second run replaces the first (kept in runs/custom_rewards/replaced-<date>/), not refused.
history = GRPOTrainer(model, tokenizer, [correct, short], config).train(toy.successor_dataset(), overwrite=True)
print({k: round(v, 3) for k, v in history[-1].items() if k.startswith("reward")})
sys.exit(0 if history[-1]["rewards/short"] >= 0.9 else 1)

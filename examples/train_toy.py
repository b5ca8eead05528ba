"""Train a tiny LM with GRPO through the trainer's Python API, to a stated target.

A randomly initialised 88k-parameter Llama learns the 'successor' task (prompt "7>", answer "8"
then end-of-sequence) with DAPO's loss and clip-higher, from a random policy (reward ~0.001) to a
mean reward of 0.9 over 5 steps: about 200 steps, 5-10 s on 2 CPU cores. The script exits with
status 1 if the target is not reached.

    python examples/train_toy.py
"""
import sys

from grpo_kernels import GRPOLossConfig
from grpo_kernels.trainer import GRPOTrainer, TrainerConfig, toy
from grpo_kernels.trainer.curves import text_curve

TARGET = 0.9

tokenizer = toy.char_tokenizer()
model = toy.tiny_causal_lm(len(tokenizer))
config = TrainerConfig(
    prompts_per_step=16, num_generations=8, max_new_tokens=3, learning_rate=1e-3, max_steps=600,
    loss=GRPOLossConfig(loss_type="dapo", epsilon_high=0.28), output_dir="runs/train_toy", stop_at_reward=TARGET,
)
trainer = GRPOTrainer(model, tokenizer, [toy.exact_answer_reward], config)
# overwrite=True: a second run replaces the first (kept in runs/train_toy/replaced-<date>/) instead of being refused.
history = trainer.train(toy.successor_dataset(), overwrite=True)
print(text_curve(history))
print(f"reached the target {TARGET}: {trainer.reached_target} (step {trainer.step})")
sys.exit(0 if trainer.reached_target else 1)

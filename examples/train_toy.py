"""Train a tiny LM with GRPO on the 'addition' toy task through the trainer's Python API.

    python examples/train_toy.py
"""
from grpo_kernels import GRPOLossConfig
from grpo_kernels.trainer import GRPOTrainer, TrainerConfig, toy
from grpo_kernels.trainer.curves import text_curve

tokenizer = toy.char_tokenizer()
model = toy.tiny_causal_lm(len(tokenizer), hidden_size=96, layers=3)
config = TrainerConfig(
    prompts_per_step=16, num_generations=8, max_new_tokens=3, learning_rate=3e-3, max_steps=300,
    loss=GRPOLossConfig(loss_type="dapo", epsilon_high=0.28), output_dir="runs/addition", stop_at_reward=0.9,
)
trainer = GRPOTrainer(model, tokenizer, [toy.exact_answer_reward], config)
history = trainer.train(toy.addition_dataset())
print(text_curve(history))

"""grpo_loss and fused_linear_grpo_loss inside a hand-written PyTorch loop.

The loop samples completions itself, scores them, and takes GRPO steps. The logits are
never materialised: the loss is computed from the last hidden state and the lm_head. The reward
of the 'successor' task rises from ~0.03 (random) to the target 0.5 in about 60 steps
(~7 s on 2 CPU cores); the script exits with status 1 if it does not within 300 steps.

    python examples/custom_loop.py
"""
import sys

import torch

import grpo_kernels as gk
from grpo_kernels.trainer import toy

torch.manual_seed(0)
torch.set_num_threads(1)  # a tiny model gains nothing from threads: see grpo_kernels/trainer/threads.py
TARGET = 0.5
tokenizer = toy.char_tokenizer()
model = toy.tiny_causal_lm(len(tokenizer))
optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
G, P = 8, 8  # generations per prompt, prompts per step
data = toy.successor_dataset()

recent = []
for step in range(300):
    rows = [data[i] for i in torch.randint(len(data), (P,)).tolist()]
    enc = tokenizer([r["prompt"] for r in rows], return_tensors="pt", padding=True, add_special_tokens=False)
    prompt = enc["input_ids"].repeat_interleave(G, 0)
    with torch.no_grad():
        seq = model.generate(prompt, attention_mask=enc["attention_mask"].repeat_interleave(G, 0), do_sample=True,
                             max_new_tokens=2, pad_token_id=tokenizer.pad_token_id)
    completion = seq[:, prompt.shape[1]:]
    texts = tokenizer.batch_decode(completion, skip_special_tokens=True)
    answers = [r["answer"] for r in rows for _ in range(G)]
    rewards = torch.tensor([float(t.strip()[:1] == a) for t, a in zip(texts, answers)])
    adv = gk.group_advantages(rewards, group_size=G).advantages

    hidden = model.model(seq).last_hidden_state[:, prompt.shape[1] - 1:-1]  # the states predicting completion tokens
    out = gk.fused_linear_grpo_loss(hidden, model.lm_head.weight, completion, adv, loss_type="grpo")
    # Equivalent, with materialised logits: gk.grpo_loss(model.lm_head(hidden), completion, adv, loss_type="grpo")
    optimizer.zero_grad()
    out.loss.backward()
    optimizer.step()
    recent = (recent + [float(rewards.mean())])[-5:]
    if step % 10 == 0:
        print(f"step {step:3d}  reward {rewards.mean():.2f}  entropy {out.metrics['entropy']:.2f}")
    if sum(recent) / 5 >= TARGET:
        print(f"step {step:3d}: mean reward of the last 5 steps {sum(recent) / 5:.2f} >= {TARGET}")
        sys.exit(0)
print(f"the mean reward of the last 5 steps is {sum(recent) / 5:.2f}, below {TARGET}")
sys.exit(1)

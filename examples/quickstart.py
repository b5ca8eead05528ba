"""Ten lines of grpo_kernels: group advantages, then the fused GRPO loss and its gradient."""
import torch

import grpo_kernels as gk

torch.manual_seed(0)
B, T, V, G = 8, 16, 1000, 4  # 8 completions = 2 prompts x 4 generations
logits = torch.randn(B, T, V, requires_grad=True)
ids = torch.randint(0, V, (B, T))
mask = torch.rand(B, T) > 0.2
rewards = torch.randint(0, 2, (B,)).float()

adv = gk.group_advantages(rewards, group_size=G).advantages
with torch.no_grad():  # the policy that sampled (here: the same one, so the ratio is 1)
    old = gk.selective_logprobs(logits, ids)
out = gk.grpo_loss(logits, ids, adv, mask=mask, old_logps=old, loss_type="grpo", beta=0.0)
out.loss.backward()
print(f"loss {out.loss.item():.4f}  |grad| {logits.grad.norm():.4f}")
print("why 0: on-policy every ratio is 1, so the 'grpo' loss is -mean(advantages), and group advantages average 0 "
      "in each group; its gradient, -A_i / (B |o_i|) on each token's log p, is not 0: that is what trains")
print({k: round(v.item(), 4) for k, v in out.metrics.items()})

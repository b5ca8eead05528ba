"""Megatron-style tensor parallelism: the lm_head split by vocabulary rows over 2 ranks, the GRPO
loss computed on each rank's slice, without gathering logits or weights.

    torchrun --standalone --nproc_per_node=2 examples/tensor_parallel.py
    python examples/tensor_parallel.py        # launches the line above for you

Each rank holds V/2 rows of a column-parallel lm_head (as Megatron's output layer). The loss and
d_hidden come out whole on every rank, d_weight for the rank's own rows; rank 0 checks them
against one process on the whole lm_head and prints what was communicated. Exits 1 on a mismatch.
"""
import os
import subprocess
import sys

import torch
import torch.distributed as dist

import grpo_kernels as gk

B, T, H, V = 4, 16, 64, 1000


class VocabParallelHead(torch.nn.Module):
    """This rank's rows [start, start + V_local) of the lm_head (Megatron: ColumnParallelLinear)."""

    def __init__(self, full_weight: torch.Tensor, group):
        super().__init__()
        v_local = full_weight.shape[0] // dist.get_world_size(group)
        self.start = dist.get_rank(group) * v_local  # Megatron's even split: grpo_kernels' default vocab_start
        self.weight = torch.nn.Parameter(full_weight[self.start:self.start + v_local].clone())


def main() -> int:
    dist.init_process_group("gloo")
    tp = dist.group.WORLD  # the tensor-parallel group; Megatron: parallel_state.get_tensor_model_parallel_group()
    g = torch.Generator().manual_seed(0)  # the same inputs on every rank, as a TP group sees them
    full_weight = torch.randn(V, H, generator=g) / H ** 0.5
    hidden = torch.randn(B, T, H, generator=g, requires_grad=True)
    ids = torch.randint(0, V, (B, T), generator=g)
    advantages = torch.randn(B, generator=g)
    old = torch.full((B, T), -6.0)
    config = gk.GRPOLossConfig(loss_type="dapo", beta=0.04, entropy_coef=0.01)

    head = VocabParallelHead(full_weight, tp)
    out = gk.fused_linear_grpo_loss(hidden, head.weight, ids, advantages, old_logps=old, ref_logps=old, config=config,
                                    process_group=tp)
    out.loss.backward()  # hidden.grad is whole on every rank; head.weight.grad holds this rank's rows

    rows = [torch.empty_like(head.weight.grad) for _ in range(dist.get_world_size(tp))]
    dist.all_gather(rows, head.weight.grad, group=tp)  # only to check it here; training never needs this
    ok = True
    if dist.get_rank() == 0:
        whole_h, whole_w = hidden.detach().clone().requires_grad_(True), full_weight.clone().requires_grad_(True)
        want = gk.fused_linear_grpo_loss(whole_h, whole_w, ids, advantages, old_logps=old, ref_logps=old,
                                         config=config)
        want.loss.backward()
        diffs = {"loss": (out.loss - want.loss).abs().item(),
                 "entropy": (out.entropy - want.entropy).abs().max().item(),
                 "d_hidden": (hidden.grad - whole_h.grad).abs().max().item(),
                 "d_weight": (torch.cat(rows) - whole_w.grad).abs().max().item()}
        ok = all(d < 1e-5 for d in diffs.values())
        n = B * T
        print(f"loss {out.loss.item():.6f} on {dist.get_world_size(tp)} ranks; largest difference from one process: "
              + ", ".join(f"{k} {v:.1e}" for k, v in diffs.items()))
        print(f"communicated per rank: {16 * n:,} B of statistics + {4 * n * H:,} B of d_hidden; gathering the "
              f"logits instead: {4 * n * V // 2:,} B")
        print(f"matches the single-process loss: {ok}")
    ok = torch.tensor(float(ok))
    dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    dist.destroy_process_group()
    return 0 if ok.item() == 1.0 else 1


if __name__ == "__main__":
    if "WORLD_SIZE" not in os.environ:  # plain `python`: start the two ranks with torchrun
        launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__]
        raise SystemExit(subprocess.call(launch, env=dict(os.environ, OMP_NUM_THREADS="1")))
    raise SystemExit(main())

"""The token selections of verl's Clip-Cov and KL-Cov losses (Cui et al., "The Entropy Mechanism of
RL for reasoning LMs"), computed on the tensors' device as verl selects them.

Both rank the micro-batch's valid tokens by the covariance-like product
cov_t = (A_t − mean A)·(logp_t − mean logp) (means over the valid tokens). The selected tokens then
get a different per-token loss; our fused objective takes the selection as per-token weights.

- clip_cov: the candidates are the valid tokens that PPO's clip leaves alone with
  lb < cov_t < ub; verl zeroes the loss of clip_num = max(⌊ratio·#valid⌋, 1) of them chosen at
  random: `torch.randperm(#candidates)` on torch's global CPU generator, the first clip_num
  positions of the candidates in row-major order. We draw the very same permutation: that needs
  #candidates on the host, the one host read of `clip_cov_selection`. Everything else (the means,
  the candidates, their ranks, which are chosen) stays on the device.
- kl_cov: the k = max(⌊ratio·#valid⌋, 1) valid tokens of largest cov_t. On the CPU this is verl's
  own computation (compacted tensors, `torch.topk`, whose choice among tied covariances is its
  own). On an accelerator it is a stable descending sort with no host read: among exactly tied
  covariances the lowest positions win (verl, which moves the tensors to the CPU for this, keeps
  topk's choice), and the means are masked sums where verl averages the compacted tokens, so
  fp32 covariances may differ from verl's in the last bit.
"""
from __future__ import annotations

import torch
from verl.utils.torch_functional import masked_mean as verl_masked_mean


@torch.no_grad()
def clip_cov_selection(old_log_prob: torch.Tensor, log_prob: torch.Tensor, advantages: torch.Tensor,
                       response_mask: torch.Tensor, clip_low: float, clip_high: float, clip_cov_ratio: float,
                       clip_cov_lb: float, clip_cov_ub: float) -> torch.Tensor:
    """Bool tensor of response_mask's shape: the tokens whose loss verl's clip_cov zeroes.

    Tensors (B, T) (or any shape, read in row-major order, e.g. packed (N,)). Consumes torch's
    global CPU generator exactly as verl's `compute_policy_loss_clip_cov` does (one `randperm` when
    there is a candidate), and reads one number on the host: the candidate count.
    """
    log_prob = log_prob.detach()
    valid = response_mask > 0
    ratio = torch.exp(log_prob - old_log_prob)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1 - clip_low, 1 + clip_high)
    clipped_by_ppo = (clipped > unclipped) & valid
    # verl's statistic, with verl's own masked_mean: the same operations give the same bits.
    cov = (advantages - verl_masked_mean(advantages, response_mask)) * (
        log_prob - verl_masked_mean(log_prob, response_mask))
    cov = torch.where(valid & ~clipped_by_ppo, cov, -torch.inf)
    candidate = ((cov < clip_cov_ub) & (cov > clip_cov_lb) & valid).reshape(-1)
    # verl: clip_num = max(int(clip_cov_ratio * response_mask.sum().item()), 1), here on the device
    # (a float64 product truncated, as Python's int() of the same product).
    clip_num = (response_mask.sum().double() * clip_cov_ratio).floor().clamp(min=1)
    num_candidates = int(candidate.sum())  # the one host read: randperm's length
    if num_candidates == 0:  # verl draws nothing then
        return torch.zeros_like(valid)
    perm = torch.randperm(num_candidates)  # torch's global CPU generator, as verl
    position = torch.empty_like(perm)
    position[perm] = torch.arange(num_candidates)  # candidate r is the position[r]-th drawn
    position = position.to(candidate.device, non_blocking=True)
    rank = (candidate.cumsum(0) - 1).clamp(min=0)  # each candidate's rank in row-major order
    chosen = candidate & (position[rank] < clip_num)
    return chosen.reshape(valid.shape)


@torch.no_grad()
def kl_cov_selection(log_prob: torch.Tensor, advantages: torch.Tensor, response_mask: torch.Tensor,
                     kl_cov_ratio: float) -> torch.Tensor:
    """Bool tensor of response_mask's shape: the tokens verl's kl_cov gives its |log-ratio| penalty.

    Tensors (B, T) (or any shape, read in row-major order). No host read on an accelerator; see
    the module docstring for the CPU path (verl's own) and the tie rule on accelerators.
    """
    valid = response_mask > 0
    flat_valid = valid.reshape(-1)
    if log_prob.device.type == "cpu":  # verl's computation, step for step
        all_valid_idx = torch.nonzero(flat_valid, as_tuple=True)[0]
        adv = advantages[valid].detach().reshape(-1)
        logp = log_prob[valid].detach().reshape(-1)
        selected = torch.zeros_like(flat_valid)
        if len(adv) != 0:
            cov = (adv - adv.mean()) * (logp - logp.mean())
            k = max(1, int(len(cov) * kl_cov_ratio))
            selected[all_valid_idx[torch.topk(cov, k, largest=True).indices]] = True
        return selected.reshape(valid.shape)
    return kl_cov_selection_sorted(log_prob, advantages, response_mask, kl_cov_ratio)


@torch.no_grad()
def kl_cov_selection_sorted(log_prob: torch.Tensor, advantages: torch.Tensor, response_mask: torch.Tensor,
                            kl_cov_ratio: float) -> torch.Tensor:
    """kl_cov's selection with no host read (the accelerator path): the k largest covariances by a
    stable descending sort, the lowest positions first among exact ties."""
    valid = response_mask > 0
    flat_valid = valid.reshape(-1)
    count = flat_valid.sum()
    denominator = count.clamp(min=1).to(log_prob.dtype)
    adv = advantages.detach().reshape(-1).to(log_prob.dtype)
    logp = log_prob.detach().reshape(-1)
    adv_mean = torch.where(flat_valid, adv, 0).sum() / denominator
    logp_mean = torch.where(flat_valid, logp, 0).sum() / denominator
    cov = torch.where(flat_valid, (adv - adv_mean) * (logp - logp_mean), -torch.inf)
    k = (count.double() * kl_cov_ratio).floor().clamp(min=1)
    order = torch.sort(cov, descending=True, stable=True).indices
    position = torch.empty_like(order)
    position[order] = torch.arange(order.numel(), device=order.device)
    return (flat_valid & (position < k)).reshape(valid.shape)

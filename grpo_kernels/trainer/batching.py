"""How a batch of completions reaches the policy: padded or padding-free (packed) token layout,
and the gradient-accumulation micro-batches of an optimizer step."""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch

from .rollout import Rollout


def use_packing(choice, device: torch.device) -> bool:
    """Padding-free batches (`TrainerConfig.padding_free`): on by default with flash-attn on CUDA,
    selectable everywhere."""
    if choice != "auto":
        return bool(choice)
    return device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None


@dataclass
class TokenStates:
    """The last hidden states that predict a batch's completion tokens, with the loss's layout arguments.

    Padded: hidden (B, T, H), ids (B, T), mask (B, T), cu_seqlens None.
    Packed: hidden (N, H) and ids (N,) for the N real completion tokens, mask None, cu_seqlens (B + 1,) int32.
    """

    hidden: torch.Tensor
    ids: torch.Tensor
    mask: Optional[torch.Tensor]
    cu_seqlens: Optional[torch.Tensor]
    completion_mask: torch.Tensor  # (B, T): the batch's, whichever the layout

    def layout(self, x: torch.Tensor) -> torch.Tensor:
        """A (B, T) per-token tensor in this layout: itself padded, its (N,) real tokens packed."""
        return x if self.cu_seqlens is None else x[self.completion_mask]


def token_states(model, batch: Rollout, packed: bool) -> TokenStates:
    """Run the backbone of `model` (an HF causal LM) over the batch's prompts and completions.

    Padded: the (B, P + T) left-padded batch. Packed (padding-free): every sequence's real prompt
    and completion tokens concatenated into one row, positions restarting per sequence, so
    transformers attends within sequences only (flash-attn's varlen kernel, or a block-diagonal
    mask for SDPA).
    """
    backbone = getattr(model, model.base_model_prefix)
    p = batch.prompt_ids.shape[1]
    if not packed:
        input_ids = torch.cat([batch.prompt_ids, batch.completion_ids], dim=1)
        attention = torch.cat([batch.prompt_mask, batch.completion_mask.long()], dim=1)
        # As generate() does: positions count only real tokens, so left padding shifts nothing.
        positions = (attention.cumsum(-1) - 1).clamp(min=0)
        hidden = backbone(input_ids=input_ids, attention_mask=attention, position_ids=positions,
                          use_cache=False).last_hidden_state
        return TokenStates(hidden[:, p - 1:p - 1 + batch.completion_ids.shape[1]], batch.completion_ids,
                           batch.completion_mask, None, batch.completion_mask)
    pieces, positions, targets, lengths = [], [], [], []
    offset = 0
    for i in range(batch.completion_ids.shape[0]):
        prompt = batch.prompt_ids[i][batch.prompt_mask[i].bool()]
        completion = batch.completion_ids[i][batch.completion_mask[i]]
        seq = torch.cat([prompt, completion])
        pieces.append(seq)
        positions.append(torch.arange(seq.numel(), device=seq.device))
        targets.append(offset + prompt.numel() - 1 + torch.arange(completion.numel(), device=seq.device))
        lengths.append(completion.numel())
        offset += seq.numel()
    # No attention mask and no cache: transformers then reads the sequence boundaries from the
    # restarting position ids (a KV cache would switch that detection off).
    hidden = backbone(input_ids=torch.cat(pieces)[None], position_ids=torch.cat(positions)[None],
                      use_cache=False).last_hidden_state
    cu = torch.tensor([0] + lengths, device=batch.completion_ids.device).cumsum(0).to(torch.int32)
    mask = batch.completion_mask
    return TokenStates(hidden[0, torch.cat(targets)], batch.completion_ids[mask], None, cu, mask)


@dataclass
class MicroBatch:
    """One gradient-accumulation micro-batch: `rows` of the step's batch, and the old/reference
    log-probs of those rows in the batch's layout ((rows, T) padded, their (n,) span packed)."""

    rows: slice
    batch: Rollout
    old: Optional[torch.Tensor]
    ref: Optional[torch.Tensor]


def micro_batches(batch: Rollout, old: Optional[torch.Tensor], ref: Optional[torch.Tensor],
                  count: int) -> Tuple[List[MicroBatch], int]:
    """The batch's B rows in `count` equal micro-batches (count divides B; TrainerConfig checks it),
    and the batch's completion-token count.

    old, ref: None, (B, T) padded, or (N,) packed. Packed log-probs are sliced as they are (never
    padded and re-packed), by the sequences' packed offsets, read once per step.
    """
    offsets = [0] + batch.completion_mask.sum(1).cumsum(0).tolist()

    def tokens(x, rows: slice):
        if x is None or x.dim() == 2:
            return None if x is None else x[rows]
        return x[offsets[rows.start]:offsets[rows.stop]]

    size = batch.completion_ids.shape[0]
    step = size // count
    parts = [slice(i, i + step) for i in range(0, size, step)]
    return [MicroBatch(rows, batch.select(rows), tokens(old, rows), tokens(ref, rows)) for rows in parts], offsets[-1]

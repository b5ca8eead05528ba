"""Sampling completions with HF `generate`, recording the sampler's own log-probs and masks."""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import List

import torch

from ..ops.truncation_search import find_threshold
from ..truncation import Truncation


@dataclass
class Rollout:
    """One batch of B = prompts × num_generations completions (groups are consecutive rows).

    prompt_ids, prompt_mask: (B, P) left-padded; completion_ids, completion_mask: (B, T), the
    mask covering the tokens up to and including the first EOS; sampling_logps: (B, T) fp32
    log-probs of the sampled tokens under the distribution that sampled them (after
    temperature/top-k/top-p); texts: the decoded completions; truncated: (B,) no EOS seen.
    """

    prompts: List[str]
    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    completion_ids: torch.Tensor
    completion_mask: torch.Tensor
    sampling_logps: torch.Tensor
    texts: List[str]
    truncated: torch.Tensor

    def select(self, part: slice) -> "Rollout":
        """The completions `part` (a slice of the B rows), every field sliced alike."""
        return Rollout(*(getattr(self, f.name)[part] for f in fields(self)))


def completion_mask(completion_ids: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """True up to and including the first EOS of each row (all True when there is none)."""
    is_eos = completion_ids == eos_token_id
    seen_before = torch.cumsum(is_eos.int(), dim=1) - is_eos.int()
    return seen_before == 0


class TruncatedSampling:
    """The sampler's logits processor: z' = logits / temperature, then the truncation of docs/math.md
    ("Truncated sampling": min_p, then top_k, then top_p, vLLM V1's order) by the same threshold
    search the log-prob kernels' torch backend uses; dropped entries become −inf.

    It replaces transformers' own warpers, which apply min_p after top_p (a different kept set when
    both are on), so the sampled distribution is exactly the one the training log-probs compute.
    scores (B, V) -> fp32 (B, V).
    """

    def __init__(self, temperature: float, truncation: Truncation):
        self.temperature, self.truncation = temperature, truncation

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        z = scores.float() / self.temperature
        if not self.truncation.active:
            return z
        # z is both the raw logits and z' here (no further transform), so the threshold is in z units.
        threshold = find_threshold(z, z, self.truncation)
        return z.masked_fill(z < threshold.unsqueeze(-1), float("-inf"))


@torch.no_grad()
def generate(model, tokenizer, prompts: List[str], cfg) -> Rollout:
    from transformers import LogitsProcessorList

    device = next(model.parameters()).device
    enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
    prompt_ids = enc["input_ids"].repeat_interleave(cfg.num_generations, dim=0)
    prompt_mask = enc["attention_mask"].repeat_interleave(cfg.num_generations, dim=0)
    was_training = model.training
    model.eval()
    # transformers' own temperature and truncation set to "off" explicitly (None would take the model's
    # generation_config defaults, e.g. a top_k of 20): TruncatedSampling does both.
    out = model.generate(
        input_ids=prompt_ids, attention_mask=prompt_mask, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
        min_p=0.0, logits_processor=LogitsProcessorList([TruncatedSampling(cfg.temperature, cfg.truncation)]),
        max_new_tokens=cfg.max_new_tokens, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        return_dict_in_generate=True, output_scores=True,
    )
    model.train(was_training)
    completion_ids = out.sequences[:, prompt_ids.shape[1]:]
    scores = torch.stack(out.scores, dim=1).float()  # (B, T, V): the logits the sampler drew from
    sampling_logps = torch.log_softmax(scores, dim=-1).gather(-1, completion_ids.unsqueeze(-1)).squeeze(-1)
    mask = completion_mask(completion_ids, tokenizer.eos_token_id)
    truncated = ~(completion_ids == tokenizer.eos_token_id).any(dim=1)
    if cfg.mask_truncated_completions:
        mask = mask & ~truncated.unsqueeze(1)
    sampling_logps = torch.where(mask, sampling_logps, 0.0)
    shown = completion_ids.masked_fill(~completion_mask(completion_ids, tokenizer.eos_token_id), tokenizer.pad_token_id)
    texts = tokenizer.batch_decode(shown, skip_special_tokens=True)
    return Rollout([p for p in prompts for _ in range(cfg.num_generations)], prompt_ids, prompt_mask,
                   completion_ids, mask, sampling_logps, texts, truncated)

"""Tiny Hugging Face models for the TRL drop-in tests, built in code (nothing is downloaded):
a Qwen3-MoE causal LM with router logits on, and a Qwen2-VL vision-language model with its
processor (the character tokenizer of `toy`, Qwen2-VL's vision tokens, a one-line chat template,
Qwen2-VL's PIL image processor) and a dataset of one small image per prompt."""
import random

import torch

from grpo_kernels.trainer import toy

VISION_TOKENS = ["<|vision_start|>", "<|image_pad|>", "<|vision_end|>", "<|video_pad|>"]
# An image, then the prompt's text; TRL appends the completion.
CHAT_TEMPLATE = ("{% for m in messages %}{% for c in m['content'] %}{% if c['type'] == 'image' %}"
                 "<|vision_start|><|image_pad|><|vision_end|>{% else %}{{ c['text'] }}{% endif %}{% endfor %}"
                 "{% endfor %}")


def tiny_qwen3_moe(vocab_size: int, seed: int = 0, router_aux_loss_coef: float = 0.5):
    """A 2-layer Qwen3-MoE (4 experts, 2 per token) that returns its router logits. The aux loss
    coefficient is larger than Qwen3's 0.001 so that it moves the parameters measurably."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    config = Qwen3MoeConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                            num_experts=4, num_experts_per_tok=2, output_router_logits=True,
                            router_aux_loss_coef=router_aux_loss_coef, max_position_embeddings=64, pad_token_id=0,
                            bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    torch.manual_seed(seed)
    return Qwen3MoeForCausalLM(config)


def qwen2_vl_processor():
    """A Qwen2-VL processor over `toy.char_tokenizer()` plus the vision tokens; images of 28x28
    pixels become 2x2 patches of 14 pixels, merged 2x2 into one image token."""
    from transformers import Qwen2VLProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    from transformers.processing_utils import ProcessorMixin

    class ImageOnlyQwen2VLProcessor(Qwen2VLProcessor):
        """Qwen2VLProcessor without its video processor (which needs torchvision)."""

        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            self.image_token, self.video_token = "<|image_pad|>", "<|video_pad|>"
            self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
            self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
            ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)

    tokenizer = toy.char_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": VISION_TOKENS})
    images = Qwen2VLImageProcessorPil(min_pixels=28 * 28, max_pixels=4 * 28 * 28, patch_size=14, merge_size=2,
                                      temporal_patch_size=2)
    return ImageOnlyQwen2VLProcessor(image_processor=images, tokenizer=tokenizer, chat_template=CHAT_TEMPLATE)


def tiny_qwen2_vl(processor, seed: int = 0):
    """A Qwen2-VL with a 1-block vision tower and a 2-layer text model, randomly initialised."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    token = processor.tokenizer.convert_tokens_to_ids
    text = dict(vocab_size=len(processor.tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [1, 1, 2]},
                pad_token_id=0, bos_token_id=1, eos_token_id=2)
    vision = dict(depth=1, embed_dim=16, hidden_size=32, num_heads=2, mlp_ratio=2, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2, in_channels=3)
    config = Qwen2VLConfig(text_config=text, vision_config=vision, image_token_id=token("<|image_pad|>"),
                           video_token_id=token("<|video_pad|>"), vision_start_token_id=token("<|vision_start|>"),
                           vision_end_token_id=token("<|vision_end|>"), tie_word_embeddings=False)
    torch.manual_seed(seed)
    return Qwen2VLForConditionalGeneration(config)


def image_prompt_dataset(size: int = 16, seed: int = 0):
    """`toy.successor_dataset` as conversational prompts, each with a 28x28 image of one random colour."""
    from datasets import Dataset
    from PIL import Image

    rng = random.Random(seed)
    rows = []
    for row in toy.successor_dataset(size, seed):
        image = Image.new("RGB", (28, 28), tuple(rng.randrange(256) for _ in range(3)))
        content = [{"type": "image"}, {"type": "text", "text": row["prompt"]}]
        rows.append({"prompt": [{"role": "user", "content": content}], "image": image})
    return Dataset.from_list(rows)

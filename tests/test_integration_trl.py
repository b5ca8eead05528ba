"""FusedGRPOTrainer and patch_trl() against trl.GRPOTrainer: same seed, data and config, two optimizer
steps with gradient accumulation 2 -> the same logged loss and metrics and the same updated
parameters; on a tiny Llama, a tiny Qwen3-MoE (router aux loss) and a tiny Qwen2-VL (images)."""
import math
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("trl")
from datasets import Dataset  # noqa: E402
from trl import GRPOConfig, GRPOTrainer  # noqa: E402

from grpo_kernels import reference  # noqa: E402
from grpo_kernels.integrations.trl import FusedGRPOTrainer, config_from_trl, patch_trl  # noqa: E402
from grpo_kernels.trainer import toy  # noqa: E402
from trl_models import image_prompt_dataset, qwen2_vl_processor, tiny_qwen2_vl, tiny_qwen3_moe  # noqa: E402


def varied_reward(prompts, completions, **_):
    """A deterministic reward with spread inside every group, so advantages are not all zero."""
    return [sum(ord(ch) for ch in str(c)) % 7 / 7.0 for c in completions]


def build(kind):
    """(model, processing_class, dataset) of a tiny model family, built in code."""
    if kind == "vlm":
        processor = qwen2_vl_processor()
        return tiny_qwen2_vl(processor), processor, image_prompt_dataset(16)
    tokenizer = toy.char_tokenizer()
    model = (tiny_qwen3_moe if kind == "moe" else toy.tiny_causal_lm)(len(tokenizer), seed=0)
    return model, tokenizer, Dataset.from_list(toy.successor_dataset(16))


def run(trainer_cls, tmp_path, kind="llama", trainer_kwargs=None, **options):
    model, processing_class, dataset = build(kind)
    # A local directory (no download): with beta != 0 TRL loads the reference model from it.
    model_dir = tmp_path / "model"
    model.save_pretrained(model_dir)
    kw = dict(output_dir=str(tmp_path), per_device_train_batch_size=4, num_generations=4, max_completion_length=3,
              gradient_accumulation_steps=2, max_steps=2, learning_rate=0.05, optim="sgd", logging_steps=1,
              report_to=[],
              use_cpu=True, bf16=False, seed=0, save_strategy="no", disable_tqdm=True, temperature=1.0)
    kw.update(options)
    trainer = trainer_cls(model=str(model_dir), reward_funcs=[varied_reward], args=GRPOConfig(**kw),
                          train_dataset=dataset, processing_class=processing_class, **(trainer_kwargs or {}))
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    return logs, {k: v.detach().clone() for k, v in trainer.model.named_parameters()}


CASES = {
    "grpo": dict(loss_type="grpo"),
    "bnpo": dict(loss_type="bnpo"),
    "dr_grpo": dict(loss_type="dr_grpo"),
    "dapo": dict(loss_type="dapo", epsilon_high=0.28),
    "cispo": dict(loss_type="cispo", epsilon_high=5.0),
    "sapo": dict(loss_type="sapo"),
    "luspo": dict(loss_type="luspo", importance_sampling_level="sequence"),
    "kl_entropy": dict(loss_type="dapo", beta=0.05, use_bias_correction_kl=False, entropy_coef=0.01,
                       top_entropy_quantile=0.8),
    # TRL's defaults (dapo, use_bias_correction_kl=True) with a KL penalty: the ratio keeps its gradient.
    "trl_defaults_kl": dict(beta=0.05),
    "grpo_kl_entropy_mask": dict(loss_type="grpo", beta=0.04, entropy_coef=0.02, top_entropy_quantile=0.6),
    "vespo": dict(loss_type="vespo", beta=0.02),
    "vespo_sequence": dict(loss_type="vespo", importance_sampling_level="sequence", vespo_k_neg=2.5),
}


@pytest.mark.parametrize("name", list(CASES))
def test_same_training_as_trl(name, tmp_path):
    ref_logs, ref_params = run(GRPOTrainer, tmp_path / "trl", **CASES[name])
    our_logs, our_params = run(FusedGRPOTrainer, tmp_path / "ours", **CASES[name])
    assert len(ref_logs) == len(our_logs) == 2
    for ref, ours in zip(ref_logs, our_logs):
        for key in ("loss", "reward", "entropy", "kl", "clip_ratio/region_mean", "cispo_clip_ratio",
                    "vespo/phi_seq_mean", "policy_loss", "entropy_coef"):
            if key in ref:
                assert ours[key] == pytest.approx(ref[key], rel=1e-4, abs=1e-6), key
    # SGD (not Adam, which moves every component by ~lr whatever its gradient and so magnifies
    # rounding in near-zero gradients): parameter differences stay proportional to gradient ones.
    for key, value in ref_params.items():
        torch.testing.assert_close(our_params[key], value, rtol=1e-5, atol=1e-6, msg=key)


def test_patch_trl_routes_the_loss(tmp_path):
    undo = patch_trl()
    try:
        logs, params = run(GRPOTrainer, tmp_path / "patched", loss_type="dapo")
    finally:
        undo()
    ref_logs, ref_params = run(GRPOTrainer, tmp_path / "plain", loss_type="dapo")
    assert logs[-1]["loss"] == pytest.approx(ref_logs[-1]["loss"], rel=1e-4, abs=1e-6)
    assert GRPOTrainer._compute_loss is not FusedGRPOTrainer._compute_loss


def test_adaptive_entropy_matches_trl(tmp_path):
    """TRL's controller over 6 optimizer steps: the coefficient must move (and gate the bonus)."""
    options = dict(loss_type="dapo", beta=0.02, use_adaptive_entropy=True, entropy_coef=0.01, entropy_target=5.0,
                   entropy_coef_delta=0.02, entropy_coef_max=0.2, max_steps=6)
    ref_logs, ref_params = run(GRPOTrainer, tmp_path / "trl", **options)
    our_logs, our_params = run(FusedGRPOTrainer, tmp_path / "ours", **options)
    coefs = [entry["entropy_coef"] for entry in ref_logs]
    assert len(set(coefs)) > 2, f"the coefficient did not move: {coefs}"
    for ref, ours in zip(ref_logs, our_logs):
        for key in ("loss", "entropy", "entropy_coef", "policy_loss", "kl"):
            assert ours[key] == pytest.approx(ref[key], rel=1e-4, abs=1e-6), key
    for key, value in ref_params.items():
        torch.testing.assert_close(our_params[key], value, rtol=1e-5, atol=1e-6, msg=key)


def test_model_logit_transform_is_read_from_the_config(tmp_path):
    """A Gemma-style softcap and a Cohere-style scale on the model's config reach the loss."""
    args = GRPOConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to=[])
    model = toy.tiny_causal_lm(len(toy.char_tokenizer()), seed=0)
    model.config.final_logit_softcapping, model.config.logit_scale = 3.0, 0.5
    stand_in = type("T", (), {"accelerator": type("A", (), {"unwrap_model": staticmethod(lambda m: m)})(),
                              "model": model, "aux_loss_enabled": False})()
    cfg = config_from_trl(args, stand_in)
    assert (cfg.final_logit_softcapping, cfg.logit_scale) == (3.0, 0.5)


def assert_same_steps(ref_logs, our_logs, ref_params, our_params, keys):
    assert len(ref_logs) == len(our_logs) == 2
    for ref, ours in zip(ref_logs, our_logs):
        for key in keys:
            assert key in ref, key
            assert ours[key] == pytest.approx(ref[key], rel=1e-4, abs=1e-6), key
    for key, value in ref_params.items():
        torch.testing.assert_close(our_params[key], value, rtol=1e-5, atol=1e-6, msg=key)


def patched_trl(tmp_path, **options):
    undo = patch_trl()
    try:
        return run(GRPOTrainer, tmp_path, **options)
    finally:
        undo()


ENTRY_POINTS = {"FusedGRPOTrainer": lambda tmp_path, **options: run(FusedGRPOTrainer, tmp_path, **options),
                "patch_trl": patched_trl}


class OracleTruncatedTRL(GRPOTrainer):
    """trl.GRPOTrainer whose per-token log-probs and entropies (policy, old and reference alike) are
    over its sampler's kept set: materialised logits through the fp64 sort-based oracle."""

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, batch_size=None,
                                           compute_entropy=False, compute_aux_loss=False, **_):
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, -logits_to_keep - 1:-1]
        logp, entropy = reference.logprobs_and_entropy(logits.double(), input_ids[:, -logits_to_keep:],
                                                       temperature=self.temperature, top_k=self.top_k,
                                                       top_p=self.top_p, min_p=self.min_p)
        return logp.float(), entropy.float() if compute_entropy else None, None


# Each family's options, and TRL's run of them (once per module: both entry points compare with it).
FAMILY_OPTIONS = {"moe": dict(kind="moe", beta=0.05),
                  "vlm": dict(kind="vlm", loss_type="grpo", beta=0.05, entropy_coef=0.01),
                  # old log-probs (steps_per_generation > accumulation) and reference ones (beta > 0)
                  "truncated": dict(top_k=5, top_p=0.8, temperature=0.9, beta=0.05, steps_per_generation=4)}
REFERENCE_TRAINER = {"truncated": OracleTruncatedTRL}


@pytest.fixture(scope="module")
def trl_runs(tmp_path_factory):
    cache = {}

    def get(family):
        if family not in cache:
            cache[family] = run(REFERENCE_TRAINER.get(family, GRPOTrainer), tmp_path_factory.mktemp(f"trl_{family}"),
                                **FAMILY_OPTIONS[family])
        return cache[family]
    return get


@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
def test_moe_router_aux_loss_as_trl(entry, trl_runs, tmp_path):
    """TRL's defaults on a Qwen3-MoE (router_aux_loss_coef from the model config): the aux loss joins
    the loss as coef · aux / accumulation steps, its metric is logged, and the routers train."""
    ref_logs, ref_params = trl_runs("moe")
    our_logs, our_params = ENTRY_POINTS[entry](tmp_path, **FAMILY_OPTIONS["moe"])
    assert all(entry["aux_loss"] > 0 for entry in ref_logs)
    assert_same_steps(ref_logs, our_logs, ref_params, our_params, ("loss", "aux_loss", "entropy", "kl", "reward"))
    initial = build("moe")[0].state_dict()
    gates = [name for name in ref_params if name.endswith("mlp.gate.weight")]
    assert gates and all(not torch.equal(our_params[name], initial[name]) for name in gates)


@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
def test_vision_language_model_as_trl(entry, trl_runs, tmp_path):
    """A Qwen2-VL prompted with images: pixel_values, image_grid_thw and mm_token_type_ids reach the
    model as TRL passes them (the vision tower trains, by TRL's gradient)."""
    ref_logs, ref_params = trl_runs("vlm")
    our_logs, our_params = ENTRY_POINTS[entry](tmp_path, **FAMILY_OPTIONS["vlm"])
    assert_same_steps(ref_logs, our_logs, ref_params, our_params, ("loss", "entropy", "kl", "reward"))
    initial = tiny_qwen2_vl(qwen2_vl_processor()).state_dict()
    vision = [name for name in our_params if ".visual." in f".{name}"]
    assert vision and any(not torch.equal(our_params[name], initial[name]) for name in vision)


def test_unsupported_options_raise_at_construction(tmp_path):
    with pytest.raises(ValueError, match="loss_type='nope' is not supported"):
        config_from_trl(SimpleNamespace(loss_type="nope"))


@pytest.mark.parametrize("entry", ["FusedGRPOTrainer", "patch_trl()"])
def test_errors_name_the_option_the_fix_and_the_entry_point(entry, tmp_path):
    """Sampler settings the truncation-aware log-probs cannot reproduce (transformers applies min_p
    after top_p) raise at construction, naming the options, the way out and the entry point called."""
    options = dict(top_p=0.8, min_p=0.05, max_steps=1)
    fused = entry == "FusedGRPOTrainer"
    cls = FusedGRPOTrainer if fused else GRPOTrainer
    undo = (lambda: None) if fused else patch_trl(truncation_aware_logprobs=True)
    try:
        with pytest.raises(ValueError) as error:
            run(cls, tmp_path, trainer_kwargs=dict(truncation_aware_logprobs=True) if fused else None, **options)
    finally:
        undo()
    message = str(error.value)
    assert f"grpo_kernels' {entry}" in message
    assert "top_p=0.8" in message and "min_p=0.05" in message and "truncation_aware_logprobs=False" in message
    other = "patch_trl()" if fused else "FusedGRPOTrainer"
    assert f"grpo_kernels' {other}" not in message


def truncation_aware(entry):
    if entry == "FusedGRPOTrainer":
        keywords = dict(truncation_aware_logprobs=True, grpo_kernels_backend="torch")
        return lambda tmp_path, **options: run(FusedGRPOTrainer, tmp_path, trainer_kwargs=keywords, **options)

    def patched(tmp_path, **options):
        undo = patch_trl(truncation_aware_logprobs=True, backend="torch")
        try:
            return run(GRPOTrainer, tmp_path, **options)
        finally:
            undo()
    return patched


@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
def test_truncation_aware_logprobs_follow_trls_sampler(entry, trl_runs, tmp_path):
    """truncation_aware_logprobs=True with GRPOConfig top_k=5, top_p=0.8: the loss and the old
    and reference log-probs are over the kept set, as the oracle computes them from the logits,
    step for step."""
    ref_logs, ref_params = trl_runs("truncated")
    our_logs, our_params = truncation_aware(entry)(tmp_path, **FAMILY_OPTIONS["truncated"])
    assert_same_steps(ref_logs, our_logs, ref_params, our_params, ("loss", "entropy", "kl", "clip_ratio/region_mean"))
    assert all(entry["entropy"] < math.log(6) for entry in our_logs)  # at most 5 tokens and the target kept
    assert any(entry["kl"] > 0 for entry in our_logs)


def test_sampler_settings_are_read_as_trl_passes_them():
    """generation_kwargs override the GRPOConfig fields (as in TRL); vLLM's top_k=-1 is off; vLLM
    orders min_p before top_p as we do, so the two together are accepted there."""
    from grpo_kernels.integrations.trl import trl_sampling_truncation
    from grpo_kernels.truncation import Truncation

    def trainer(**args):
        defaults = dict(top_k=0, top_p=1.0, min_p=None, generation_kwargs=None, use_vllm=False)
        return SimpleNamespace(args=SimpleNamespace(**dict(defaults, **args)))

    assert trl_sampling_truncation(trainer(top_p=0.9, generation_kwargs={"top_k": 7})) == Truncation(7, 0.9, 0.0)
    assert trl_sampling_truncation(trainer(top_k=-1, top_p=0.9, min_p=0.1, use_vllm=True)) == Truncation(0, 0.9, 0.1)
    with pytest.raises(ValueError, match="applies min_p after top_p"):
        trl_sampling_truncation(trainer(top_p=0.9, generation_kwargs={"min_p": 0.1}))

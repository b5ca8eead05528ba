"""Our trainer samples and computes its log-probs with one truncation (top_k, top_p, min_p):
the sampler's kept set is the fp64 sort-based oracle's, the sampler's own log-probs of the sampled
tokens are the trainer's old/reference/policy log-probs, and the settings reach the loss from
TrainerConfig and from the command line (--top-k, --top-p, --min-p)."""
import pytest
import torch

from grpo_kernels import GRPOLossConfig, reference, train
from grpo_kernels.trainer import GRPOTrainer, TrainerConfig, toy
from grpo_kernels.trainer.rollout import TruncatedSampling, generate
from grpo_kernels.truncation import make_truncation

SETTINGS = [dict(top_p=0.8), dict(top_k=5), dict(min_p=0.05, top_p=0.7), dict(min_p=0.1, top_k=8, top_p=0.9)]


@pytest.mark.parametrize("settings", SETTINGS, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()))
def test_sampler_keeps_the_oracles_set(settings):
    """min_p before top_p (vLLM's order, not transformers' generate) on tie-free logits."""
    scores = torch.randn(16, 50, dtype=torch.float64) * 3
    processed = TruncatedSampling(0.7, make_truncation(**settings))(None, scores.float())
    z = scores / 0.7
    kept = reference.truncation_kept(z, z.argmax(-1), **settings)  # the argmax is always kept
    assert torch.equal(torch.isfinite(processed), kept)
    torch.testing.assert_close(processed[kept], z[kept].float())


def make_trainer(tmp_path, **overrides):
    tokenizer = toy.char_tokenizer()
    model = toy.tiny_causal_lm(len(tokenizer), seed=0)
    kw = dict(prompts_per_step=4, num_generations=4, max_new_tokens=3, max_steps=2, output_dir=str(tmp_path),
              progress=False, backend="torch", temperature=0.8)
    kw.update(overrides)
    return GRPOTrainer(model, tokenizer, [toy.exact_answer_reward], TrainerConfig(**kw))


@pytest.mark.parametrize("settings", SETTINGS[:3], ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()))
def test_log_probs_are_those_of_the_sampled_distribution(tmp_path, settings):
    """The rollout's sampling log-probs (HF generate's processed scores) equal the trainer's
    truncation-aware log-probs of the same tokens, old/ref (`_logps`) and policy (the loss's)."""
    trainer = make_trainer(tmp_path, **settings)
    assert trainer.cfg.loss.truncation == make_truncation(**settings)
    torch.manual_seed(1)
    batch = generate(trainer.model, trainer.tokenizer, [r["prompt"] for r in toy.successor_dataset(4)], trainer.cfg)
    mask = batch.completion_mask
    old = trainer._logps(trainer.model, batch)
    torch.testing.assert_close(old[mask], batch.sampling_logps[mask], rtol=1e-5, atol=1e-5)
    policy = trainer.micro_batch_loss(batch, torch.linspace(-1, 1, mask.shape[0]), old, old).logps
    torch.testing.assert_close(policy[mask], batch.sampling_logps[mask], rtol=1e-5, atol=1e-5)
    full = make_trainer(tmp_path / "full")._logps(trainer.model, batch)  # the full vocabulary: another number
    assert (full[mask] - batch.sampling_logps[mask]).abs().max() > 1e-2


def test_config_gives_the_loss_the_samplers_truncation():
    cfg = TrainerConfig(top_k=4, top_p=0.9, min_p=0.02)
    assert (cfg.loss.top_k, cfg.loss.top_p, cfg.loss.min_p) == (4, 0.9, 0.02)
    with pytest.raises(ValueError, match="TrainerConfig.min_p must be in"):
        TrainerConfig(min_p=1.5)
    with pytest.raises(ValueError, match="TrainerConfig.loss truncates with .* but the sampler with"):
        TrainerConfig(top_p=0.9, loss=GRPOLossConfig(top_p=0.8))


def test_command_line_flags_reach_the_trainer(tmp_path, monkeypatch):
    built = []

    def recording(model, tokenizer, rewards, cfg):
        built.append(cfg)
        return GRPOTrainer(model, tokenizer, rewards, cfg)

    monkeypatch.setattr(train, "GRPOTrainer", recording)
    argv = ["--steps", "1", "--prompts-per-step", "2", "--num-generations", "2", "--target-reward", "none",
            "--backend", "torch", "--threads", "1", "--output-dir", str(tmp_path / "run"),
            "--top-k", "6", "--top-p", "0.8", "--min-p", "0.05"]
    assert train.main(argv) == 0
    assert built[0].truncation == make_truncation(6, 0.8, 0.05) == built[0].loss.truncation

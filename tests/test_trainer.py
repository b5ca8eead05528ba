"""The thin trainer: smoke, convergence, bit-for-bit resume, reward-function errors, and nothing
lost (final checkpoint, an existing run refused or set aside, failures and signals) (CPU, tiny model)."""
import json
import signal

import pytest
import torch
from helpers import snapshot

from grpo_kernels import GRPOLossConfig
from grpo_kernels.ops.dispatch import BackendUnavailableError
from grpo_kernels.trainer import (
    GRPOTrainer, NoCheckpointError, RunExistsError, TrainerConfig, TrainingInterrupted, checkpoint, toy,
)


def make_trainer(tmp_path, reward_funcs=(toy.exact_answer_reward,), **overrides):
    tokenizer = toy.char_tokenizer()
    model = toy.tiny_causal_lm(len(tokenizer), seed=0)
    kw = dict(prompts_per_step=4, num_generations=4, max_new_tokens=3, learning_rate=3e-3, max_steps=3,
              output_dir=str(tmp_path), progress=False, backend="torch")
    kw.update(overrides)
    return GRPOTrainer(model, tokenizer, list(reward_funcs), TrainerConfig(**kw))


def test_smoke_logs_every_metric(tmp_path):
    trainer = make_trainer(tmp_path, loss=GRPOLossConfig(loss_type="dapo", beta=0.05), num_iterations=2,
                           gradient_accumulation_steps=2)
    history = trainer.train(toy.successor_dataset(20))
    assert [h["step"] for h in history] == [1, 2, 3]
    for key in ("reward", "kl", "entropy", "clip_ratio/region", "loss", "grad_norm", "tokens_per_s",
                "rewards/exact_answer_reward"):
        assert all(key in h and h[key] == h[key] for h in history), key
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3]


def test_reward_rises_from_random_policy(tmp_path):
    """Fixed seed: the successor task (digit then EOS) goes from ~0 (random) to well above it."""
    trainer = make_trainer(tmp_path, prompts_per_step=16, num_generations=8, max_new_tokens=2, learning_rate=1e-3,
                           max_steps=150, seed=0)
    history = trainer.train(toy.successor_dataset(200))
    first = sum(h["reward"] for h in history[:5]) / 5
    last = sum(h["reward"] for h in history[-5:]) / 5
    assert first < 0.1
    assert last > 0.6, f"reward only went from {first:.2f} to {last:.2f}"


def test_resume_is_bit_for_bit(tmp_path):
    data = toy.successor_dataset(30)
    straight = make_trainer(tmp_path / "a", max_steps=4)
    straight.train(data)
    interrupted = make_trainer(tmp_path / "b", max_steps=2, save_steps=2)
    interrupted.train(data)
    resumed = make_trainer(tmp_path / "b", max_steps=4, save_steps=2)
    history = resumed.train(data, resume=True)
    assert [h["step"] for h in history] == [1, 2, 3, 4]
    for (name, a), (_, b) in zip(straight.model.state_dict().items(), resumed.model.state_dict().items()):
        assert torch.equal(a, b), name
    assert [h["reward"] for h in history] == [h["reward"] for h in straight.history]


def test_resume_without_checkpoint_raises(tmp_path):
    with pytest.raises(NoCheckpointError, match="holds no intact checkpoint"):
        make_trainer(tmp_path).train(toy.successor_dataset(10), resume=True)
    assert list(tmp_path.iterdir()) == []


def test_final_checkpoint_whatever_save_steps_is(tmp_path):
    make_trainer(tmp_path / "a", max_steps=3, save_steps=2).train(toy.successor_dataset(10))
    assert sorted(p.name for p in (tmp_path / "a").glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-3"]
    assert (tmp_path / "a" / "latest").read_text() == "checkpoint-3"
    assert checkpoint.load_latest(str(tmp_path / "a"))["step"] == 3
    make_trainer(tmp_path / "b", max_steps=3).train(toy.successor_dataset(10))  # save_steps=0: the final one only
    assert [p.name for p in (tmp_path / "b").glob("checkpoint-*")] == ["checkpoint-3"]
    make_trainer(tmp_path / "c", max_steps=3, save_final=False).train(toy.successor_dataset(10))
    assert not list((tmp_path / "c").glob("checkpoint-*"))


def test_existing_run_is_refused_and_overwrite_sets_it_aside_only_after_a_step(tmp_path, monkeypatch):
    """A second run into a directory that holds one: refused without resume/overwrite; with them,
    a failure at the first step leaves every file byte for byte; a successful overwrite moves the
    earlier run, whole, into replaced-<date>/. Calling train() again on the same trainer continues."""
    data = toy.successor_dataset(10)
    first = make_trainer(tmp_path, max_steps=2)
    first.train(data)
    before = snapshot(tmp_path)
    with pytest.raises(RunExistsError, match=r"already holds a run \(metrics.jsonl, checkpoint-2\): pass resume=True "
                                             r"to continue it, or overwrite=True to start a new one"):
        make_trainer(tmp_path).train(data)
    with pytest.raises(ValueError, match="pass one of them"):
        make_trainer(tmp_path).train(data, resume=True, overwrite=True)

    def fails(self, dataset):
        raise RuntimeError("the first step failed")

    with monkeypatch.context() as patch:
        patch.setattr(GRPOTrainer, "train_step", fails)
        for kwargs in (dict(overwrite=True), dict(resume=True)):
            with pytest.raises(RuntimeError, match="the first step failed"):
                make_trainer(tmp_path, max_steps=4).train(data, **kwargs)
            assert snapshot(tmp_path) == before, kwargs

    first.cfg.max_steps = 3
    first.train(data)  # its own run: continued, not refused
    assert [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    before = snapshot(tmp_path)
    make_trainer(tmp_path, max_steps=1, seed=1).train(data, overwrite=True)
    (aside,) = tmp_path.glob("replaced-*")
    assert snapshot(aside) == before
    assert [p.name for p in tmp_path.glob("checkpoint-*")] == ["checkpoint-1"]
    assert checkpoint.load_latest(str(aside))["step"] == 3  # the earlier run still resumes from there


def test_sigint_stops_after_the_step_with_a_checkpoint_and_resume_is_bit_for_bit(tmp_path, monkeypatch):
    data = toy.successor_dataset(30)
    straight = make_trainer(tmp_path / "a", max_steps=4)
    straight.train(data)
    real_step = GRPOTrainer.train_step

    def step(self, dataset):
        if self.step == 1:
            signal.raise_signal(signal.SIGINT)  # during step 2
        return real_step(self, dataset)

    monkeypatch.setattr(GRPOTrainer, "train_step", step)
    with pytest.raises(TrainingInterrupted, match="SIGINT stopped training at step 2") as stopped:
        make_trainer(tmp_path / "b", max_steps=4).train(data)
    assert isinstance(stopped.value, KeyboardInterrupt) and stopped.value.signum == signal.SIGINT
    assert stopped.value.step == 2 and stopped.value.checkpoint == str(tmp_path / "b" / "checkpoint-2")
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    monkeypatch.setattr(GRPOTrainer, "train_step", real_step)
    resumed = make_trainer(tmp_path / "b", max_steps=4)
    history = resumed.train(data, resume=True)
    for (name, a), (_, b) in zip(straight.model.state_dict().items(), resumed.model.state_dict().items()):
        assert torch.equal(a, b), name
    assert [h["reward"] for h in history] == [h["reward"] for h in straight.history]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the cuda backend can run here")
def test_unavailable_backend_fails_when_the_trainer_is_built(tmp_path):
    with pytest.raises(BackendUnavailableError, match="TrainerConfig.backend='cuda' is unavailable: it runs on cuda"):
        make_trainer(tmp_path, backend="cuda")


def test_none_rewards_are_unscorable(tmp_path):
    def sometimes_none(prompts, completions, **_):
        return [None if i % 3 == 0 else 1.0 for i in range(len(completions))]

    history = make_trainer(tmp_path, reward_funcs=[sometimes_none], max_steps=1).train(toy.successor_dataset(10))
    assert history[0]["reward"] == 1.0  # unscorable completions are left out of the mean


def test_reward_function_that_raises_is_named(tmp_path):
    def broken(prompts, completions, **_):
        raise KeyError("answer")

    with pytest.raises(RuntimeError, match="reward function 'broken' raised KeyError"):
        make_trainer(tmp_path, reward_funcs=[broken]).train(toy.successor_dataset(10))


def test_reward_function_with_wrong_count_raises(tmp_path):
    def short(prompts, completions, **_):
        return [1.0]

    with pytest.raises(ValueError, match="reward function 'short' returned 1 values for 16 completions"):
        make_trainer(tmp_path, reward_funcs=[short]).train(toy.successor_dataset(10))


def test_reward_function_with_bad_type_raises(tmp_path):
    def text(prompts, completions, **_):
        return ["good"] * len(completions)

    with pytest.raises(TypeError, match="returned 'good' for completion 0"):
        make_trainer(tmp_path, reward_funcs=[text]).train(toy.successor_dataset(10))


@pytest.mark.parametrize("kwargs, words", [
    (dict(num_generations=1), "num_generations must be >= 2"),
    (dict(gradient_accumulation_steps=3), r"must divide prompts_per_step \* num_generations"),
    (dict(lr_schedule="step"), "lr_schedule='step'"),
    (dict(stop_at_reward=float("nan")), "stop_at_reward must be a finite number or None"),
])
def test_bad_config(kwargs, words):
    with pytest.raises(ValueError, match=words):
        TrainerConfig(**kwargs)


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo"])
def test_padding_free_batches_give_the_padded_numbers(tmp_path, loss_type):
    """Packed (one row, positions restarting per sequence) == padded, loss and gradients."""
    from grpo_kernels.trainer.rollout import generate

    trainer = make_trainer(tmp_path, loss=GRPOLossConfig(loss_type=loss_type, beta=0.1, max_completion_length=3))
    prompts = [r["prompt"] for r in toy.successor_dataset(4)]
    torch.manual_seed(3)
    batch = generate(trainer.model, trainer.tokenizer, prompts, trainer.cfg)
    adv = torch.randn(batch.completion_ids.shape[0])
    ref = trainer._logps(trainer.model, batch) - 0.1
    results = []
    for packed in (False, True):
        trainer.cfg.padding_free = packed
        trainer.model.zero_grad()
        out = trainer.micro_batch_loss(batch, adv, None, ref[batch.completion_mask] if packed else ref)
        out.loss.backward()
        grads = [p.grad.clone() for p in trainer.model.parameters()]
        results.append((out.loss.detach(), grads, trainer._logps(trainer.model, batch)))
    (l0, g0, lp0), (l1, g1, lp1) = results
    torch.testing.assert_close(l1, l0, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lp1, lp0[batch.completion_mask], rtol=1e-5, atol=1e-5)  # packed: (N,)
    for a, b in zip(g1, g0):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_padding_free_step_keeps_old_and_ref_packed(tmp_path):
    """A whole optimizer step in gradient-accumulation micro-batches: packed old/ref log-probs are
    sliced per micro-batch as they are (never padded and re-packed) and give the padded update."""
    from grpo_kernels.trainer.rollout import generate

    updates = []
    for packed in (False, True):
        trainer = make_trainer(tmp_path / str(packed), loss=GRPOLossConfig(loss_type="dapo", beta=0.1),
                               gradient_accumulation_steps=2, padding_free=packed)
        torch.manual_seed(5)
        batch = generate(trainer.model, trainer.tokenizer, [r["prompt"] for r in toy.successor_dataset(4)],
                         trainer.cfg)
        old = trainer._logps(trainer.model, batch)
        assert old.dim() == (1 if packed else 2)
        before = [p.detach().clone() for p in trainer.model.parameters()]
        trainer._optimize(batch, torch.linspace(-1, 1, batch.completion_ids.shape[0]), old, old - 0.1)
        updates.append([p.detach() - b for p, b in zip(trainer.model.parameters(), before)])
    for a, b in zip(*updates):
        torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-5)  # Adam: updates ~lr = 3e-3


def test_adaptive_entropy_follows_trls_rule(tmp_path):
    """The coefficient starts gated (no entropy measured yet), then moves by delta each step towards
    more bonus while the step's entropy is <= target, clipped to [min, max]; resume keeps it."""
    trainer = make_trainer(tmp_path, loss=GRPOLossConfig(entropy_coef=0.01), use_adaptive_entropy=True,
                           entropy_target=10.0, entropy_coef_delta=0.02, entropy_coef_max=0.05, max_steps=4)
    applied = []
    original = trainer._applied_entropy_coef
    trainer._applied_entropy_coef = lambda: applied.append(original()) or applied[-1]
    history = trainer.train(toy.successor_dataset(20))
    assert [h["entropy_coef"] for h in history] == pytest.approx([0.03, 0.05, 0.05, 0.05])
    assert applied == pytest.approx([0.0, 0.03, 0.05, 0.05])
    low_target = make_trainer(tmp_path / "low", loss=GRPOLossConfig(entropy_coef=0.05), use_adaptive_entropy=True,
                              entropy_target=0.0, entropy_coef_delta=0.02, max_steps=3)
    assert [h["entropy_coef"] for h in low_target.train(toy.successor_dataset(20))] == pytest.approx([0.03, 0.01, 0.0])


def test_model_logit_transform_reaches_the_loss(tmp_path):
    tokenizer = toy.char_tokenizer()
    model = toy.tiny_causal_lm(len(tokenizer), seed=0)
    model.config.final_logit_softcapping = 2.0
    trainer = GRPOTrainer(model, tokenizer, [toy.exact_answer_reward],
                          TrainerConfig(output_dir=str(tmp_path), progress=False, max_steps=1))
    assert trainer.cfg.loss.final_logit_softcapping == 2.0 and trainer.cfg.loss.logit_scale == 1.0
    with pytest.raises(ValueError, match="final_logit_softcapping=5.0 disagrees"):
        GRPOTrainer(model, tokenizer, [toy.exact_answer_reward],
                    TrainerConfig(output_dir=str(tmp_path), loss=GRPOLossConfig(final_logit_softcapping=5.0)))


def test_missing_stop_at_reward_warns_and_the_main_job_fails(tmp_path):
    trainer = make_trainer(tmp_path / "a", max_steps=2, stop_at_reward=0.99)
    with pytest.warns(RuntimeWarning, match=r"ended at step 2 without reaching stop_at_reward=0.99"):
        trainer.train(toy.successor_dataset(10))
    assert not trainer.reached_target
    from grpo_kernels.train import main

    with pytest.warns(RuntimeWarning, match="fewer than the 5 steps"):
        status = main(["--steps", "2", "--prompts-per-step", "2", "--num-generations", "2", "--output-dir",
                       str(tmp_path / "b"), "--save-steps", "0"])
    assert status == 1


def test_reaching_stop_at_reward_stops_quietly(tmp_path, recwarn):
    trainer = make_trainer(tmp_path, max_steps=50, stop_at_reward=0.0)
    history = trainer.train(toy.successor_dataset(10))
    assert trainer.reached_target and len(history) == 5  # the first full window
    assert (tmp_path / "latest").read_text() == "checkpoint-5"  # the model that reached it is saved
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]


def test_thread_count_follows_model_size(tmp_path):
    from grpo_kernels.trainer.threads import SINGLE_THREAD_MAX_PARAMS, choose_threads, cpu_threads

    tiny = torch.nn.Linear(10, 10)
    big = torch.nn.Linear(1, SINGLE_THREAD_MAX_PARAMS)
    assert choose_threads("auto", tiny) == 1
    assert choose_threads("auto", big) == torch.get_num_threads()
    assert choose_threads(3, tiny) == 3
    before = torch.get_num_threads()
    with cpu_threads("auto", tiny) as chosen:
        assert chosen == 1 and torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with pytest.raises(ValueError, match="num_threads must be 'auto' or a positive int"):
        TrainerConfig(num_threads=0)

"""Our verl advantage estimators (grpo_kernels.integrations.verl.advantages) against verl 0.9.1's
own functions (core_algos), on fresh random inputs, in fp64 and fp32, for every index layout verl
produces (uuid strings in consecutive equal groups, shuffled groups of unequal size with
singletons, integer labels), with verl's config fields; the registry entries, the host reads (none
for a numpy index), the trainer's kwargs for our names and our errors.
"""
import sys
import uuid
import warnings
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import BACKENDS
from helpers import assert_close

core_algos = pytest.importorskip("verl.trainer.ppo.core_algos", reason="verl is installed by the README's test command")
from verl.trainer.config import AlgoConfig  # noqa: E402

from benchmarks.host_overhead import count_host_reads  # noqa: E402
from grpo_kernels.integrations import verl as gk_verl  # noqa: E402
from grpo_kernels.integrations.verl import advantages as gk_adv  # noqa: E402

gk_verl.register_estimators()  # what the verl plugin does at import
B, T = 12, 7
LAYOUTS = ("uuid_equal", "shuffled_unequal", "int_labels")
# Estimators whose groups must have >= 2 rows (verl raises on a singleton).
NEEDS_PAIRS = ("grpo_passk",)


def make_index(layout, gen):
    """verl's data.non_tensor_batch['uid'] in one of its layouts."""
    if layout == "uuid_equal":  # verl's rollout: n=4 responses per prompt, consecutive
        return np.array([str(uuid.UUID(int=int(g) + 7)) for g in np.repeat(np.arange(B // 4), 4)], dtype=object)
    if layout == "shuffled_unequal":  # after filtering / rebalancing: sizes 5, 3, 2, 1, 1, shuffled
        labels = np.array(["a"] * 5 + ["b"] * 3 + ["c"] * 2 + ["d", "e"], dtype=object)
        return labels[torch.randperm(B, generator=gen).numpy()]
    return np.repeat(np.arange(B // 3), 3)[::-1].copy()  # integer labels, groups of 3


def make_inputs(seed, dtype, layout):
    """(token_level_rewards, response_mask, index, extras) with constant groups (0/1 outcome
    rewards, equal: verl's statistics are exact there), continuous groups, an empty response."""
    gen = torch.Generator().manual_seed(seed)
    index = make_index(layout, gen)
    mask = (torch.rand(B, T, generator=gen) > 0.25).float()
    mask[:, 0] = 1.0
    mask[3, 2:] = 0.0  # a short response
    mask[7, 1:] = 0.0
    rewards = torch.randn(B, T, generator=gen, dtype=torch.float64) * mask
    labels = np.unique(index)
    constant = index == labels[0]  # a group whose rows all score exactly 1 (or 0 for the int layout)
    rewards[torch.from_numpy(constant)] = 0.0
    last = (mask.cumsum(-1) == mask.sum(-1, keepdim=True)) & mask.bool()
    rewards[torch.from_numpy(constant).unsqueeze(-1) & last] = 1.0 if layout != "int_labels" else 0.0
    old_log_probs = -torch.rand(B, T, generator=gen, dtype=torch.float64) * 3
    sum_pi_squared = torch.rand(B, T, generator=gen, dtype=torch.float64) * 0.5 + torch.exp(old_log_probs) ** 2
    extras = dict(
        old_log_probs=old_log_probs.to(dtype), sum_pi_squared=sum_pi_squared.to(dtype),
        rollout_is_weights=(torch.rand(B, T, generator=gen, dtype=torch.float64) * 2).to(dtype),
        reward_baselines=torch.randn(B, generator=gen, dtype=torch.float64).to(dtype),
    )
    return rewards.to(dtype), mask.to(dtype), index, extras


def call_kwargs(name, rewards, mask, index, extras, variant):
    """The arguments of one call, for verl's function and ours alike."""
    kwargs = dict(token_level_rewards=rewards, response_mask=mask)
    if name not in ("reinforce_plus_plus", "remax"):
        kwargs["index"] = index
    if name == "remax":
        kwargs["reward_baselines"] = extras["reward_baselines"]
    if name in ("grpo", "grpo_vectorized", "gdpo"):
        kwargs["norm_adv_by_std_in_grpo"] = variant != "no_std"
    if name == "grpo_passk":
        kwargs["config"] = AlgoConfig(norm_adv_by_std_in_grpo=variant != "no_std")
    if name == "reinforce_plus_plus":
        kwargs["config"] = AlgoConfig(gamma=0.9 if variant == "gamma" else 1.0)
    if name == "gpg":
        kwargs["f_norm"] = 1.7
    if name in ("optimal_token_baseline", "tir_optimal_token_baseline"):
        kwargs.update(old_log_probs=extras["old_log_probs"], sum_pi_squared=extras["sum_pi_squared"],
                      rollout_is_weights=extras["rollout_is_weights"] if variant == "is_weights" else None,
                      handle_zero_tail=variant != "no_zero_tail")
    return kwargs


VARIANTS = {
    "grpo": ("default", "no_std"), "grpo_vectorized": ("default", "no_std"), "gdpo": ("default", "no_std"),
    "grpo_passk": ("default", "no_std"), "reinforce_plus_plus": ("default", "gamma"),
    "optimal_token_baseline": ("default", "is_weights", "no_zero_tail"),
    "tir_optimal_token_baseline": ("default", "is_weights", "no_zero_tail"),
}
CASES = [(name, variant) for name in gk_adv.ESTIMATORS for variant in VARIANTS.get(name, ("default",))]


def tolerance(name, dtype):
    if dtype == torch.float32:
        return dict(rtol=2e-5, atol=2e-5)
    if name in ("grpo_vectorized",):  # verl takes these group statistics in fp32 whatever the dtype
        return dict(rtol=1e-5, atol=1e-5)
    return dict(rtol=1e-10, atol=1e-10)


def verl_estimator(name, kwargs):
    # verl's loop estimators write into their score tensor: give them copies.
    kwargs = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
    return core_algos.get_adv_estimator_fn(name)(**kwargs)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("name,variant", CASES, ids=[f"{n}-{v}" for n, v in CASES])
def test_estimator_matches_verl(name, variant, layout, dtype):
    rewards, mask, index, extras = make_inputs(seed=len(name) * 31 + LAYOUTS.index(layout), dtype=dtype,
                                               layout=layout)
    kwargs = call_kwargs(name, rewards, mask, index, extras, variant)
    if name in NEEDS_PAIRS and layout == "shuffled_unequal":
        with pytest.raises(ValueError):
            verl_estimator(name, kwargs)
        with pytest.raises(ValueError, match="at least 2 samples per group"):
            core_algos.get_adv_estimator_fn(f"grpo_kernels_{name}")(**kwargs)
        return
    expected_adv, expected_ret = verl_estimator(name, kwargs)
    adv, ret = core_algos.get_adv_estimator_fn(f"grpo_kernels_{name}")(**kwargs)
    assert adv.dtype == expected_adv.dtype and ret.dtype == expected_ret.dtype
    assert adv.shape == (B, T) and ret.shape == (B, T)
    assert_close(adv, expected_adv, name=f"{name} advantages", **tolerance(name, dtype))
    assert_close(ret, expected_ret, name=f"{name} returns", **tolerance(name, dtype))


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_backend_gives_verls_grpo(backend):
    """The group statistics come from the backend op: each backend, fp32, both layouts (the
    consecutive-groups fast path and the general group index)."""
    for layout in ("uuid_equal", "shuffled_unequal"):
        rewards, mask, index, extras = make_inputs(seed=3, dtype=torch.float32, layout=layout)
        kwargs = call_kwargs("grpo", rewards, mask, index, extras, "default")
        expected, _ = verl_estimator("grpo", kwargs)
        adv, _ = gk_adv.advantage_estimator_fn("grpo", backend)(**kwargs)
        assert_close(adv, expected, rtol=2e-5, atol=2e-5, name=f"{backend} {layout}")


def test_gdpo_reward_keys_as_verls_trainer_passes_them():
    """gdpo with config.gdpo_reward_keys / weights, non_tensor_batch and batch, as the trainer calls it."""
    rewards, mask, index, _ = make_inputs(seed=5, dtype=torch.float32, layout="shuffled_unequal")
    gen = np.random.default_rng(5)
    non_tensor_batch = {"uid": index, "fmt": gen.integers(0, 2, B).astype(np.float32),
                        "acc": gen.standard_normal(B).astype(np.float32)}
    prompt_len = 3
    batch = {"prompts": torch.zeros(B, prompt_len),
             "attention_mask": torch.cat([torch.ones(B, prompt_len), mask], 1).long()}
    config = AlgoConfig(gdpo_reward_keys=["fmt", "acc"], gdpo_reward_weights=[0.7, 1.3])
    kwargs = dict(token_level_rewards=rewards, response_mask=mask, index=index, config=config,
                  non_tensor_batch=non_tensor_batch, batch=batch)
    expected, _ = verl_estimator("gdpo", kwargs)
    adv, ret = core_algos.get_adv_estimator_fn("grpo_kernels_gdpo")(**kwargs)
    assert_close(adv, expected, rtol=2e-5, atol=2e-5)
    with pytest.raises(ValueError, match="gdpo_reward_keys"):
        gk_adv.compute_gdpo(**{**kwargs, "config": AlgoConfig()})


@pytest.mark.parametrize("layout,most", [("uuid_equal", 0), ("shuffled_unequal", 1)])
@pytest.mark.parametrize("name", [n for n in gk_adv.ESTIMATORS if n not in NEEDS_PAIRS] + list(NEEDS_PAIRS))
def test_at_most_one_host_read(name, layout, most):
    """The index -> group mapping is host work on verl's numpy array: groups of one size read no
    tensor; groups of several sizes let the backend op read one (the largest group, for its grid).
    verl's loop estimators run a Python loop of torch ops per row and group instead."""
    if name in NEEDS_PAIRS and layout == "shuffled_unequal":
        layout = "int_labels"
    rewards, mask, index, extras = make_inputs(seed=9, dtype=torch.float32, layout=layout)
    kwargs = call_kwargs(name, rewards, mask, index, extras, "default")
    fn = core_algos.get_adv_estimator_fn(f"grpo_kernels_{name}")
    assert count_host_reads(lambda: fn(**kwargs)) <= most


def test_a_torch_index_on_the_device_is_read_once():
    rewards, mask, _, _ = make_inputs(seed=2, dtype=torch.float32, layout="uuid_equal")
    index = torch.arange(B) // 4
    fn = gk_adv.advantage_estimator_fn("grpo")
    assert count_host_reads(lambda: fn(rewards, mask, index)) <= 1
    assert_close(fn(rewards, mask, index)[0], verl_estimator("grpo", dict(
        token_level_rewards=rewards, response_mask=mask, index=index.numpy()))[0], rtol=2e-5, atol=2e-5)


def test_registry_names_and_reregistration():
    names = gk_verl.register_estimators()
    assert names == tuple(f"grpo_kernels_{n}" for n in gk_adv.ESTIMATORS)
    assert "grpo_kernels_gae" not in core_algos.ADV_ESTIMATOR_REGISTRY
    # registering again, with another backend, replaces our entries instead of tripping verl's check
    gk_verl.register_estimators(backend="torch")
    assert core_algos.get_adv_estimator_fn("grpo_kernels_rloo") is gk_adv.advantage_estimator_fn("rloo", "torch")
    gk_verl.register_estimators()
    registered = {n for n in core_algos.ADV_ESTIMATOR_REGISTRY if not n.startswith("grpo_kernels_")}
    assert set(gk_adv.ESTIMATORS) | {"gae"} <= registered  # every verl estimator but gae has our twin


def test_bad_arguments_are_named():
    rewards, mask, index, _ = make_inputs(seed=1, dtype=torch.float32, layout="uuid_equal")
    with pytest.raises(ValueError, match="index"):
        gk_adv.compute_grpo(rewards, mask, None)
    with pytest.raises(ValueError, match="labels for 12 rows"):
        gk_adv.compute_grpo(rewards, mask, index[:5])
    with pytest.raises(ValueError, match="gamma"):
        gk_adv.compute_reinforce_plus_plus(rewards, mask)
    with pytest.raises(ValueError, match="no grpo_kernels version"):
        gk_adv.advantage_estimator_fn("gae")


class _Batch(dict):
    """The part of a TensorDict that verl's compute_advantage uses."""


@pytest.mark.parametrize("name", ["grpo", "optimal_token_baseline", "gdpo", "remax"])
def test_wrapped_compute_advantage_gives_our_names_verls_arguments(name):
    """verl's trainer picks an estimator's extra arguments by its name (grpo: the trainer's
    norm_adv_by_std_in_grpo; OTB: sum_pi_squared, old_log_probs, rollout_is_weights; gdpo: the
    batch). The wrapped compute_advantage gives them to grpo_kernels_<name> too."""
    rewards, mask, index, extras = make_inputs(seed=4, dtype=torch.float32, layout="uuid_equal")
    batch = _Batch(token_level_rewards=rewards, response_mask=mask, old_log_probs=extras["old_log_probs"],
                   sum_pi_squared=extras["sum_pi_squared"], rollout_is_weights=extras["rollout_is_weights"],
                   reward_baselines=extras["reward_baselines"], prompts=torch.zeros(B, 2),
                   attention_mask=torch.cat([torch.ones(B, 2), mask], 1).long())
    non_tensor = {"uid": index, "acc": np.linspace(0, 1, B).astype(np.float32)}
    config = AlgoConfig(gdpo_reward_keys=["acc"])
    calls = []

    def verls_compute_advantage(data, adv_estimator, gamma=1.0, lam=1.0, num_repeat=1,
                                norm_adv_by_std_in_grpo=True, config=None):
        calls.append(adv_estimator)
        return data

    wrapped = gk_adv.wrap_compute_advantage(verls_compute_advantage)
    data = SimpleNamespace(batch=batch, non_tensor_batch=non_tensor)
    wrapped(data, f"grpo_kernels_{name}", norm_adv_by_std_in_grpo=False, config=config)
    assert calls == []
    expected_kwargs = gk_adv.estimator_kwargs(f"grpo_kernels_{name}", batch, non_tensor, config, False)
    base_kwargs = dict(expected_kwargs)
    expected, _ = verl_estimator(name, base_kwargs)
    assert_close(data.batch["advantages"], expected, rtol=2e-5, atol=2e-5)
    if name == "grpo":
        assert expected_kwargs["norm_adv_by_std_in_grpo"] is False and "config" not in expected_kwargs
    wrapped(data, "grpo", config=config)  # verl's own names go to verl's function
    assert calls == ["grpo"]
    assert gk_adv.wrap_compute_advantage(wrapped) is wrapped


# ------------------------------------------------------------------------ Σπ² for the OTB estimators
def _import_fsdp_engine(monkeypatch):
    """verl's FSDP engine module; it imports peft at the top, which the CPU test environment lacks
    and the Σπ² path never uses: a stand-in module for the import only (restored after the test)."""
    import importlib
    import importlib.util
    import types

    if importlib.util.find_spec("peft") is None:
        for name in ("peft", "peft.utils", "peft.utils.save_and_load"):
            stub = types.ModuleType(name)
            stub.__path__ = []
            stub.__getattr__ = lambda attr: type(attr, (), {})
            monkeypatch.setitem(sys.modules, name, stub)
    try:
        with warnings.catch_warnings():  # verl's engine package warns about every engine it cannot load
            warnings.simplefilter("ignore")
            return importlib.import_module("verl.workers.engine.fsdp.transformer_impl")
    except ImportError as exc:  # pragma: no cover - a verl without its FSDP engine
        pytest.skip(f"verl's FSDP engine does not import here: {exc}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("remove_padding", [True, False], ids=["packed", "padded"])
def test_fsdp_engine_gives_sum_pi_squared_with_fused_kernels(monkeypatch, remove_padding, backend):
    """verl refuses calculate_sum_pi_squared with use_fused_kernels (it needs the logits); with
    patch_sum_pi_squared the engine's fused forward returns Σπ² from our fused-linear pass, laid out
    as the log-probs (nested, per sequence), equal to verl's Σπ² from the materialised logits."""
    from tensordict import TensorDict
    from verl.utils import tensordict_utils as tu
    from verl.utils import torch_functional as verl_F
    from verl.utils.experimental import torch_functional as verl_fused
    from verl.utils.kernel import linear_cross_entropy as verl_lce

    from grpo_kernels.integrations.verl import sum_pi_squared as gk_spsq

    impl = _import_fsdp_engine(monkeypatch)
    monkeypatch.setattr(verl_fused, "FusedLinearForPPO", verl_fused.FusedLinearForPPO)  # restored after
    monkeypatch.setattr(verl_lce, "linear_cross_entropy", verl_lce.linear_cross_entropy)

    class Engine(impl.FSDPEngineWithLMHead):
        """verl's LM-head engine without a model: prepare_model_inputs gives the output args only."""

        def __init__(self):
            self.use_ulysses_sp = False

        def prepare_model_inputs(self, micro_batch):
            flat = micro_batch["input_ids"].values()
            return {}, {"pad_size": 0, "temperature_is_one": False, "input_ids_rmpad_rolled": flat,
                        "temperature_rmpad": torch.full(flat.shape, temperature)}

    gen = torch.Generator().manual_seed(0)
    lengths, hidden_size, vocab, temperature = [3, 5, 2], 8, 13, 0.7
    weight = torch.randn(vocab, hidden_size, generator=gen)
    hidden = [torch.randn(n, hidden_size, generator=gen) for n in lengths]
    labels = [torch.randint(0, vocab, (n,), generator=gen) for n in lengths]
    input_ids = torch.nested.nested_tensor(labels, layout=torch.jagged)
    micro_batch = TensorDict({"input_ids": input_ids}, batch_size=[len(lengths)])
    tu.assign_non_tensor(micro_batch, use_remove_padding=remove_padding, use_fused_kernels=True,
                         calculate_entropy=True, calculate_sum_pi_squared=True)
    if remove_padding:  # verl's packed forward: (1, total tokens, H)
        hidden_in, labels_in = torch.cat(hidden).unsqueeze(0), torch.cat(labels).unsqueeze(0)
    else:  # padded (batch, max length, H)
        hidden_in = torch.nn.utils.rnn.pad_sequence(hidden, batch_first=True)
        labels_in = torch.nn.utils.rnn.pad_sequence(labels, batch_first=True)

    def forward(engine):
        """What verl's fused model forward (dense_common.forward_with_torch_backend) does."""
        _, output_args = engine.prepare_model_inputs(micro_batch)
        log_probs, entropy = verl_fused.FusedLinearForPPO(impl_backend="torch")(
            hidden_states=hidden_in, vocab_weights=weight, input_ids=labels_in, temperature=temperature)
        return engine.prepare_model_outputs(SimpleNamespace(log_probs=log_probs, entropy=entropy), output_args,
                                            micro_batch, None)

    with pytest.raises(NotImplementedError, match="Σπ²"):  # verl alone
        forward(Engine())
    gk_spsq.patch_sum_pi_squared(backend=backend, engine_class=Engine)
    out = forward(Engine())
    expected = verl_F.calculate_sum_pi_squared_from_logits(torch.cat(hidden) @ weight.T / temperature)
    assert out["sum_pi_squared"].is_nested and out["sum_pi_squared"].offsets().tolist() == [0, 3, 8, 10]
    assert_close(out["sum_pi_squared"].values(), expected, rtol=1e-5, atol=1e-6)
    assert_close(out["log_probs"].values(), torch.log_softmax(torch.cat(hidden) @ weight.T / temperature, -1)
                 .gather(-1, torch.cat(labels).unsqueeze(-1)).squeeze(-1), rtol=1e-5, atol=1e-5)
    # a micro-batch that does not ask for Σπ² gets none, and the fused pass keeps none
    tu.assign_non_tensor(micro_batch, calculate_sum_pi_squared=False)
    assert "sum_pi_squared" not in forward(Engine()) and gk_spsq.take_sum_pi_squared() is None

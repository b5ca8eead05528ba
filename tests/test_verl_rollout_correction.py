"""Our rollout correction (grpo_kernels.integrations.verl.rollout_correction) against verl 0.9.1's
compute_rollout_correction_and_rejection_mask on fresh random inputs, fp64 and fp32: every IS
level and threshold form (TIS float / float string, IcePop "lower_upper"), with and without batch
normalisation; every rejection option alone and chained; the same weights, mask and metrics (keys
and values); one host read per call; verl's errors; and verl's call site gets ours once patched.
"""
import importlib
import json
import subprocess
import sys

import pytest
import torch
from helpers import assert_close

rollout_corr_helper = pytest.importorskip("verl.trainer.ppo.rollout_corr_helper",
                                          reason="verl is installed by the README's test command")
from verl.protocol import DataProto  # noqa: E402

from benchmarks.host_overhead import count_host_reads  # noqa: E402
from grpo_kernels.integrations import verl as gk_verl  # noqa: E402
# the package's `rollout_correction` is the function; the module is reached by its full name
gk_rc = importlib.import_module("grpo_kernels.integrations.verl.rollout_correction")

VERL = gk_rc.VERL_FUNCTION
B, T = 8, 10
IS_THRESHOLDS = (2.0, "1.5", "0.7_1.6")  # TIS float, TIS string, IcePop lower_upper
# One threshold per option, at the scale of the inputs' divergences, so each rejects some and keeps some.
RS_THRESHOLDS = {
    "token_k1": "0.8_1.25", "token_k2": "0.05", "token_k3": "0.05",
    "seq_sum_k1": "0.6_1.7", "seq_sum_k2": "1.0", "seq_sum_k3": "0.3",
    "seq_mean_k1": "0.9_1.1", "seq_mean_k2": "0.04", "seq_mean_k3": "0.04",
    "seq_max_k2": "0.15", "seq_max_k3": "0.15",
}
RS_OPTIONS = tuple(RS_THRESHOLDS)


def test_oracle_is_verls_own_function():
    """`import verl` loads our plugin, which puts ours in verl's module: VERL is verl's own all the same."""
    assert VERL.__module__ == rollout_corr_helper.__name__ and VERL is not gk_verl.rollout_correction
    old, rollout, mask = make_inputs(seed=0, dtype=torch.float32)
    assert count_host_reads(lambda: VERL(old, rollout, mask, rollout_is="token")) > 10  # verl's many .item()


def make_inputs(seed, dtype, mask_dtype=torch.float32):
    """(old_log_prob, rollout_log_prob, response_mask): a drifted rollout policy, a token past
    verl's ±20 safety clamp, a sequence whose log-ratio sum passes it, an empty sequence."""
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    rollout = old + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)
    rollout[1, 2] = old[1, 2] - 23.0  # token log-ratio +23
    rollout[5, :] = old[5, :] + 2.5  # sequence log-ratio sum ≈ −2.5·len (< −20)
    mask = torch.rand(B, T, generator=g) > 0.2
    mask[:, 0] = True
    mask[1, 2] = True
    mask[6] = False  # an empty response
    return old.to(dtype), rollout.to(dtype), mask.to(mask_dtype)


def run_both(inputs, **options):
    expected = VERL(*inputs, **options)
    ours = gk_verl.rollout_correction(*inputs, **options)
    return expected, ours


def assert_same(expected, ours, dtype):
    (e_w, e_mask, e_metrics), (o_w, o_mask, o_metrics) = expected, ours
    tol = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-6, atol=1e-6)
    assert (e_w is None) == (o_w is None)
    if e_w is not None:
        assert isinstance(o_w, DataProto) and list(o_w.batch.keys()) == ["rollout_is_weights"]
        assert o_w.batch["rollout_is_weights"].dtype == e_w.batch["rollout_is_weights"].dtype
        assert_close(o_w.batch["rollout_is_weights"], e_w.batch["rollout_is_weights"], name="weights", **tol)
    assert o_mask.dtype == e_mask.dtype
    assert torch.equal(o_mask, e_mask)
    assert list(o_metrics) == list(e_metrics)
    for key, value in e_metrics.items():
        assert isinstance(o_metrics[key], float)
        assert o_metrics[key] == pytest.approx(value, **metric_tolerance(key, e_metrics, dtype)), key


def metric_tolerance(key, metrics, dtype):
    """Every metric to rounding, but a rejection option's `_std`: verl takes it as
    sqrt(E[c²] − E[c]²) over the tokens, ours (for a sequence option) from length-weighted sums
    over the sequences; where that difference cancels, each carries rounding of order
    sqrt(ε)·max|c| (verl's own value moves that much with the summation order). The bound on |c|
    is the statistic's reported max / min."""
    rtol, atol = (1e-9, 1e-11) if dtype == torch.float64 else (2e-5, 1e-5)
    prefix = key[:-len("_std")]
    if key.startswith("rollout_corr/rollout_rs_") and key.endswith("_std") and f"{prefix}_max" in metrics:
        scale = max(abs(metrics[f"{prefix}_max"]), abs(metrics[f"{prefix}_min"]))
        atol = max(atol, 8 * torch.finfo(dtype).eps ** 0.5 * scale)
    return dict(rel=rtol, abs=atol)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("batch_normalize", [False, True], ids=["raw", "batch_norm"])
@pytest.mark.parametrize("threshold", IS_THRESHOLDS, ids=["tis_float", "tis_str", "icepop"])
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_importance_weights_match_verl(level, threshold, batch_normalize, dtype):
    inputs = make_inputs(seed=IS_THRESHOLDS.index(threshold) + 3 * (level == "token"), dtype=dtype)
    expected, ours = run_both(inputs, rollout_is=level, rollout_is_threshold=threshold,
                              rollout_is_batch_normalize=batch_normalize)
    assert_same(expected, ours, dtype)
    weights = expected[0].batch["rollout_is_weights"]
    assert weights.unique().numel() > 2  # 0 and >= 2 distinct weights: the comparison sees them


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("option", RS_OPTIONS)
def test_each_rejection_option_matches_verl(option, dtype):
    inputs = make_inputs(seed=RS_OPTIONS.index(option), dtype=dtype)
    expected, ours = run_both(inputs, rollout_is=None, rollout_rs=option, rollout_rs_threshold=RS_THRESHOLDS[option])
    assert_same(expected, ours, dtype)
    mask, kept = inputs[2].bool(), expected[1].bool()
    assert kept.any() and (mask & ~kept).any(), "the threshold must reject some tokens and keep some"


@pytest.mark.parametrize("option", ["token_k1", "seq_sum_k1", "seq_mean_k1"])
def test_k1_single_upper_bound_means_reciprocal_lower(option):
    inputs = make_inputs(seed=11, dtype=torch.float32, mask_dtype=torch.bool)  # and a bool mask
    assert_same(*run_both(inputs, rollout_rs=option, rollout_rs_threshold=1.3), torch.float32)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("chain,threshold", [
    ("token_k1,seq_mean_k3,seq_max_k2", "0.8_1.25,0.04,0.15"),
    ("seq_sum_k2, token_k3 ,seq_max_k3,seq_sum_k2", "0.3,0.05,0.15"),  # spaces, a repeated option
    ("token_k2,seq_mean_k2", 0.05),  # one threshold shared by every option
    (",".join(RS_OPTIONS), ",".join(RS_THRESHOLDS.values())),
], ids=["three", "repeat", "shared", "all"])
def test_chained_rejection_with_importance_weights_matches_verl(chain, threshold, dtype):
    inputs = make_inputs(seed=len(chain), dtype=dtype, mask_dtype=torch.int64)
    expected, ours = run_both(inputs, rollout_is="sequence", rollout_is_threshold="0.5_3.0",
                              rollout_is_batch_normalize=True, rollout_rs=chain, rollout_rs_threshold=threshold)
    assert_same(expected, ours, dtype)


def test_one_host_read_per_call_where_verl_reads_dozens():
    inputs = make_inputs(seed=1, dtype=torch.float32)
    options = dict(rollout_is="token", rollout_is_threshold="0.7_1.6", rollout_is_batch_normalize=True,
                   rollout_rs="token_k1,seq_mean_k3", rollout_rs_threshold="0.8_1.25,0.04")
    assert count_host_reads(lambda: gk_verl.rollout_correction(*inputs, **options)) == 1
    assert count_host_reads(lambda: VERL(*inputs, **options)) > 30


def test_verls_errors():
    old, rollout, mask = make_inputs(seed=2, dtype=torch.float32)
    for fn in (VERL, gk_verl.rollout_correction):
        with pytest.raises(ValueError, match="at least one valid token"):
            fn(old, rollout, torch.zeros_like(mask), rollout_is="token")
        with pytest.raises(ValueError, match="does not match"):
            fn(old[:, 1:], rollout, mask)
        with pytest.raises(ValueError, match="Invalid rollout_is"):
            fn(old, rollout, mask, rollout_is="tokens")
        with pytest.raises(ValueError, match="Invalid rollout_rs option"):
            fn(old, rollout, mask, rollout_rs="token_k4", rollout_rs_threshold=1.0)
        with pytest.raises(ValueError, match="explicitly provided"):
            fn(old, rollout, mask, rollout_rs="token_k1")
        with pytest.raises(ValueError, match="lower bound must be <= upper"):
            fn(old, rollout, mask, rollout_is="token", rollout_is_threshold="2.0_1.0")


def test_patched_call_site_gets_ours():
    """verl's trainer calls compute_rollout_correction_and_add_to_batch, which looks the function
    up in rollout_corr_helper at call time: once patched, the trainer's path runs ours (one host
    read) and gives verl's results."""
    old, rollout, mask = make_inputs(seed=4, dtype=torch.float32)
    config = dict(rollout_is="token", rollout_is_threshold=2.0, rollout_rs="seq_mean_k3", rollout_rs_threshold=0.04)

    def trainer_step():
        batch = DataProto.from_dict(tensors={"old_log_probs": old, "rollout_log_probs": rollout,
                                             "response_mask": mask.clone()})
        return rollout_corr_helper.compute_rollout_correction_and_add_to_batch(batch, config)

    installed = rollout_corr_helper.compute_rollout_correction_and_rejection_mask  # ours if the plugin loaded
    try:
        gk_rc.unpatch_rollout_correction()
        assert rollout_corr_helper.compute_rollout_correction_and_rejection_mask is VERL
        expected_batch, expected_metrics = trainer_step()
        verl_reads = count_host_reads(trainer_step)
        gk_verl.patch_rollout_correction()
        assert rollout_corr_helper.compute_rollout_correction_and_rejection_mask is gk_verl.rollout_correction
        batch, metrics = trainer_step()
        assert count_host_reads(trainer_step) == 1 < verl_reads
    finally:
        rollout_corr_helper.compute_rollout_correction_and_rejection_mask = installed
    assert torch.equal(batch.batch["response_mask"], expected_batch.batch["response_mask"])
    assert_close(batch.batch["rollout_is_weights"], expected_batch.batch["rollout_is_weights"])
    assert list(metrics) == list(expected_metrics)
    for key, value in expected_metrics.items():
        assert metrics[key] == pytest.approx(value, **metric_tolerance(key, expected_metrics, torch.float32)), key


# Run in a fresh process: `import verl` loads our plugin there as in a Ray worker.
PLUGIN_SCRIPT = """
import importlib, importlib.util, json, os, sys, types, warnings
os.environ["GRPO_KERNELS_VERL_ROLLOUT_CORRECTION"] = "0"
import verl
from verl.trainer.ppo import core_algos, rollout_corr_helper as helper
import grpo_kernels.integrations.verl_plugin as plugin
out = {"rollout_correction_off": helper.compute_rollout_correction_and_rejection_mask.__module__}
os.environ["GRPO_KERNELS_VERL_ROLLOUT_CORRECTION"] = "1"
importlib.reload(plugin)
out["rollout_correction_on"] = helper.compute_rollout_correction_and_rejection_mask.__module__
out["estimators"] = sum(k.startswith("grpo_kernels_") for k in core_algos.ADV_ESTIMATOR_REGISTRY)
# verl's trainer modules, imported after the plugin. Third-party modules they import at the top
# and the advantage path never uses are stood in for where this environment lacks them.
names = ("transfer_queue", "cachetools", "uvicorn", "fastapi", "torchdata", "torchdata.stateful_dataloader",
         "aiohttp", "peft", "peft.utils", "peft.utils.save_and_load")
missing = {top for top in {n.split(".")[0] for n in names} if importlib.util.find_spec(top) is None}
for name in names:
    if name.split(".")[0] in missing:
        stub = types.ModuleType(name)
        stub.__path__ = []
        stub.__getattr__ = lambda attr: type(attr, (), {})
        sys.modules[name] = stub
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import verl.trainer.ppo.ray_trainer as trainer
    import verl.trainer.ppo.v1.utils as v1
import numpy as np, torch
from verl.protocol import DataProto
from verl.trainer.config import AlgoConfig
g = torch.Generator().manual_seed(0)
B, T = 8, 6
tensors = dict(token_level_rewards=torch.randn(B, T, generator=g), response_mask=torch.ones(B, T),
               old_log_probs=-torch.rand(B, T, generator=g), sum_pi_squared=torch.rand(B, T, generator=g) * 0.3)
uid = np.array(["p"] * 4 + ["q"] * 4, dtype=object)
keys = [f"{u}_{i // 2}_{i % 2}" for i, u in enumerate(uid)]  # agent sessions of two outputs each
def advantages(estimator, multi):
    data = DataProto.from_dict(tensors={k: v.clone() for k, v in tensors.items()}, non_tensors={"uid": uid.copy()})
    if multi:
        data = v1.compute_advantage_for_multi_trajectories(data, keys, estimator, config=AlgoConfig())
    else:
        data = trainer.compute_advantage(data, estimator, norm_adv_by_std_in_grpo=False, config=AlgoConfig())
    return data.batch["advantages"]
for name, multi in (("grpo", True), ("grpo", False), ("rloo", False), ("optimal_token_baseline", False)):
    theirs, ours = advantages(name, multi), advantages("grpo_kernels_" + name, multi)
    out[f"{name}{'_multi' if multi else ''}"] = [float((theirs - ours).abs().max()), float(theirs.abs().max())]
print(json.dumps(out))
"""


def test_plugin_in_a_fresh_process():
    """`import verl` alone loads our entry point: the estimators are registered and verl's
    rollout correction is ours (GRPO_KERNELS_VERL_ROLLOUT_CORRECTION=0 keeps verl's: the plugin is
    imported with 0, then reloaded with 1). verl's trainer modules imported afterwards give
    grpo_kernels_<name> what they give <name>: the trainer's compute_advantage (grpo with
    norm_adv_by_std_in_grpo=False, rloo, optimal_token_baseline with its Σπ² and old log-probs)
    and v1's multi-trajectory GRPO (the final output of each agent session, broadcast)."""
    out = subprocess.run([sys.executable, "-c", PLUGIN_SCRIPT], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result.pop("rollout_correction_off") == "verl.trainer.ppo.rollout_corr_helper"
    assert result.pop("rollout_correction_on") == "grpo_kernels.integrations.verl.rollout_correction"
    assert result.pop("estimators") == len(gk_verl.ESTIMATORS)
    assert set(result) == {"grpo_multi", "grpo", "rloo", "optimal_token_baseline"}
    for name, (difference, scale) in result.items():
        assert scale > 0.1 and difference < 1e-5, name


def test_plugin_patches_a_module_when_it_is_imported(tmp_path, monkeypatch):
    """verl's trainer and engine modules are imported after the plugin: their patches wait for it."""
    from grpo_kernels.integrations import verl_plugin

    (tmp_path / "gk_late_module.py").write_text("value = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "gk_late_module", raising=False)
    seen = []
    verl_plugin.when_imported("gk_late_module", lambda m: seen.append(m.value))
    assert seen == []
    import gk_late_module  # noqa: F401

    assert seen == [1]
    verl_plugin.when_imported("gk_late_module", lambda m: seen.append(m.value + 1))  # imported: runs now
    assert seen == [1, 2]

"""All 12 of verl 0.9.1's policy losses, registered by us as `grpo_kernels_<name>`, against verl's own
functions (core_algos, on the CPU): loss, gradient w.r.t. log_prob and every metric key and value.

- every loss on every backend, fp32 (verl run on the same fp32 tensors), at one aggregation mode
  each (the modes rotate over the losses), with global batch info and rollout IS weights;
- every loss × every loss_agg_mode × (local, global + IS weights) on the torch backend in fp64;
- clip_cov's random choice among its candidates follows torch's global generator as verl's (the
  generator is left in verl's state, and another seed picks other tokens);
- kl_cov's selection: verl's on the CPU, ties included; the accelerator path (stable, no host
  read) agrees wherever covariances are not tied;
- the new option kinds packed as padded, on every backend;
- the host reads per call.
Our side runs on the test device (helpers.DEVICE), verl's on the CPU.
"""
import pytest
import torch
from conftest import BACKENDS
from helpers import DEVICE, assert_close, assert_grad_close

core_algos = pytest.importorskip("verl.trainer.ppo.core_algos", reason="verl is installed by the README's test command")
from verl.trainer.config.algorithm import RolloutCorrectionConfig  # noqa: E402
from verl.workers.config import ActorConfig, PolicyLossConfig  # noqa: E402

import grpo_kernels as gk  # noqa: E402
from benchmarks.host_overhead import count_host_reads  # noqa: E402
from grpo_kernels.integrations import verl as gk_verl  # noqa: E402
from grpo_kernels.integrations.verl import covariance  # noqa: E402
from grpo_kernels.integrations.verl.rollout_correction import VERL_FUNCTION  # noqa: E402

MODES = gk_verl.LOSS_MODES
AGG_MODES = gk_verl.LOSS_AGG_MODES
B, T = 6, 9
GLOBAL_INFO = dict(dp_size=2, batch_num_tokens=71, global_batch_size=13, loss_scale_factor=11)
LOCAL_INFO = dict(dp_size=1, batch_num_tokens=None, global_batch_size=None, loss_scale_factor=None)
# bypass_mode's two loss types, each with a rollout-correction setting that acts on these inputs.
BYPASS = {"ppo_clip": dict(rollout_is="token", rollout_rs="token_k1", rollout_rs_threshold="0.3_3.0"),
          "reinforce": dict(rollout_is="sequence", rollout_is_threshold=5.0)}


def actor_config(info, bypass="ppo_clip", policy_overrides=(), **overrides):
    """An ActorConfig whose options put each loss's regimes on the inputs below (selections of a few
    tokens out of ~40, DPPO trust regions that cut some)."""
    policy_options = dict(clip_cov_ratio=0.1, clip_cov_lb=0.3, clip_cov_ub=4.0, kl_cov_ratio=0.1, ppo_kl_coef=0.4,
                          dro_beta=0.3, rollout_correction=RolloutCorrectionConfig(loss_type=bypass, **BYPASS[bypass]))
    policy_options.update(policy_overrides)
    policy = PolicyLossConfig(**policy_options)
    options = dict(strategy="fsdp", rollout_n=1, ppo_micro_batch_size_per_gpu=1, clip_ratio_low=0.2,
                   clip_ratio_high=0.28, clip_ratio_c=1.3, tau_pos=1.0, tau_neg=1.05, policy_loss=policy)
    options.update(overrides)
    config = ActorConfig(**options)
    config.global_batch_info.update(info)
    return config


def policy_inputs(seed, dtype=torch.float64):
    """(log_prob, old_log_prob, advantages, mask, is_weights) reaching verl's clamps: token log-ratios
    past ±20, a GSPO sequence past 10, an empty sequence; per-token advantages."""
    g = torch.Generator().manual_seed(seed)
    log_prob = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3 - 0.05
    old = (log_prob + 0.4 * torch.randn(B, T, generator=g, dtype=torch.float64)).clamp(max=-0.01)
    old[2, 1] = log_prob[2, 1] - 25.0
    old[3, 0] = log_prob[3, 0] + 22.0  # a log-prob > 0: DPPO-KL's log of a negative odds (NaN in verl)
    old[4] = log_prob[4] - 12.0
    advantages = torch.randn(B, T, generator=g, dtype=torch.float64)
    mask = torch.rand(B, T, generator=g) > 0.3
    mask[0] = True
    mask[4, :5] = True
    mask[2, 1] = mask[3, 0] = True
    mask[5] = False
    weights = torch.rand(B, T, generator=g, dtype=torch.float64) * 2
    return tuple(x.to(dtype) if x.is_floating_point() else x for x in (log_prob, old, advantages, mask, weights))


def run(fn, log_prob, old, adv, mask, agg, config, weights, seed=0, device="cpu"):
    """(loss, gradient w.r.t. log_prob, metrics) of a verl-signature loss, run on `device`, on the CPU."""
    dev = lambda x: None if x is None else x.to(device)  # noqa: E731
    lp = dev(log_prob).requires_grad_(True)
    torch.manual_seed(seed)  # clip_cov's randperm
    loss, metrics = fn(old_log_prob=dev(old), log_prob=lp, advantages=dev(adv), response_mask=dev(mask),
                       loss_agg_mode=agg, config=config, rollout_is_weights=dev(weights))
    loss.backward()
    return loss.detach().cpu(), lp.grad.cpu(), metrics


def config_for(mode, info):
    return actor_config(info, bypass="reinforce" if mode == "bypass_mode" and info is GLOBAL_INFO else "ppo_clip")


def check_against_verl(mode, agg, info, weights_on, dtype, backend, tol):
    log_prob, old, adv, mask, weights = policy_inputs(seed=MODES.index(mode) * 7 + AGG_MODES.index(agg), dtype=dtype)
    weights = weights if weights_on else None
    config = config_for(mode, info)
    want_loss, want_grad, want_metrics = run(gk_verl.verls_own_policy_loss(mode), log_prob, old, adv, mask, agg,
                                             config, weights)
    got_loss, got_grad, got_metrics = run(gk_verl.policy_loss_fn(mode, backend), log_prob, old, adv, mask, agg,
                                          config, weights, device=DEVICE)
    assert got_loss.dtype == dtype and got_loss.dim() == 0
    assert_close(got_loss, want_loss, rtol=tol, atol=tol, name="loss")
    assert_grad_close(got_grad, want_grad, rel=tol)
    assert want_grad.abs().sum() > 0
    assert set(got_metrics) == set(want_metrics)
    for key, value in want_metrics.items():
        assert isinstance(got_metrics[key], float), key
        # verl takes its clip fractions of fp32 masks (.float()), fp64 inputs or not
        assert_close(got_metrics[key], value, rtol=max(tol, 1e-6), atol=max(tol, 1e-6), name=key)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", MODES)
def test_every_loss_on_every_backend_matches_verl(mode, backend):
    """fp32, verl on the same fp32 tensors; the aggregation mode rotates over the losses."""
    agg = AGG_MODES[MODES.index(mode) % len(AGG_MODES)]
    check_against_verl(mode, agg, GLOBAL_INFO, True, torch.float32, backend, tol=1e-5)


@pytest.mark.parametrize("batch", ["local", "global+is_weights"])
@pytest.mark.parametrize("agg", AGG_MODES)
@pytest.mark.parametrize("mode", MODES)
def test_every_loss_and_aggregation_matches_verl_in_fp64(mode, agg, batch):
    """fp64 on both sides: only the order of sums differs (verl's n + 1e-8 is an fp32 n for a bool mask)."""
    info = LOCAL_INFO if batch == "local" else GLOBAL_INFO
    check_against_verl(mode, agg, info, batch != "local", torch.float64, "torch", tol=1e-8)


def test_inputs_reach_every_regime():
    """The cases above are not vacuous: the selections, trust regions and clips act on them."""
    log_prob, old, adv, mask, _ = policy_inputs(seed=MODES.index("clip_cov") * 7)
    config = actor_config(LOCAL_INFO)
    chosen = covariance.clip_cov_selection(old, log_prob, adv, mask, 0.2, 0.28, 0.1, 0.3, 4.0)
    assert 0 < int(chosen.sum()) == max(int(0.1 * mask.sum()), 1)
    for mode in ("dppo_tv", "dppo_kl", "geo_mean"):
        log_prob, old, adv, mask, _ = policy_inputs(seed=MODES.index(mode) * 7)
        _, _, metrics = run(gk_verl.policy_loss_fn(mode, "torch"), log_prob, old, adv, mask, "token-mean", config,
                            None)
        assert 0 < metrics["actor/pg_clipfrac"] < 1, mode


def test_clip_cov_draws_verls_random_stream():
    """Our clip_cov consumes torch's global generator as verl's does and picks the same tokens for any
    seed; another seed picks other tokens (there are more candidates than picks)."""
    log_prob, old, adv, mask, _ = policy_inputs(seed=3)
    config = actor_config(LOCAL_INFO)
    grads = []
    for seed in range(4):
        _, want_grad, _ = run(gk_verl.verls_own_policy_loss("clip_cov"), log_prob, old, adv, mask, "token-mean",
                              config, None, seed=seed)
        verl_state = torch.get_rng_state()
        _, got_grad, _ = run(gk_verl.policy_loss_fn("clip_cov", "torch"), log_prob, old, adv, mask, "token-mean",
                             config, None, seed=seed)
        assert torch.equal(torch.get_rng_state(), verl_state)
        assert_grad_close(got_grad, want_grad, rel=1e-10)
        grads.append((got_grad == 0) & mask)
    assert any(not torch.equal(grads[0], g) for g in grads[1:])


def test_kl_cov_ties_follow_verls_topk_on_cpu():
    """All advantages 0: every covariance ties; on the CPU we take topk's choice, as verl."""
    log_prob, old, _, mask, _ = policy_inputs(seed=4)
    adv = torch.zeros(B, T, dtype=torch.float64)
    config = actor_config(LOCAL_INFO)
    want_loss, want_grad, _ = run(gk_verl.verls_own_policy_loss("kl_cov"), log_prob, old, adv, mask, "token-mean",
                                  config, None)
    got_loss, got_grad, _ = run(gk_verl.policy_loss_fn("kl_cov", "torch"), log_prob, old, adv, mask, "token-mean",
                                config, None)
    assert want_loss > 0
    assert_close(got_loss, want_loss, rtol=1e-10, atol=1e-12, name="loss")
    assert_grad_close(got_grad, want_grad, rel=1e-10)


def test_kl_cov_accelerator_path_selects_as_the_cpu_path():
    """The sort-based selection (no host read) equals verl's topk where covariances are distinct, and
    takes the lowest positions among exact ties."""
    for seed in range(3):
        log_prob, _, adv, mask, _ = policy_inputs(seed=seed)
        for ratio in (0.05, 0.3):
            want = covariance.kl_cov_selection(log_prob, adv, mask, ratio)
            got = covariance.kl_cov_selection_sorted(log_prob, adv, mask, ratio)
            assert torch.equal(got, want) and int(got.sum()) == max(1, int(ratio * mask.sum()))
    log_prob, _, _, mask, _ = policy_inputs(seed=0)
    tied = covariance.kl_cov_selection_sorted(log_prob, torch.zeros(B, T, dtype=torch.float64), mask, 0.1)
    k = max(1, int(0.1 * mask.sum()))
    assert torch.equal(tied.reshape(-1).nonzero().squeeze(1), mask.reshape(-1).nonzero().squeeze(1)[:k])


@pytest.mark.parametrize("validate", [True, False])
def test_host_reads_per_call(validate):
    """One host read for the metrics (verl returns floats), one per fused pass with validation,
    clip_cov's randperm length, bypass_mode's rollout correction (ours: one); no other."""
    log_prob, old, adv, mask, weights = policy_inputs(seed=2, dtype=torch.float32)
    for mode, bypass in [(m, "ppo_clip") for m in MODES] + [("bypass_mode", "reinforce")]:
        if mode == "kl_cov":  # its CPU selection is verl's own topk
            continue
        config = actor_config(GLOBAL_INFO, bypass=bypass)
        loss = gk_verl.policy_loss_fn(mode, "torch", validate=validate)
        call = lambda: loss(old, log_prob, adv, mask, "token-mean", config, weights)  # noqa: E731, B023
        expected = (mode != "gpg") + int(validate) + (mode in ("clip_cov", "bypass_mode"))
        assert count_host_reads(call) == expected, (mode, bypass)
    sorted_selection = lambda: covariance.kl_cov_selection_sorted(log_prob, adv, mask, 0.1)  # noqa: E731
    assert count_host_reads(sorted_selection) == 0


def test_bypass_oracle_is_verls_own_rollout_correction():
    """The bypass_mode cases above compare with verl's rollout correction, not ours installed by the
    plugin: verl's own reads the device dozens of times per call, ours once."""
    from verl.trainer.ppo import rollout_corr_helper

    assert VERL_FUNCTION.__module__ == rollout_corr_helper.__name__
    log_prob, old, adv, mask, _ = policy_inputs(seed=2, dtype=torch.float32)
    config = actor_config(LOCAL_INFO)
    installed = rollout_corr_helper.compute_rollout_correction_and_rejection_mask
    verl_reads = count_host_reads(lambda: gk_verl.verls_own_policy_loss("bypass_mode")(
        old_log_prob=old, log_prob=log_prob, advantages=adv, response_mask=mask, config=config))
    assert rollout_corr_helper.compute_rollout_correction_and_rejection_mask is installed  # put back
    ours_reads = count_host_reads(lambda: gk_verl.policy_loss_fn("bypass_mode", "torch", validate=False)(
        old, log_prob, adv, mask, config=config))
    assert verl_reads > 10 and ours_reads == 2, (verl_reads, ours_reads)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("option", [
    dict(policy_loss="dppo_kl", epsilon=0.01, epsilon_high=0.02, ratio_cap=1.3),
    dict(policy_loss="kl_cov", kl_cov_coef=0.4, loss_agg_mode="seq-mean-token-sum"),
    dict(policy_loss="geo_mean", importance_sampling_level="sequence", loss_agg_mode="seq-mean-token-mean"),
    dict(policy_loss="dro", dro_beta=0.3),
], ids=["dppo_kl", "kl_cov", "geo_mean", "dro"])
def test_new_kinds_packed_equal_padded(option, backend):
    log_prob, old, adv, mask, weights = policy_inputs(seed=9, dtype=torch.float32)
    old = old.clamp(min=log_prob - 5, max=log_prob + 5)  # GMPO's sequence ratio is not clamped
    config = gk.GRPOLossConfig(**option)
    lp = log_prob.clone().requires_grad_(True)
    padded = gk.grpo_loss_from_logprobs(lp, adv, mask=mask, old_logps=old, is_weights=weights, config=config,
                                        backend=backend)
    padded.loss.backward()
    lengths = mask.sum(1)
    order = torch.argsort((~mask).int(), dim=1, stable=True)
    keep = torch.arange(T).unsqueeze(0) < lengths.unsqueeze(1)
    packed = lambda x: torch.gather(x, 1, order)[keep]  # noqa: E731
    cu = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    lp_packed = packed(log_prob).requires_grad_(True)
    out = gk.grpo_loss_from_logprobs(lp_packed, packed(adv), old_logps=packed(old), is_weights=packed(weights),
                                     cu_seqlens=cu, config=config, backend=backend)
    out.loss.backward()
    assert_close(out.loss, padded.loss, rtol=1e-6, atol=1e-7, name="loss")
    assert_grad_close(lp_packed.grad, packed(lp.grad), rel=1e-6)
    assert padded.loss != 0


@pytest.mark.parametrize("mode, options, words", [
    ("dro", dict(dro_beta=None), "policy_loss.dro_beta must be a positive value"),
    ("clip_cov", dict(clip_cov_ratio=0.0), "clip_cov_ratio must be > 0"),
    ("kl_cov", dict(kl_cov_ratio=-1.0), "kl_cov_ratio must be > 0"),
])
def test_bad_policy_loss_options_are_named(mode, options, words):
    log_prob, old, adv, mask, _ = policy_inputs(seed=1)
    config = actor_config(LOCAL_INFO, policy_overrides=options)
    with pytest.raises(ValueError, match=words):
        gk_verl.policy_loss_fn(mode)(old, log_prob, adv, mask, config=config)

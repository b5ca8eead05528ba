"""grpo_kernels.integrations.verl against verl's own code (verl 0.9.1's core_algos), on random inputs.

Our registered policy losses against verl's vanilla / gspo / cispo / sapo for every
loss_agg_mode, with and without global batch info and rollout IS weights; our fused KL loss
against verl's agg_loss(kl_penalty(...)); our fused-linear log-probs against verl's
FusedLinearForPPO. verl runs in fp64 (the ground truth), ours in fp32.
"""
import os
import subprocess
import sys

import pytest
import torch
from conftest import BACKENDS
from helpers import assert_close, assert_grad_close

core_algos = pytest.importorskip("verl.trainer.ppo.core_algos", reason="verl is installed by the README's test command")
from verl.workers.config import ActorConfig  # noqa: E402

from grpo_kernels.integrations import verl as gk_verl  # noqa: E402

AGG_MODES = gk_verl.LOSS_AGG_MODES
B, T = 6, 9
# A data-parallel rank's share of a global batch, as verl's ppo_loss fills it in.
GLOBAL_INFO = dict(dp_size=2, batch_num_tokens=71, global_batch_size=13, loss_scale_factor=11)
LOCAL_INFO = dict(dp_size=1, batch_num_tokens=None, global_batch_size=None, loss_scale_factor=None)


def actor_config(info, **overrides):
    options = dict(strategy="fsdp", rollout_n=1, ppo_micro_batch_size_per_gpu=1, clip_ratio_low=0.2,
                   clip_ratio_high=0.28, clip_ratio_c=1.3, tau_pos=1.0, tau_neg=1.05)
    options.update(overrides)
    config = ActorConfig(**options)
    config.global_batch_info.update(info)
    return config


def policy_inputs(seed):
    """fp64 (log_prob, old_log_prob, advantages, mask, is_weights) with every regime verl clamps."""
    g = torch.Generator().manual_seed(seed)
    log_prob = torch.randn(B, T, generator=g, dtype=torch.float64) - 2.0
    old = log_prob + 0.5 * torch.randn(B, T, generator=g, dtype=torch.float64)
    old[2, 1] = log_prob[2, 1] - 25.0  # token log-ratio +25: past verl's ±20 clamp
    old[3, 0] = log_prob[3, 0] + 22.0  # and -22 (not -25: ppo_kl would not see the clamps cancel)
    old[4] = log_prob[4] - 12.0  # GSPO sequence log-ratio 12: past verl's <= 10 clamp
    advantages = torch.randn(B, T, generator=g, dtype=torch.float64)
    mask = torch.rand(B, T, generator=g) > 0.3
    mask[0] = True
    mask[4, :5] = True
    mask[2, 1] = mask[3, 0] = True
    mask[5] = False  # an empty sequence: excluded from verl's sequence counts
    weights = torch.rand(B, T, generator=g, dtype=torch.float64) * 2
    return log_prob, old, advantages, mask, weights


def verl_policy(mode, log_prob, old, adv, mask, agg, config, weights):
    lp = log_prob.clone().requires_grad_(True)
    loss, metrics = core_algos.get_policy_loss_fn(mode)(
        old_log_prob=old, log_prob=lp, advantages=adv, response_mask=mask, loss_agg_mode=agg, config=config,
        rollout_is_weights=weights)
    loss.backward()
    return loss.detach(), lp.grad, metrics


def our_policy(mode, log_prob, old, adv, mask, agg, config, weights, backend):
    lp = log_prob.float().clone().requires_grad_(True)
    f32 = lambda x: None if x is None else x.float()  # noqa: E731
    loss, metrics = gk_verl.policy_loss_fn(mode, backend)(
        old_log_prob=old.float(), log_prob=lp, advantages=adv.float(), response_mask=mask, loss_agg_mode=agg,
        config=config, rollout_is_weights=f32(weights))
    loss.backward()
    return loss.detach(), lp.grad, metrics


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("agg", AGG_MODES)
@pytest.mark.parametrize("mode", ["vanilla", "gspo", "cispo", "sapo"])  # all 12: test_verl_policy_losses.py
@pytest.mark.parametrize("batch", ["local", "global+is_weights"])
def test_policy_loss_matches_verl(mode, agg, batch, backend):
    log_prob, old, adv, mask, weights = policy_inputs(seed=len(mode) * 7 + AGG_MODES.index(agg))
    info = LOCAL_INFO if batch == "local" else GLOBAL_INFO
    weights = weights if batch != "local" else None
    config = actor_config(info)
    want_loss, want_grad, want_metrics = verl_policy(mode, log_prob, old, adv, mask, agg, config, weights)
    got_loss, got_grad, got_metrics = our_policy(mode, log_prob, old, adv, mask, agg, config, weights, backend)
    assert got_loss.dtype == torch.float32 and got_loss.dim() == 0
    assert_close(got_loss, want_loss, rtol=1e-5, atol=1e-6, name="loss")
    assert_grad_close(got_grad, want_grad, rel=1e-5)
    assert want_grad.abs().sum() > 0
    assert set(got_metrics) == set(want_metrics)
    for key, value in want_metrics.items():
        assert isinstance(got_metrics[key], float), key
        assert_close(got_metrics[key], value, rtol=1e-5, atol=1e-6, name=key)


def test_clamped_tokens_get_no_gradient_as_in_verl():
    """The test inputs do reach verl's clamps: tokens past ±20 and the GSPO sequence past 10."""
    log_prob, old, adv, mask, _ = policy_inputs(seed=0)
    config = actor_config(LOCAL_INFO)
    _, grad_vanilla, _ = our_policy("vanilla", log_prob, old, adv, mask, "token-mean", config, None, "torch")
    assert mask[2, 1] and mask[3, 0]
    assert grad_vanilla[2, 1] == 0 and grad_vanilla[3, 0] == 0
    _, grad_gspo, _ = our_policy("gspo", log_prob, old, adv, mask, "token-mean", config, None, "torch")
    assert (grad_gspo[4] == 0).all() and grad_gspo[0].abs().sum() > 0


KL_TYPES = sorted(gk_verl.KL_LOSS_TYPES)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("agg", AGG_MODES)
@pytest.mark.parametrize("kl_type", KL_TYPES)
def test_kl_loss_matches_verl_agg_loss_of_kl_penalty(kl_type, agg, backend):
    g = torch.Generator().manual_seed(KL_TYPES.index(kl_type) * 10 + AGG_MODES.index(agg))
    log_prob, _, _, mask, _ = policy_inputs(seed=5)
    ref = log_prob + 0.8 * torch.randn(B, T, generator=g, dtype=torch.float64)
    ref[0, 0] = log_prob[0, 0] + 3.5  # low_var_kl e^3.5 - 4.5 = 28.6: past verl's ±10 clamp
    ref[0, 1] = log_prob[0, 1] - 30.0  # log-ratio past verl's ±20 clamp
    info = GLOBAL_INFO if KL_TYPES.index(kl_type) % 2 else LOCAL_INFO
    lp = log_prob.clone().requires_grad_(True)
    want = core_algos.agg_loss(core_algos.kl_penalty(lp, ref, kl_type), mask, agg, **info)
    want.backward()
    ours = log_prob.float().clone().requires_grad_(True)
    got = gk_verl.kl_loss(ours, ref.float(), mask, kl_type, agg, info, backend=backend)
    got.backward()
    assert_close(got, want.detach(), rtol=1e-5, atol=1e-6, name="kl_loss")
    assert_grad_close(ours.grad, lp.grad, rel=1e-5)


@pytest.mark.parametrize("kwargs, words", [
    (dict(kl_loss_type="k3+"), "kl_loss_type='k3+' is not supported"),
    (dict(kl_loss_type="abs"), "kl_loss_type='abs' is not supported"),
    (dict(loss_agg_mode="mean"), "loss_agg_mode='mean' is not valid"),
    (dict(global_batch_info=dict(dp_size=2)), "global_batch_info['batch_num_tokens'] is required when dp_size > 1"),
    (dict(global_batch_info=dict(dp=2)), "global_batch_info has unknown keys ['dp']"),
])
def test_kl_loss_bad_options_are_named(kwargs, words):
    log_prob, _, _, mask, _ = policy_inputs(seed=1)
    call = dict(kl_loss_type="low_var_kl", loss_agg_mode="token-mean", global_batch_info=None)
    call.update(kwargs)
    with pytest.raises(ValueError) as info:
        gk_verl.kl_loss(log_prob.float(), log_prob.float(), mask, **call)
    assert words in str(info.value)


def test_policy_loss_bad_config_is_named():
    log_prob, old, adv, mask, _ = policy_inputs(seed=1)
    loss = gk_verl.policy_loss_fn("vanilla")
    with pytest.raises(ValueError, match="clip_ratio_c must be > 1"):
        loss(old.float(), log_prob.float(), adv.float(), mask, config=actor_config({}, clip_ratio_c=0.5))
    with pytest.raises(ValueError, match="config .verl's actor config. is required"):
        loss(old.float(), log_prob.float(), adv.float(), mask)
    with pytest.raises(ValueError, match="global_batch_size'. is required when dp_size > 1"):
        loss(old.float(), log_prob.float(), adv.float(), mask, "seq-mean-token-mean", actor_config(dict(dp_size=4)))
    with pytest.raises(ValueError, match="loss_mode='not_a_loss' has no grpo_kernels version"):
        gk_verl.policy_loss_fn("not_a_loss")


def test_empty_micro_batch_gives_zero_not_nan():
    """verl divides 0 by 0 here; ours returns 0 with a zero gradient."""
    log_prob, old, adv, _, _ = policy_inputs(seed=2)
    lp = log_prob.float().requires_grad_(True)
    mask = torch.zeros(B, T, dtype=torch.bool)
    loss, _ = gk_verl.policy_loss_fn("vanilla")(old.float(), lp, adv.float(), mask, "token-mean",
                                                 actor_config(LOCAL_INFO))
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(lp.grad, torch.zeros_like(lp))


def test_register_puts_our_losses_in_verls_registry():
    names = gk_verl.register(backend="torch", prefix="test_gk_")
    assert names == tuple(f"test_gk_{m}" for m in gk_verl.LOSS_MODES)
    log_prob, old, adv, mask, _ = policy_inputs(seed=3)
    config = actor_config(LOCAL_INFO)
    for mode in ("vanilla", "gspo", "cispo", "sapo"):  # all 12 through policy_loss_fn: test_verl_policy_losses.py
        ours, _ = core_algos.get_policy_loss_fn(f"test_gk_{mode}")(old, log_prob.float(), adv, mask, "token-mean",
                                                                   config)
        want, _ = core_algos.get_policy_loss_fn(mode)(old, log_prob, adv, mask, "token-mean", config)
        assert_close(ours, want, rtol=1e-5, atol=1e-6, name=mode)


def test_verl_plugin_entry_point_registers_in_a_fresh_process():
    """`import verl` alone (as in a Ray worker) loads our entry point and registers the losses."""
    code = ("import verl; from verl.trainer.ppo.core_algos import POLICY_LOSS_REGISTRY as r; "
            "print(sorted(k for k in r if k.startswith('grpo_kernels_')))")
    env = dict(os.environ, GRPO_KERNELS_VERL_FUSED_LINEAR="1")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == str(sorted(f"grpo_kernels_{m}" for m in gk_verl.LOSS_MODES))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_fused_linear_matches_verls_fused_linear_for_ppo(backend, temperature):
    from verl.utils.experimental.torch_functional import (
        FusedLinearForPPO as VerlFusedLinear,
    )

    g = torch.Generator().manual_seed(11)
    hidden = torch.randn(2, 5, 16, generator=g)
    weight = torch.randn(37, 16, generator=g) * 0.5
    ids = torch.randint(0, 37, (2, 5), generator=g)
    g_logp, g_ent = torch.randn(2, 5, generator=g), torch.randn(2, 5, generator=g)

    def run(module):
        h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
        logp, ent = module(h, w, ids, temperature)
        ((logp * g_logp).sum() + (ent * g_ent).sum()).backward()
        return logp.detach(), ent.detach(), h.grad, w.grad

    want = run(VerlFusedLinear(impl_backend="torch").forward)
    got = run(gk_verl.FusedLinearForPPO(backend=backend).forward)
    for name, a, b in zip(("log_probs", "entropy"), got[:2], want[:2]):
        assert a.shape == b.shape and a.dtype == torch.float32
        assert_close(a, b, rtol=1e-5, atol=1e-5, name=name)
    assert_grad_close(got[2], want[2], rel=1e-5, name="d_hidden")
    assert_grad_close(got[3], want[3], rel=1e-5, name="d_weight")


def test_patch_fused_linear_replaces_verls_entry_points(monkeypatch):
    import verl.utils.experimental.torch_functional as torch_functional
    import verl.utils.kernel.linear_cross_entropy as lce

    monkeypatch.setattr(torch_functional, "FusedLinearForPPO", torch_functional.FusedLinearForPPO)
    monkeypatch.setattr(lce, "linear_cross_entropy", lce.linear_cross_entropy)
    gk_verl.patch_fused_linear(backend="torch")
    module = torch_functional.FusedLinearForPPO(impl_backend="torch")
    assert isinstance(module, gk_verl.FusedLinearForPPO) and module.backend == "torch"
    hidden, weight, ids = torch.randn(1, 6, 8), torch.randn(11, 8), torch.randint(0, 11, (1, 6))
    logp, ent = lce.linear_cross_entropy(hidden, weight, ids, 1.0, "none")
    want_logp, want_ent = module(hidden, weight, ids)
    assert logp.shape == (6,) and torch.equal(logp, want_logp.reshape(-1)) and torch.equal(ent, want_ent.reshape(-1))
    with pytest.raises(ValueError, match="reduction='mean' is not supported"):
        lce.linear_cross_entropy(hidden, weight, ids, 1.0, "mean")


def vocab_parallel_worker(rank, world, use_verls_kernel):
    """verl's tensor-parallel linear_cross_entropy semantics on this rank's (V / world, H) rows:
    full-vocabulary log-probs and entropy, d_weight of the rows, the partial d_hidden.
    Against verl's FusedLinearForPPO on the whole weight, or, on GPUs, verl's own
    vocabulary-parallel Triton kernel on the same slices."""
    import torch.distributed as dist

    from verl.utils.experimental.torch_functional import FusedLinearForPPO as VerlFusedLinear

    device = f"cuda:{rank}" if use_verls_kernel else "cpu"
    g = torch.Generator().manual_seed(7)
    vocab, size = 1000, 1000 // world
    hidden = torch.randn(3, 5, 128, generator=g, dtype=torch.float64)
    weight = torch.randn(vocab, 128, generator=g, dtype=torch.float64) * 0.1
    ids = torch.randint(0, vocab, (3, 5), generator=g)
    g_logp, g_ent = torch.randn(15, generator=g, dtype=torch.float64), torch.randn(15, generator=g, dtype=torch.float64)
    rows = slice(rank * size, (rank + 1) * size)

    def run(fn, h, w, dtype):
        h, w = (x.to(device, dtype).clone().requires_grad_(True) for x in (h, w))
        logp, ent = fn(h, w, ids.to(device))
        ((logp.reshape(-1).double() * g_logp.to(device)).sum() + (ent.reshape(-1).double() * g_ent.to(device)).sum()
         ).backward()
        return [x.detach().double().cpu() for x in (logp.reshape(-1), ent.reshape(-1), h.grad, w.grad)]

    group = dist.group.WORLD
    ours = run(lambda h, w, y: gk_verl.linear_cross_entropy(h, w, y, 1.0, "none", group, backend="auto"),
               hidden, weight[rows], torch.float32 if use_verls_kernel else torch.float64)
    if use_verls_kernel:
        from verl.utils.kernel.linear_cross_entropy import linear_cross_entropy as verl_lce

        want = run(lambda h, w, y: verl_lce(h, w, y, 1.0, "none", group), hidden, weight[rows], torch.float32)
        partial_want = want[2]
        tol = 1e-4
    else:
        want = run(lambda h, w, y: VerlFusedLinear(impl_backend="torch")(h, w, y, 1.0), hidden, weight, torch.float64)
        want[3] = want[3][rows]
        partial_want = None
        tol = 1e-5  # verl's torch path computes its logits in fp32
    summed = ours[2].clone()
    dist.all_reduce(summed, group=group)
    checks = [("log_probs", ours[0], want[0]), ("entropy", ours[1], want[1]), ("d_weight rows", ours[3], want[3])]
    if partial_want is None:
        checks.append(("sum of partial d_hidden", summed, want[2]))
    else:
        checks.append(("partial d_hidden", ours[2], partial_want))
    return [f"{name}: {float((a - b).abs().max()):.3g}" for name, a, b in checks
            if float((a - b).abs().max()) > tol * max(1.0, float(b.abs().max()))]


def test_linear_cross_entropy_vocab_parallel_on_cpu():
    from distributed import run_ranks

    for rank, problems in enumerate(run_ranks(2, vocab_parallel_worker, False)):
        assert not problems, f"rank {rank}: {problems}"


@pytest.mark.gpu
def test_linear_cross_entropy_vocab_parallel_against_verls_kernel():
    if torch.cuda.device_count() < 2:
        pytest.skip("verl's vocabulary-parallel kernel needs 2 GPUs")
    from distributed import run_ranks

    for rank, problems in enumerate(run_ranks(2, vocab_parallel_worker, True, backend="nccl")):
        assert not problems, f"rank {rank}: {problems}"

"""verl_policy_losses: all 12 of verl 0.9.1's policy losses against ours (`grpo_kernels_<name>`,
grpo_kernels.integrations.verl), time per call and host reads per call, at B = 256 sequences ×
1024 tokens. Runs only where verl is installed.

    python -m benchmarks.tasks.verl_policy_losses [--device cuda] [--repeats 10] [--backend auto]
                                                 [--update-committed]

One call: the loss with verl's signature (fp32 log-probs, token-mean, verl's metrics as floats)
and the backward of the loss to log_prob. Ours runs as the verl plugin registers it (`--backend`,
validate=True); host reads are also counted with validate=False. verl's bypass_mode runs with
verl's own rollout correction (the plugin, loaded by `import verl`, puts ours in its place).
Before timing, ours is checked against verl's (loss, gradient, metric keys and values). Rows are
timed in interleaved rounds (wall clock; on CUDA with a sync after each call). Host reads: .item(),
.tolist(), bool(), int(), float() of a tensor during one call (each a device sync on a GPU),
counted as benchmarks/host_overhead.py counts them. Writes verl_policy_losses.md into
benchmarks/results/ with --update-committed (else into a fresh runs/benchmarks/ folder).
"""
from __future__ import annotations

from typing import Callable, Dict

import torch

from .. import output
from ..host_overhead import count_host_reads
from ..measure import Sampler, measure_interleaved
from .verl_rollout_correction import NUM_SEQUENCES, build_rollout_correction, start_verl_benchmark

# Options that put every loss's regimes on these inputs (log-ratios of std 0.05): tight clips
# (vanilla, gspo, cispo, geo_mean), DPPO bounds that cut, a bypass-mode rejection that rejects.
CLIP_LOW, CLIP_HIGH = 0.02, 0.03
POLICY_OPTIONS = dict(dro_beta=0.3)  # verl has no default for it
BYPASS = dict(loss_type="ppo_clip", rollout_is="token", rollout_is_threshold=2.0, rollout_rs="token_k1",
              rollout_rs_threshold="0.9_1.1")


def actor_config():
    from verl.trainer.config.algorithm import RolloutCorrectionConfig
    from verl.workers.config import ActorConfig, PolicyLossConfig

    policy = PolicyLossConfig(**POLICY_OPTIONS, rollout_correction=RolloutCorrectionConfig(**BYPASS))
    return ActorConfig(strategy="fsdp", rollout_n=1, ppo_micro_batch_size_per_gpu=1, clip_ratio_low=CLIP_LOW,
                       clip_ratio_high=CLIP_HIGH, clip_ratio_c=3.0, policy_loss=policy)


def build_policy_inputs(num_sequences: int, seq_len: int, device) -> Dict[str, torch.Tensor]:
    """verl's inputs to a policy loss: the rollout-correction task's log-probs (training policy as
    log_prob, rollout's as old_log_prob) and mask, one advantage per sequence broadcast over it."""
    x = build_rollout_correction(num_sequences, seq_len, device)
    gen = torch.Generator().manual_seed(1)
    advantages = torch.randn(num_sequences, 1, generator=gen).expand(num_sequences, seq_len).contiguous()
    return dict(log_prob=x["old_log_prob"], old_log_prob=x["rollout_log_prob"], advantages=advantages.to(device),
                response_mask=x["response_mask"])


def one_call(loss_fn: Callable, config, x) -> Callable[[], tuple]:
    """A call of a verl-signature loss and its backward: () -> (loss, d loss / d log_prob, metrics)."""
    def call():
        torch.manual_seed(0)  # clip_cov's random choice among its candidates
        leaf = x["log_prob"].detach().requires_grad_(True)
        loss, metrics = loss_fn(x["old_log_prob"], leaf, x["advantages"], x["response_mask"], "token-mean", config)
        (grad,) = torch.autograd.grad(loss, leaf)
        return loss.detach(), grad, metrics
    return call


def check_agreement(mode: str, theirs: Callable, ours: Callable) -> float:
    """Raises unless ours gives verl's loss, gradient and metrics; returns the largest difference
    (relative to the largest value) of loss and gradient."""
    (want_loss, want_grad, want_metrics), (loss, grad, metrics) = theirs(), ours()
    assert set(metrics) == set(want_metrics), (mode, sorted(set(metrics) ^ set(want_metrics)))
    for key, value in want_metrics.items():
        assert abs(metrics[key] - value) <= 1e-4 * max(1.0, abs(value)), (mode, key, metrics[key], value)
    error = max(float((loss - want_loss).abs() / want_loss.abs().clamp(min=1e-30)),
                float((grad - want_grad).abs().max() / want_grad.abs().max().clamp(min=1e-30)))
    assert error <= 1e-4, (mode, error)
    return error


def main(argv=None) -> None:
    def backend_argument(parser):
        parser.add_argument("--backend", default="auto", help="our backend, as GRPO_KERNELS_VERL_BACKEND picks it")

    args, device, label, provenance = start_verl_benchmark(__doc__.split("\n\n")[0], argv, backend_argument)
    from grpo_kernels.integrations import verl as gk_verl
    from grpo_kernels.ops.dispatch import resolve_backend

    config = actor_config()
    x = build_policy_inputs(NUM_SEQUENCES, args.seq_len, device)
    backend = resolve_backend(args.backend, device, torch.float32)
    rows = []
    for mode in gk_verl.LOSS_MODES:
        calls = {"verl 0.9.1": one_call(gk_verl.verls_own_policy_loss(mode), config, x),
                 f"grpo_kernels[{backend}]": one_call(gk_verl.policy_loss_fn(mode, args.backend), config, x)}
        error = check_agreement(mode, *calls.values())
        unchecked = one_call(gk_verl.policy_loss_fn(mode, args.backend, validate=False), config, x)
        reads = {impl: str(count_host_reads(call)) for impl, call in calls.items()}
        reads[f"grpo_kernels[{backend}]"] += f" ({count_host_reads(unchecked)})"
        samplers = [Sampler(call, device, warmup=2, min_repeats=args.repeats, max_repeats=args.repeats,
                            time_cap_s=0.0) for call in calls.values()]
        timings = measure_interleaved(samplers)
        rows.append((mode, [(impl, timing, reads[impl]) for impl, timing in zip(calls, timings)], error))
    output.finish_provenance(provenance)
    lines = [f"# verl's 12 policy losses: ours vs verl's ({label})", "",
             output.provenance_line(provenance) + f" {torch.get_num_threads()} torch thread(s).", "",
             f"B = {NUM_SEQUENCES} sequences × T = {args.seq_len} tokens, fp32 log-probs, one advantage per "
             "sequence, int64 response mask (random lengths T/8..T), loss_agg_mode token-mean, no IS weights; "
             f"clip_ratio_low/high {CLIP_LOW}/{CLIP_HIGH} (log-ratios of std 0.05), verl's defaults otherwise "
             f"(dro_beta 0.3; bypass_mode: {BYPASS}). One call: "
             "the loss with verl's signature (metrics as floats) and its backward to log_prob. Ours: "
             f"`grpo_kernels_<name>` on backend {backend}, validate=True as the plugin registers it, checked "
             "against verl's loss, gradient and metrics before timing (largest relative difference in the last "
             "column). verl's bypass_mode runs with verl's own rollout correction. ms per call: wall clock of "
             f"{args.repeats} calls per row in interleaved rounds"
             f"{', with a CUDA sync after each' if device.type == 'cuda' else ''}. Host reads: .item(), .tolist(), "
             "bool(), int(), float() of a tensor during one call (each a device sync on a GPU); ours with "
             "validate=False in parentheses.", "",
             "| loss | implementation | ms per call (median) | min | max | host reads per call | verl ÷ ours | "
             "difference |", "|---|---|---|---|---|---|---|---|"]
    for mode, impls, error in rows:
        verl_median = impls[0][1].median
        for impl, timing, reads in impls:
            ratio = f"{verl_median / timing.median:.2f}" if impl != "verl 0.9.1" else ""
            lines.append(f"| {mode} | {impl} | {timing.median:.1f} | {timing.min:.1f} | {timing.max:.1f} | {reads} | "
                         f"{ratio} | {error:.1e} |")
    text = "\n".join(lines) + "\n"
    out_dir = output.COMMITTED if args.update_committed else output.directory(args, label)
    output.publish_texts({"verl_policy_losses.md": text}, out_dir, text)


if __name__ == "__main__":
    main()

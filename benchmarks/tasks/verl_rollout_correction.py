"""verl_rollout_correction: verl's compute_rollout_correction_and_rejection_mask against ours
(grpo_kernels.integrations.verl.rollout_correction), time per call and host reads per call, at
B = 256 sequences × 1024 tokens. Runs only where verl is installed.

    python -m benchmarks.tasks.verl_rollout_correction [--device cuda] [--repeats 10] [--update-committed]

Rows: three of verl's settings (IS only; IS with batch normalisation and chained rejection;
rejection of every kind with IcePop sequence IS), ours and verl's timed in interleaved rounds
(wall clock; on CUDA with a sync after each call). Host reads: .item(), .tolist(), bool(),
int(), float() of a tensor during one call (each a device sync on a GPU), counted as
benchmarks/host_overhead.py counts them. Before timing, ours is checked against verl's (weights,
mask, metric keys and values). Writes verl_rollout_correction.md into benchmarks/results/ with
--update-committed (else into a fresh runs/benchmarks/ folder).
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
from typing import Callable, Dict, List

import torch

from .. import output
from ..host_overhead import count_host_reads
from ..measure import Sampler, device_name, measure_interleaved
from .common import EAGER, SEQ_LEN, Contender, Skipped, Task, _have

NUM_SEQUENCES = 256
SETTINGS: Dict[str, Dict] = {
    "token TIS": dict(rollout_is="token", rollout_is_threshold=2.0),
    "sequence TIS, batch norm, token_k1 + seq_mean_k3 rejection": dict(
        rollout_is="sequence", rollout_is_threshold=2.0, rollout_is_batch_normalize=True,
        rollout_rs="token_k1,seq_mean_k3", rollout_rs_threshold="0.5_2.0,0.01"),
    "token IcePop, batch norm, all 11 rejection options": dict(
        rollout_is="token", rollout_is_threshold="0.5_2.0", rollout_is_batch_normalize=True,
        rollout_rs="token_k1,token_k2,token_k3,seq_sum_k1,seq_sum_k2,seq_sum_k3,seq_mean_k1,seq_mean_k2,"
                   "seq_mean_k3,seq_max_k2,seq_max_k3",
        rollout_rs_threshold="0.5_2.0,0.5,0.5,0.1_10,50,50,0.8_1.25,0.02,0.02,2.0,2.0"),
}
DEFAULT_SETTING = "sequence TIS, batch norm, token_k1 + seq_mean_k3 rejection"


def build_rollout_correction(num_sequences: int, seq_len: int, device) -> Dict:
    """verl's inputs: training and rollout log-probs (B, T) fp32 (a bf16-vs-fp32 sized mismatch),
    response mask (B, T) int64 with responses of random length."""
    gen = torch.Generator().manual_seed(0)
    old = -torch.rand(num_sequences, seq_len, generator=gen) * 2
    rollout = old + 0.05 * torch.randn(num_sequences, seq_len, generator=gen)
    lengths = torch.randint(seq_len // 8, seq_len + 1, (num_sequences,), generator=gen)
    mask = (torch.arange(seq_len) < lengths.unsqueeze(1)).long()
    return dict(old_log_prob=old.to(device), rollout_log_prob=rollout.to(device), response_mask=mask.to(device))


def _run(fn, setting: Dict):
    def run(x):
        weights, mask, _ = fn(x["old_log_prob"], x["rollout_log_prob"], x["response_mask"], **setting)
        w = weights.batch["rollout_is_weights"] if weights is not None else torch.ones_like(x["old_log_prob"])
        return w * mask  # the weights the loss sees
    return run


def _functions():
    """(verl's function, ours). verl's is taken from before any patch: the verl plugin of an
    installed grpo_kernels puts ours in verl's module when verl is imported."""
    module = importlib.import_module("grpo_kernels.integrations.verl.rollout_correction")
    return module.VERL_FUNCTION, module.rollout_correction


def verl_rollout_correction_contenders(device) -> List:
    if not _have("verl"):
        return [Skipped("verl_rollout_correction (every contender)", "verl is not installed")]
    verls, ours = _functions()
    setting = SETTINGS[DEFAULT_SETTING]
    return [Contender("verl compute_rollout_correction_and_rejection_mask", _run(verls, setting), role=EAGER),
            Contender("grpo_kernels rollout_correction", _run(ours, setting))]


def _oracle(x):
    return _run(_functions()[0], SETTINGS[DEFAULT_SETTING])(x)


TASK = Task("verl_rollout_correction", lambda shape, device: build_rollout_correction(
    max(1, shape.n // SEQ_LEN), min(SEQ_LEN, shape.n), device), verl_rollout_correction_contenders, _oracle,
    tolerance=lambda s: 1e-5)


def _check_agreement(verls, ours, x, setting) -> None:
    args = (x["old_log_prob"], x["rollout_log_prob"], x["response_mask"])
    (vw, vm, vmet), (ow, om, omet) = verls(*args, **setting), ours(*args, **setting)
    assert torch.equal(vm, om), "rejection masks differ"
    if vw is not None:
        torch.testing.assert_close(ow.batch["rollout_is_weights"], vw.batch["rollout_is_weights"])
    assert list(vmet) == list(omet), "metric keys differ"
    for key, value in vmet.items():
        assert abs(omet[key] - value) <= 1e-4 * max(1.0, abs(value)), (key, omet[key], value)


def start_verl_benchmark(description: str, argv=None, add_arguments: Callable = lambda parser: None):
    """The command line of a verl benchmark (--device, --repeats, --seq-len, --threads, the output
    options, and the caller's own), verl checked, torch's threads set: (args, device, label, provenance)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=10, help="timed calls per row (interleaved rounds)")
    parser.add_argument("--seq-len", type=int, default=SEQ_LEN)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (1: on a shared machine more threads time the neighbours)")
    add_arguments(parser)
    output.add_arguments(parser)
    args = parser.parse_args(argv)
    if importlib.util.find_spec("verl") is None:
        raise SystemExit("verl is not installed")
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    label = device_name(device)
    return args, device, label, output.provenance(label)


def main(argv=None) -> None:
    args, device, label, provenance = start_verl_benchmark(__doc__.split("\n\n")[0], argv)
    verls, ours = _functions()
    x = build_rollout_correction(NUM_SEQUENCES, args.seq_len, device)
    rows = []
    for name, setting in SETTINGS.items():
        _check_agreement(verls, ours, x, setting)
        fns = {"verl 0.9.1": _run(verls, setting), "grpo_kernels": _run(ours, setting)}
        reads = {impl: count_host_reads(lambda fn=fn: fn(x)) for impl, fn in fns.items()}
        samplers = [Sampler(lambda fn=fn: fn(x), device, warmup=2, min_repeats=args.repeats,
                            max_repeats=args.repeats, time_cap_s=0.0) for fn in fns.values()]
        for impl, timing in zip(fns, measure_interleaved(samplers)):
            rows.append((name, impl, timing, reads[impl]))
    output.finish_provenance(provenance)
    lines = [f"# verl rollout correction: ours vs verl's ({label})", "",
             output.provenance_line(provenance) + f" {torch.get_num_threads()} torch thread(s).", "",
             f"B = {NUM_SEQUENCES} sequences × T = {args.seq_len} tokens, fp32 log-probs, int64 response mask "
             f"(random lengths T/8..T). One call of `compute_rollout_correction_and_rejection_mask` (verl) or "
             f"`grpo_kernels.integrations.verl.rollout_correction` with the same arguments: weights, rejection "
             f"mask and every metric (checked equal before timing). ms per call: wall clock of {args.repeats} "
             f"calls per row in interleaved rounds{', with a CUDA sync after each' if device.type == 'cuda' else ''}. "
             "Host reads: .item(), .tolist(), bool(), int(), float() of a tensor during one call (each a device "
             "sync on a GPU).", "",
             "| setting | implementation | ms per call (median) | min | max | host reads per call |",
             "|---|---|---|---|---|---|"]
    for name, impl, timing, reads in rows:
        lines.append(f"| {name} | {impl} | {timing.median:.1f} | {timing.min:.1f} | {timing.max:.1f} | {reads} |")
    text = "\n".join(lines) + "\n"
    out_dir = output.COMMITTED if args.update_committed else output.directory(args, label)
    output.publish_texts({"verl_rollout_correction.md": text}, out_dir, text)


if __name__ == "__main__":
    main()

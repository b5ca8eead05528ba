"""End to end against TRL: `trl.GRPOTrainer` and `FusedGRPOTrainer` train the same tiny model.

    python -m benchmarks.trl_trainer [--steps 8] [--vocab 32000] [--out DIR]

Each trainer runs in a fresh subprocess (so its peak resident memory is its own), at TRL 1.16's
defaults (dapo, bias-corrected KL) with beta=0.04, on the toy successor task. Reported: the
median of TRL's own `step_time` metric (one training step: loss forward + backward + optimizer,
generation excluded) and the process's peak RSS. `--vocab` widens the toy model's vocabulary
(the extra ids are never sampled by a trained model, but the LM head pays for them), so the
LM head is the cost it is in real models. Writes trl_trainer.md / .csv into a fresh
runs/benchmarks/<device>-<date>-<time>/ (or --out; --update-committed for benchmarks/results/<device>/),
at the end and atomically (benchmarks/output.py).
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile

from . import output


def _child(which: str, steps: int, vocab: int) -> dict:
    """Runs in the subprocess: one training run, returns its step times and peak RSS."""
    import torch
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from grpo_kernels.integrations.trl import FusedGRPOTrainer
    from grpo_kernels.trainer import toy

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    tokenizer = toy.char_tokenizer()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = os.path.join(tmp, "model")
        toy.tiny_causal_lm(max(vocab, len(tokenizer)), hidden_size=256, seed=0).save_pretrained(model_dir)
        args = GRPOConfig(output_dir=tmp, per_device_train_batch_size=16, num_generations=8, max_completion_length=16,
                          max_steps=steps, learning_rate=1e-4, beta=0.04, logging_steps=1, report_to=[], use_cpu=True,
                          bf16=False, seed=0, save_strategy="no", disable_tqdm=True)
        cls = GRPOTrainer if which == "trl" else FusedGRPOTrainer
        trainer = cls(model=model_dir, reward_funcs=[toy.exact_answer_reward], args=args,
                      train_dataset=Dataset.from_list(toy.successor_dataset(64)), processing_class=tokenizer)
        trainer.train()
    times = [e["step_time"] for e in trainer.state.log_history if "step_time" in e]
    return dict(step_times=times, peak_rss_MiB=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def run(which: str, steps: int, vocab: int) -> dict:
    code = (f"import json, benchmarks.trl_trainer as b; "
            f"print('RESULT' + json.dumps(b._child({which!r}, {steps}, {vocab})))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT")), None)
    if proc.returncode or line is None:
        raise RuntimeError(f"{which} run failed:\n{proc.stderr[-2000:]}")
    return json.loads(line[len("RESULT"):])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.trl_trainer", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=8, help="optimizer steps per trainer (default 8)")
    parser.add_argument("--vocab", type=int, default=32000, help="toy model vocabulary (default 32000)")
    output.add_arguments(parser)
    args = parser.parse_args(argv)
    from .measure import device_name

    import torch

    name = device_name(torch.device("cpu"))
    origin = output.provenance(name)
    rows = []
    for which, label in (("trl", "trl.GRPOTrainer (its fused LM head)"), ("ours", "FusedGRPOTrainer (grpo_kernels)")):
        print(f"running {label} ...", file=sys.stderr)
        result = run(which, args.steps, args.vocab)
        steady = result["step_times"][1:] or result["step_times"]  # the first step includes warm-up
        rows.append(dict(trainer=label, steps=args.steps, vocab=args.vocab,
                         median_step_s=statistics.median(steady), step_s_min=min(steady), step_s_max=max(steady),
                         peak_rss_MiB=result["peak_rss_MiB"]))
    base = rows[0]
    for row in rows:
        row["speedup_vs_trl"] = base["median_step_s"] / row["median_step_s"]
        row["rss_vs_trl"] = row["peak_rss_MiB"] / base["peak_rss_MiB"]
    out_dir = output.directory(args, name)
    lines = [f"# End to end against trl.GRPOTrainer ({name}, torch {torch.__version__})", "",
             output.provenance_line(output.finish_provenance(origin)), "",
             f"Tiny Llama (hidden 256, 2 layers, V={args.vocab}), 16 completions x 16 tokens per step, dapo + "
             "bias-corrected KL (beta=0.04), TRL defaults otherwise. Median of TRL's `step_time` over steps 2..N; "
             "peak RSS of the whole process.", "",
             "| trainer | median step (s) | min – max (s) | speed-up vs TRL | peak RSS (MiB) | RSS vs TRL |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['trainer']} | {r['median_step_s']:.3f} | {r['step_s_min']:.3f} – {r['step_s_max']:.3f} | "
                     f"{r['speedup_vs_trl']:.2f}x | "
                     f"{r['peak_rss_MiB']:.0f} | {r['rss_vs_trl']:.2f} |")
    text = "\n".join(lines) + "\n"
    table = io.StringIO()
    writer = csv.DictWriter(table, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    output.publish_texts({"trl_trainer.csv": table.getvalue(), "trl_trainer.md": text}, out_dir, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

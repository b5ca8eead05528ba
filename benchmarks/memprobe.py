"""Peak CPU memory of one contender, in a fresh interpreter: `python -m benchmarks.memprobe '<json spec>'`.

The spec names the task, the shape and the contender. Prints one JSON line with the peak
resident bytes above the resident set before the call (inputs already built).
"""
from __future__ import annotations

import json
import sys

import torch

from .measure import cpu_peak_extra_bytes_in_process
from .tasks import TASKS, Shape, find_contender


def main(argv=None) -> None:
    spec = json.loads((argv or sys.argv[1:])[0])
    torch.set_num_threads(spec.get("threads", torch.get_num_threads()))
    shape = Shape(**spec["shape"])
    task = TASKS[shape.task]
    device = torch.device("cpu")
    inputs = task.build(shape, device)
    contender = find_contender(shape.task, device, spec["contender"])
    contender.run(inputs)  # warm-up: lazy initialisation and compilation are not the op's memory
    task.reset(inputs)
    peak = cpu_peak_extra_bytes_in_process(lambda: contender.run(inputs))
    print(json.dumps({"peak_extra_bytes": peak}))


if __name__ == "__main__":
    main()

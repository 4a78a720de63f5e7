r"""Images/s of the training input pipeline (``l1grad.data.train_batches``).

CIFAR-10 and ImageNet are served by ``tfds.testing.mock_data`` (random
examples of the real feature shapes, no download): the decoding-free part of
the pipeline — grain indexing, shuffling, augmentation (CIFAR pad-crop-flip;
ImageNet random-resized-crop with PIL + flip), normalisation, batching — runs
exactly as in training. For ImageNet the mock images are small random-size
images, not ~400×350 JPEG decodes, so the ImageNet figure is an upper bound:
real ImageNet also pays the JPEG decode (tfds' ArrayRecord stores the encoded
image; decode happens in ``tfds.data_source``).

Each configuration is timed ``--repeats`` times, round-robin, on a fresh
iterator after ``--warmup`` batches; the median images/s is reported with
the load average. Compare with ``step_time.py``'s images/s.

  python benchmarks/input_pipeline.py
  python benchmarks/input_pipeline.py --workers 0,2 --batches 20
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

BATCHES = {"digits": 64, "cifar10": 128, "imagenet2012": 64}


def main(argv: list[str] | None = None) -> dict:
  p = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  p.add_argument("--datasets", default="digits,cifar10,imagenet2012")
  p.add_argument(
    "--workers", default="0", help="comma list of grain worker_count values"
  )
  p.add_argument("--batches", type=int, default=30, help="timed batches")
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument(
    "--num-examples", type=int, default=1024, help="mock examples per split"
  )
  p.add_argument(
    "--out",
    default=os.path.join(ROOT, "benchmarks", "results", "input_pipeline.json"),
  )
  args = p.parse_args(argv)

  import numpy as np  # pylint: disable=g-import-not-at-top
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  from l1grad import data  # pylint: disable=g-import-not-at-top

  datasets = [d for d in args.datasets.split(",") if d]
  workers = [int(w) for w in args.workers.split(",") if w]
  configs = [(d, w) for d in datasets for w in workers]
  rates: dict[str, list[float]] = {f"{d}/w{w}": [] for d, w in configs}
  shapes = {}
  loads = [os.getloadavg()]
  with tfds.testing.mock_data(
    num_examples=args.num_examples, policy=tfds.testing.MockPolicy.USE_CODE
  ):
    for d in datasets:
      if d != "digits":
        source = data._source(d, "train", None)  # pylint: disable=protected-access
        raw = [np.asarray(source[i]["image"]).shape for i in range(8)]
        shapes[d] = [list(s) for s in raw]
    for _ in range(args.repeats):
      for d, w in configs:
        batch = BATCHES[d]
        it = data.train_batches(
          d, global_batch_size=batch, seed=0, worker_count=w
        )
        for _ in range(args.warmup):
          next(it)
        t0 = time.perf_counter()
        for _ in range(args.batches):
          b = next(it)
        dt = time.perf_counter() - t0
        out_shape = list(b["image"].shape)
        it.close()
        rates[f"{d}/w{w}"].append(args.batches * batch / dt)
        shapes.setdefault(d + "_batch", out_shape)
      loads.append(os.getloadavg())
  rows = {
    k: {"median_images_per_s": statistics.median(v), "all": v}
    for k, v in rates.items()
  }
  result = {
    "started": datetime.datetime.now().isoformat(timespec="seconds"),
    "command": "python benchmarks/input_pipeline.py "
    + " ".join(sys.argv[1:] if argv is None else argv),
    "nproc": os.cpu_count(),
    "loadavg": [list(x) for x in loads],
    "batch_sizes": {d: BATCHES[d] for d in datasets},
    "shapes": shapes,
    "rows": rows,
  }
  print(
    f"load average before {loads[0][0]:.2f}, max {max(x[0] for x in loads):.2f}"
  )
  print("| dataset / grain workers | batch | images/s (median) |")
  print("|---|---|---|")
  for k, r in rows.items():
    print(
      f"| {k} | {BATCHES[k.split('/')[0]]} | {r['median_images_per_s']:.0f} |"
    )
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(result, f, indent=1)
  return result


if __name__ == "__main__":
  main()

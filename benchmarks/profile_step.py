r"""Where the time of one compiled training step goes, by kind of XLA op.

Builds a variant exactly as ``step_time.py`` does, runs it under
``jax.profiler.trace`` and sums the duration of every XLA:CPU thunk per step,
grouped by what its HLO does:

  conv (weight grad)  convolutions that produce a kernel gradient: XLA writes
                      them as a convolution whose window is the whole feature
                      map (``size=32x32``), fed by layout transposes
  conv (other)        forward and input-gradient convolutions
  transpose           fusions whose root moves data between layouts
  max-pool backward   iota / variadic reduce-window / scatter / concatenate:
                      XLA:CPU expands select-and-scatter into these
  dot                 matrix products (the Dense layers)
  reduce              reductions (BatchNorm statistics, norms)
  elementwise         everything else

Thunks may overlap on several threads, so the total can exceed the step's
wall time; the shares are what matters. Also prints the top thunks.

  python benchmarks/profile_step.py --model vgg --variant plain
  python benchmarks/profile_step.py --model resnet18 --variant l1_hvp --top 15
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import step_time  # noqa: E402  # pylint: disable=wrong-import-position


def classify(hlo: str) -> dict[str, tuple[str, str]]:
  """Instruction name → (category, short description) for the entry thunks."""
  comps: dict[str, list[str]] = {}
  cur = None
  for line in hlo.splitlines():
    m = re.match(r"^(?:ENTRY )?%(\S+) .*\{$", line)
    if m:
      cur = m.group(1)
      comps[cur] = []
    elif cur:
      comps[cur].append(line)
  out = {}
  for line in hlo.splitlines():
    m = re.match(r"^\s*(?:ROOT )?%(\S+) = (\S+) ([\w-]+)\(", line)
    if not m:
      continue
    name, shape, op = m.groups()
    body = line
    if op == "fusion":
      called = re.search(r"calls=%([\w.\-]+)", line)
      body = "\n".join(comps.get(called.group(1), [])) if called else ""
    src = re.search(r'op_name="([^"]*)"', body)
    where = "/".join(src.group(1).split("/")[-3:-1]) if src else ""
    if " convolution(" in body or op == "convolution":
      window = re.search(r"window=\{size=(\d+)x(\d+)", body)
      big = window and int(window.group(1)) > 7
      out[name] = (
        "conv (weight grad)" if big else "conv (other)",
        f"{shape} {window.group(0) if window else ''} {where}",
      )
    elif (
      re.search(r"\b(iota|scatter|concatenate)\(", body)
      or "reduce-window(" in body
    ):
      out[name] = ("max-pool backward", shape)
    elif " dot(" in body or op == "dot":
      out[name] = ("dot", shape)
    elif "transpose(" in body or op == "transpose":
      out[name] = ("transpose", shape)
    elif re.search(r"\breduce\(", body):
      out[name] = ("reduce", shape)
    else:
      out[name] = ("elementwise", f"{op} {shape}")
  return out


def main(argv: list[str] | None = None) -> None:
  p = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  p.add_argument(
    "--model", default="vgg", help="digits, vgg, resnet18 or resnet18_imagenet"
  )
  p.add_argument("--variant", default="plain")
  p.add_argument("--steps", type=int, default=5)
  p.add_argument("--top", type=int, default=10)
  p.add_argument("--option-set", action="append", default=[])
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--vgg-width", type=float, default=0.25)
  p.add_argument("--resnet-filters", type=int, default=16)
  p.add_argument("--image-size", type=int, default=224)
  args = p.parse_args(argv)

  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from jax.sharding import NamedSharding  # pylint: disable=g-import-not-at-top
  from jax.sharding import PartitionSpec as P  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  from l1grad import models  # pylint: disable=g-import-not-at-top
  from l1grad import train  # pylint: disable=g-import-not-at-top

  sargs = step_time.parse_args(
    [
      "--batch",
      str(args.batch),
      "--vgg-width",
      str(args.vgg_width),
      "--resnet-filters",
      str(args.resnet_filters),
      "--image-size",
      str(args.image_size),
    ]
    + [f"--option-set={s}" for s in args.option_set]
  )
  setup = step_time.model_setup(args.model, sargs)
  mesh = train.data_mesh()
  rep, bsh = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
  model = models.from_config(setup["config"], setup["num_classes"])
  params, stats = train.init_variables(model, setup["image_shape"], 0)
  b = setup["batch"]
  rs = np.random.RandomState(0)
  batch = jax.device_put(
    {
      "image": jnp.asarray(rs.randn(b, *setup["image_shape"]), jnp.float32),
      "label": jnp.asarray(rs.randint(0, setup["num_classes"], b), jnp.int32),
    },
    bsh,
  )
  rng = jax.device_put(jax.random.key(0), rep)
  built = step_time.build_jax_variant(
    setup, args.variant, sargs, params, stats, batch, rng, (rep, bsh)
  )
  kinds = classify(built["compiled"].as_text())
  built["run"](3)
  with tempfile.TemporaryDirectory() as d:
    with jax.profiler.trace(d, create_perfetto_trace=True):
      built["run"](args.steps)
    trace = glob.glob(os.path.join(d, "**", "*.trace.json.gz"), recursive=True)[
      0
    ]
    with gzip.open(trace) as f:
      events = json.load(f)
  events = events["traceEvents"] if isinstance(events, dict) else events
  per_thunk: collections.Counter = collections.Counter()
  for e in events:
    if e.get("ph") == "X" and e.get("name") in kinds:
      per_thunk[e["name"]] += e.get("dur", 0) / 1e3 / args.steps
  per_kind: collections.Counter = collections.Counter()
  for name, ms in per_thunk.items():
    per_kind[kinds[name][0]] += ms
  total = sum(per_kind.values())
  print(
    f"{args.model} {args.variant}: {total:.1f} ms of thunk time per step "
    f"(load average {os.getloadavg()[0]:.2f})"
  )
  for kind, ms in per_kind.most_common():
    print(f"  {kind:20s} {ms:7.1f} ms  {100 * ms / total:5.1f} %")
  print("top thunks:")
  for name, ms in per_thunk.most_common(args.top):
    print(f"  {ms:6.2f} ms  {kinds[name][0]:18s} {kinds[name][1][:90]}")


if __name__ == "__main__":
  main()

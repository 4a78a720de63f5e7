r"""The PyTorch peer: the same models and step, written the way the paper does.

The regularized step is the paper's (and its public reimplementation's)
recipe: a forward pass that keeps the inputs of every Conv/Linear layer but
the first (the quantized activations, captured by forward pre-hooks; a tensor
read by two layers — a ResNet block input feeding the projection shortcut —
is captured once), ``torch.autograd.grad(loss, kernels + activations,
create_graph=True)``, the ℓ1 norm of those gradients times λ added to the
loss, one ``backward()`` through everything (double backward), then an SGD
step (momentum 0.9, Nesterov, weight decay 5e-4). The plain step is forward,
``backward()``, SGD. BatchNorm is in train mode, as in ours.

Models mirror ``l1grad.models``: VGG-like (conv → BN → ReLU stack, 1024FC → BN
→ ReLU, head; ``width_multiplier`` scales channels), ResNet-18 with the CIFAR
stem (3×3/1, no max-pool) or the ImageNet stem (7×7/2, max-pool), basic blocks
with 1×1 projection shortcuts, PyTorch's default NCHW layout.

torch is an optional dependency (``pip install -e .[bench]``), never one of
the library. Used by ``step_time.py --peer``; standalone:
  python benchmarks/peer_torch.py --model vgg --batch 32 --vgg-width 0.25
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

# libgomp's default (spin-wait, then sleep) collapses when other processes
# share the cores: measured here under load 6 on 2 cores, the VGG-like plain
# step took 1.7 s with spinning threads and 0.1 s with passive ones. Set
# before torch starts its OpenMP runtime; an explicit setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # pylint: disable=g-import-not-at-top,wrong-import-position
from torch import nn  # pylint: disable=g-import-not-at-top,wrong-import-position
from torch.nn import functional as F  # pylint: disable=g-import-not-at-top,wrong-import-position

VGG_LAYERS = (128, 128, "M", 256, 256, "M", 512, 512, "M")
VGG_HIDDEN = 1024


def _scaled(n: int, m: float) -> int:
  return max(1, int(round(n * m)))


class VGGLike(nn.Module):
  def __init__(
    self,
    num_classes: int,
    width_multiplier: float,
    image_shape: tuple[int, int, int],
  ):
    super().__init__()
    layers: list[nn.Module] = []
    c = image_shape[2]
    side = image_shape[0]
    for layer in VGG_LAYERS:
      if layer == "M":
        layers.append(nn.MaxPool2d(2))
        side //= 2
      else:
        out = _scaled(layer, width_multiplier)
        layers += [
          nn.Conv2d(c, out, 3, padding=1, bias=False),
          nn.BatchNorm2d(out, momentum=0.1, eps=1e-5),
          nn.ReLU(),
        ]
        c = out
    self.features = nn.Sequential(*layers)
    hidden = _scaled(VGG_HIDDEN, width_multiplier)
    self.fc = nn.Linear(c * side * side, hidden, bias=False)
    self.fc_bn = nn.BatchNorm1d(hidden, momentum=0.1, eps=1e-5)
    self.head = nn.Linear(hidden, num_classes)

  def forward(self, x):
    x = self.features(x).flatten(1)
    return self.head(F.relu(self.fc_bn(self.fc(x))))


class BasicBlock(nn.Module):
  def __init__(self, cin: int, cout: int, stride: int):
    super().__init__()
    self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(cout)
    self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(cout)
    self.proj = None
    if stride != 1 or cin != cout:
      self.proj = nn.Sequential(
        nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
      )

  def forward(self, x):
    y = F.relu(self.bn1(self.conv1(x)))
    y = self.bn2(self.conv2(y))
    return F.relu(y + (x if self.proj is None else self.proj(x)))


class ResNet18(nn.Module):
  def __init__(self, num_classes: int, num_filters: int, stem: str):
    super().__init__()
    f = num_filters
    if stem == "cifar":
      self.stem = nn.Sequential(
        nn.Conv2d(3, f, 3, 1, 1, bias=False), nn.BatchNorm2d(f), nn.ReLU()
      )
    else:
      self.stem = nn.Sequential(
        nn.Conv2d(3, f, 7, 2, 3, bias=False),
        nn.BatchNorm2d(f),
        nn.ReLU(),
        nn.MaxPool2d(3, 2, 1),
      )
    blocks, cin = [], f
    for i in range(4):
      for j in range(2):
        cout = f * 2**i
        blocks.append(BasicBlock(cin, cout, 2 if i > 0 and j == 0 else 1))
        cin = cout
    self.blocks = nn.Sequential(*blocks)
    self.head = nn.Linear(cin, num_classes)

  def forward(self, x):
    x = self.blocks(self.stem(x))
    return self.head(x.mean(dim=(2, 3)))


def build_model(
  name: str,
  *,
  num_classes: int,
  image_shape,
  vgg_width: float,
  resnet_filters: int,
) -> nn.Module:
  if name == "vgg":
    return VGGLike(num_classes, vgg_width, image_shape)
  if name == "resnet18":
    return ResNet18(num_classes, resnet_filters, "cifar")
  if name == "resnet18_imagenet":
    return ResNet18(num_classes, resnet_filters, "imagenet")
  raise ValueError(f"no PyTorch peer for model {name!r}")


class Peer:
  """One model, one fixed batch, and its plain and regularized steps."""

  def __init__(
    self,
    name: str,
    *,
    num_classes: int,
    image_shape,
    batch: int,
    vgg_width: float = 0.25,
    resnet_filters: int = 16,
    threads: int = 0,
    coef: float = 0.05,
    channels_last=False,
  ):
    if threads:
      torch.set_num_threads(threads)
    torch.manual_seed(0)
    self.model = build_model(
      name,
      num_classes=num_classes,
      image_shape=image_shape,
      vgg_width=vgg_width,
      resnet_filters=resnet_filters,
    ).train()
    h, w, c = image_shape
    self.x = torch.randn(batch, c, h, w)
    self.y = torch.randint(0, num_classes, (batch,))
    if channels_last:
      self.model = self.model.to(memory_format=torch.channels_last)
      self.x = self.x.contiguous(memory_format=torch.channels_last)
    self.coef = coef
    self.opt = torch.optim.SGD(
      self.model.parameters(),
      lr=0.01,
      momentum=0.9,
      nesterov=True,
      weight_decay=5e-4,
    )
    self.layers = [
      m for m in self.model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))
    ]
    self.kernels = [m.weight for m in self.layers]
    self._acts: list[torch.Tensor] | None = None
    for m in self.layers:
      m.register_forward_pre_hook(self._capture)

  def _capture(self, module, inputs):
    del module
    acts = self._acts
    if acts is None:
      return
    x = inputs[0]
    if x is self.x or any(x is a for a in acts):
      return  # the image, or a tensor already captured (shared input)
    acts.append(x)

  def step(self, regularized: bool) -> float:
    self.opt.zero_grad(set_to_none=True)
    if not regularized:
      loss = F.cross_entropy(self.model(self.x), self.y)
      loss.backward()
      self.opt.step()
      return float(loss.detach())
    self._acts = []
    try:
      loss = F.cross_entropy(self.model(self.x), self.y)
      acts = self._acts
    finally:
      self._acts = None
    grads = torch.autograd.grad(loss, self.kernels + acts, create_graph=True)
    penalty = self.coef * sum(g.abs().sum() for g in grads)
    (loss + penalty).backward()
    self.opt.step()
    return float(loss.detach())

  def run(self, regularized: bool, steps: int) -> None:
    for _ in range(steps):
      self.step(regularized)


def main() -> None:
  p = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  p.add_argument(
    "--model", default="vgg", choices=["vgg", "resnet18", "resnet18_imagenet"]
  )
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--vgg-width", type=float, default=0.25)
  p.add_argument("--resnet-filters", type=int, default=16)
  p.add_argument("--threads", type=int, default=0)
  p.add_argument("--repeats", type=int, default=7)
  p.add_argument("--steps", type=int, default=3)
  p.add_argument("--channels-last", action="store_true")
  args = p.parse_args()
  imagenet = args.model == "resnet18_imagenet"
  peer = Peer(
    args.model,
    num_classes=1000 if imagenet else 10,
    image_shape=(224, 224, 3) if imagenet else (32, 32, 3),
    batch=args.batch,
    vgg_width=args.vgg_width,
    resnet_filters=args.resnet_filters,
    threads=args.threads,
    channels_last=args.channels_last,
  )
  times = {False: [], True: []}
  for reg in (False, True):
    peer.run(reg, 2)
  for _ in range(args.repeats):
    for reg in (False, True):
      t0 = time.perf_counter()
      peer.run(reg, args.steps)
      times[reg].append((time.perf_counter() - t0) / args.steps)
  plain, l1 = (statistics.median(times[k]) for k in (False, True))
  print(
    f"torch {torch.__version__}, {torch.get_num_threads()} threads: "
    f"plain {1e3 * plain:.1f} ms, l1 {1e3 * l1:.1f} ms, "
    f"ratio {l1 / plain:.2f}"
  )


if __name__ == "__main__":
  main()

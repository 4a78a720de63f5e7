"""Integer export of a post-training-quantized model, and a loader that runs it.

One kind of thing: the export format, its writer and its loader, kept
together so the two sides of the format cannot drift apart.

:func:`export_model` writes what an integer deployment needs for one (W, A)
pair, as two files in a directory:

* ``weights.npz``: per kernel its integer codes (``int8``; 4 bits and below
  packed two per byte as ``uint8``; ``int16`` above 8 bits) and its scale
  (float32, per tensor or per output channel); the folded biases and any
  other parameters (the head's bias, unfolded batch norms) in float32;
* ``manifest.json``: format version, model name, ``num_classes`` and keyword
  arguments, bit-widths, which layers have batch norm folded in, activation
  ranges (and how they were obtained) for every quantized activation, the
  storage of each kernel, the input preprocessing (``preprocessing``: raw
  pixel range and the per-channel mean/std the training pipeline normalised
  with, :class:`l1grad.data.InputNormalization`), and the source run's
  config and step.

:func:`load_exported` rebuilds the model with :func:`l1grad.models.get_model`,
dequantizes the kernels (``codes * scale``, the very float32 values the
fake-quantized sweep computes) and runs it through
:func:`l1grad.ptq.quantized_apply`, the sweep's own forward pass, so its
logits equal the fake-quantized ones. It takes raw images (e.g. digits pixels
0..16, CIFAR-10 uint8) and normalises them as training did; see
:meth:`ExportedModel.__call__`.

Codes follow the paper's symmetric grid: ``[-(2^(b-1)-1), 2^(b-1)-1]``, so a
4-bit code fits a signed nibble.
"""

from __future__ import annotations

from collections.abc import Mapping
import dataclasses
import json
import os
from typing import TYPE_CHECKING, Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.typing import ArrayLike
import numpy as np

from l1grad import bits as bits_lib
from l1grad import errors
from l1grad import fold
from l1grad import models
from l1grad import params as params_lib
from l1grad import ptq
from l1grad import quant
from l1grad import ranges as ranges_lib
from l1grad import runs

if TYPE_CHECKING:
  from l1grad import data

__all__ = [
  "ExportInfo",
  "ExportedModel",
  "checkpoint_bytes",
  "export_model",
  "export_run",
  "load_exported",
  "pack_int4",
  "unpack_int4",
]

FORMAT = "l1grad.export/1"
MANIFEST = "manifest.json"
WEIGHTS = "weights.npz"
_SEP = "/"
# How a manifest's "preprocessing" turns raw images into model input; the
# same float32 arithmetic as l1grad.data's pipeline (bit for bit).
PREPROCESSING_FORMULA = (
  "input = (float32(raw) - mean * pixel_max) / (std * pixel_max),"
  " per channel, each product rounded to float32"
)


# ---------------------------------------------------------------------------
# Packing.
# ---------------------------------------------------------------------------


def pack_int4(codes: ArrayLike) -> np.ndarray:
  """Packs signed 4-bit codes (in [-8, 7]) two per byte, flattened.

  Element ``2i`` goes to the low nibble of byte ``i``, ``2i+1`` to the high
  nibble, each in two's complement; an odd count is padded with a 0 code.

  Args:
    codes: Integer codes, any shape.

  Returns:
    ``uint8`` array of ``ceil(size / 2)`` bytes.
  """
  flat = np.asarray(codes).reshape(-1).astype(np.int64)
  if flat.size and (flat.min() < -8 or flat.max() > 7):
    raise ValueError("codes out of the signed 4-bit range [-8, 7]")
  if flat.size % 2:
    flat = np.append(flat, 0)
  nibbles = (flat & 0xF).astype(np.uint8)
  return (nibbles[0::2] | (nibbles[1::2] << 4)).astype(np.uint8)


def unpack_int4(packed: ArrayLike, shape: tuple[int, ...]) -> np.ndarray:
  """Inverse of :func:`pack_int4`: ``int8`` codes of the given shape."""
  packed = np.asarray(packed, np.uint8)
  nibbles = np.empty(packed.size * 2, np.int16)
  nibbles[0::2] = packed & 0xF
  nibbles[1::2] = packed >> 4
  signed = (nibbles ^ 8) - 8  # sign-extend the 4-bit two's complement
  size = int(np.prod(shape, dtype=np.int64))
  return signed[:size].astype(np.int8).reshape(shape)


def _storage(w_bits: int) -> str:
  if w_bits <= 4:
    return "int4x2"
  if w_bits <= 8:
    return "int8"
  return "int16"


def _encode(codes: np.ndarray, storage: str) -> np.ndarray:
  if storage == "int4x2":
    return pack_int4(codes)
  return codes.astype(np.int8 if storage == "int8" else np.int16)


def _decode(
  stored: np.ndarray, storage: str, shape: tuple[int, ...]
) -> np.ndarray:
  if storage == "int4x2":
    return unpack_int4(stored, shape)
  return np.asarray(stored).reshape(shape)


# ---------------------------------------------------------------------------
# Writing.
# ---------------------------------------------------------------------------


def _flatten(tree: Any) -> dict[str, np.ndarray]:
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  out = {}
  for path, leaf in flat:
    out[params_lib.layer_name(path)] = leaf
  return out


def _unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
  tree: dict[str, Any] = {}
  for name, leaf in flat.items():
    node = tree
    *parents, last = name.split(_SEP)
    for p in parents:
      node = node.setdefault(p, {})
    node[last] = leaf
  return tree


@dataclasses.dataclass
class ExportInfo:
  """What :func:`export_model` wrote.

  Attributes:
    path: The export directory.
    bytes: Total size of the written files.
    weights_bytes: Size of ``weights.npz`` (codes, scales, float biases).
    float_bytes: Size of the float variables it was made from (params and
      batch statistics, as stored in float32).
    max_abs_diff: Largest difference between the exported model's logits
      and the fake-quantized logits on the check batch (expected 0).
  """

  path: str
  bytes: int
  weights_bytes: int
  float_bytes: int
  max_abs_diff: float | None = None

  def summary(self, checkpoint_bytes: int | None = None) -> str:
    parts = [
      f"Exported integer model to {self.path}: {self.bytes:,} bytes"
      f" (weights {self.weights_bytes:,}, manifest {self.bytes - self.weights_bytes:,})"
    ]
    parts.append(
      f"float variables {self.float_bytes:,} bytes"
      f" ({self.float_bytes / max(self.bytes, 1):.1f}x larger)"
    )
    if checkpoint_bytes:
      parts.append(
        f"float checkpoint on disk {checkpoint_bytes:,} bytes"
        f" ({checkpoint_bytes / max(self.bytes, 1):.1f}x larger)"
      )
    if self.max_abs_diff is not None:
      parts.append(
        f"max |logit difference| vs fake-quantized model {self.max_abs_diff:g}"
      )
    return "; ".join(parts) + "."


def _preprocessing_json(preprocessing: Any) -> dict[str, Any] | None:
  """The manifest's ``preprocessing`` entry, checked; None stays None."""
  if preprocessing is None:
    return None
  spec = dict(
    preprocessing.to_json()
    if hasattr(preprocessing, "to_json")
    else preprocessing
  )
  try:
    mean = [float(m) for m in spec["mean"]]
    std = [float(s) for s in spec["std"]]
    pixel_max = float(spec["pixel_max"])
  except (KeyError, TypeError, ValueError) as e:
    raise ValueError(
      f"preprocessing needs pixel_max, mean and std; got {spec}"
    ) from e
  if not mean or len(mean) != len(std) or min(std) <= 0 or pixel_max <= 0:
    raise ValueError(
      f"preprocessing: bad mean/std/pixel_max {mean}, {std}, {pixel_max}"
    )
  spec.update(
    pixel_max=pixel_max, mean=mean, std=std, formula=PREPROCESSING_FORMULA
  )
  if spec.get("image_shape") is not None:
    spec["image_shape"] = [int(d) for d in spec["image_shape"]]
  return spec


def _nbytes(tree: Any) -> int:
  return int(
    sum(np.asarray(x).size * 4 for x in jax.tree_util.tree_leaves(tree))
  )


def export_model(
  out_dir: str,
  *,
  model_name: str,
  num_classes: int,
  model_kwargs: Mapping[str, Any],
  variables: Any,
  ranges: Mapping[str, tuple[float, float]],
  w_bits: int,
  a_bits: int,
  per_channel: bool = False,
  act_ranges: str = "bn",
  metadata: Mapping[str, Any] | None = None,
  float_bytes: int | None = None,
  check_images: ArrayLike | None = None,
  preprocessing: data.InputNormalization | Mapping[str, Any] | None = None,
) -> ExportInfo:
  """Writes the integer model for one (W, A) pair.

  Args:
    out_dir: Directory to write (created; existing files are replaced).
    model_name: Registry name for :func:`l1grad.models.get_model`.
    num_classes: The model's ``num_classes``.
    model_kwargs: Other :func:`get_model` arguments (JSON-serialisable).
    variables: Float variables as evaluated: folded
      (:class:`l1grad.fold.FoldedVariables`, the deployment case) or plain.
    ranges: Activation ranges ``{point key: (low, high)}``.
    w_bits: Weight bit-width.
    a_bits: Activation bit-width.
    per_channel: Per-output-channel weight scales.
    act_ranges: How the ranges were obtained (recorded).
    metadata: Extra JSON (source run, step, config) for the manifest.
    float_bytes: Size of the float model for the summary; default the size
      of ``variables``.
    check_images: If given, the exported model is loaded back and its logits
      on these images (model input, i.e. already normalised) compared with
      the fake-quantized ones (``ExportInfo.max_abs_diff``).
    preprocessing: How raw images become model input
      (:func:`l1grad.data.input_normalization`, or its ``to_json()``), so
      that the loaded model takes raw images. ``None`` records
      ``"preprocessing": null``: the loaded model then runs on its input
      as given.

  Returns:
    Sizes and the check result.
  """
  bits_lib.check_bits(w_bits, "weight bits")
  bits_lib.check_bits(a_bits, "activation bits")
  preprocessing_json = _preprocessing_json(preprocessing)
  folded = isinstance(variables, fold.FoldedVariables)
  params = variables.params if folded else variables["params"]
  state = (
    variables.state
    if folded
    else {k: v for k, v in variables.items() if k != "params"}
  )
  arrays: dict[str, np.ndarray] = {}
  kernels: dict[str, Any] = {}
  storage = _storage(w_bits)
  flat, _ = jax.tree_util.tree_flatten_with_path(params)
  for path, leaf in flat:
    name = params_lib.layer_name(path)
    if params_lib.is_kernel_path(path):
      scale = quant.kernel_scale(leaf, w_bits, per_channel=per_channel)
      codes = np.asarray(
        quant.quantize_to_int(leaf, w_bits, scale, signed=True)
      )
      arrays[f"codes/{name}"] = _encode(codes, storage)
      arrays[f"scales/{name}"] = np.asarray(scale, np.float32)
      kernels[name] = {
        "shape": list(codes.shape),
        "storage": storage,
        "dtype": str(np.asarray(leaf).dtype),
      }
    else:
      arrays[f"params/{name}"] = np.asarray(leaf, np.float32)
  for collection, tree in state.items():
    for name, leaf in _flatten(tree).items():
      arrays[f"state/{collection}/{name}"] = np.asarray(leaf, np.float32)
  folds = []
  if folded:
    for layer, link in variables.pairs.items():
      entry = {
        "layer": list(layer),
        "batch_norm": list(link.path),
        "epsilon": link.epsilon,
      }
      bias = variables.biases.get(layer)
      if bias is not None:
        arrays[f"biases/{_SEP.join(layer)}"] = np.asarray(bias, np.float32)
      folds.append(entry)
  manifest = {
    "format": FORMAT,
    "model": {
      "name": model_name,
      "num_classes": int(num_classes),
      "kwargs": dict(model_kwargs),
    },
    "w_bits": int(w_bits),
    "a_bits": int(a_bits),
    "per_channel": bool(per_channel),
    "weight_grid": "symmetric signed, codes in [-(2^(b-1)-1), 2^(b-1)-1], value = code * scale",
    "activation_grid": (
      "unsigned [0, 2^b-1], scale = high/(2^b-1) when low >= 0;"
      " else signed, scale = max(|low|,|high|)/(2^(b-1)-1)"
    ),
    "kernels": kernels,
    "folded": folds,
    "act_ranges": act_ranges,
    "activation_ranges": {
      k: [float(lo), float(hi)] for k, (lo, hi) in ranges.items()
    },
    "preprocessing": preprocessing_json,
    **({"source": dict(metadata)} if metadata else {}),
  }
  os.makedirs(out_dir, exist_ok=True)
  np.savez(os.path.join(out_dir, WEIGHTS), **arrays)
  with open(os.path.join(out_dir, MANIFEST), "w") as f:
    json.dump(manifest, f, indent=2, ensure_ascii=False, default=str)
    f.write("\n")
  size = sum(
    os.path.getsize(os.path.join(out_dir, n)) for n in (WEIGHTS, MANIFEST)
  )
  if float_bytes is None:
    float_bytes = (
      _nbytes(params)
      + _nbytes(state)
      + (_nbytes(variables.biases) if folded else 0)
    )
  info = ExportInfo(
    out_dir, size, os.path.getsize(os.path.join(out_dir, WEIGHTS)), float_bytes
  )
  if check_images is not None:
    exported = load_exported(out_dir)
    model = exported.model
    want = ptq.cached_evaluator(model, per_channel).quantized_logits(
      variables,
      ranges_lib.range_tree(ranges),
      jnp.int32(w_bits),
      jnp.int32(a_bits),
      jnp.asarray(check_images),
    )
    got = exported(check_images, normalized=True)
    info.max_abs_diff = float(jnp.max(jnp.abs(got - want)))
  return info


# ---------------------------------------------------------------------------
# Loading.
# ---------------------------------------------------------------------------


class ExportedModel:
  """An exported integer model, loaded and runnable.

  Calling it runs the model with dequantized integer weights and
  fake-quantized activations (jitted), i.e. the arithmetic of an integer
  kernel: ``(codes_w * s_w) · (codes_a * s_a) + bias``. It takes raw images
  and normalises them as training did (see :meth:`__call__`).

  Attributes:
    model: The rebuilt linen model.
    manifest: The parsed ``manifest.json``.
    variables: Dequantized variables (folded if the export was folded).
    codes: ``{kernel name: int8/int16 codes}`` (unpacked).
    scales: ``{kernel name: float32 scale}``.
    ranges: Activation ranges ``{key: (low, high)}``.
    w_bits: Weight bit-width.
    a_bits: Activation bit-width.
    preprocessing: The manifest's input preprocessing (``raw``,
      ``pixel_max``, ``mean``, ``std``, ``image_shape``), or None.
    path: The export directory, if loaded from one.
  """

  def __init__(
    self,
    model: nn.Module,
    manifest: Mapping[str, Any],
    variables: Any,
    codes: dict[str, np.ndarray],
    scales: dict[str, np.ndarray],
    path: str | None = None,
  ):
    self.model = model
    self.manifest = dict(manifest)
    self.variables = variables
    self.codes = codes
    self.scales = scales
    self.ranges = {
      k: (lo, hi) for k, (lo, hi) in manifest["activation_ranges"].items()
    }
    self.w_bits = int(manifest["w_bits"])
    self.a_bits = int(manifest["a_bits"])
    self.preprocessing = manifest.get("preprocessing")
    self.path = path
    # Exports written before l1grad recorded the preprocessing lack the key.
    self._predates_preprocessing = "preprocessing" not in manifest
    range_tree = ranges_lib.range_tree(self.ranges)
    a_bits = jnp.int32(self.a_bits)

    @jax.jit
    def run(variables, images):
      return ptq.quantized_apply(model, variables, range_tree, a_bits, images)

    self._run = run

  def __call__(
    self, images: ArrayLike, *, normalized: bool = False
  ) -> jax.Array:
    """Logits of the integer model on a batch of images.

    Args:
      images: A batch of raw images, as the manifest's
        ``preprocessing["raw"]`` describes: digits
        ``sklearn.datasets.load_digits().images`` (pixel values 0..16, any
        numeric dtype, ``[N, 8, 8]`` or ``[N, 8, 8, 1]``); CIFAR-10 uint8
        RGB ``[N, 32, 32, 3]``; ImageNet uint8 RGB ``[N, 224, 224, 3]``
        (shorter side resized to 256, central crop). They are normalised
        exactly as training normalised them (:meth:`normalize`).
      normalized: The images are already model input (float32, normalised
        as training did, e.g. the ``"image"`` of
        :func:`l1grad.data.eval_batches`): run on them as given.

    Exports with ``"preprocessing": null`` (:func:`export_model` called
    without one) run on their input as given, whatever ``normalized``.
    Exports written before l1grad recorded the preprocessing (no
    ``preprocessing`` key in the manifest) cannot normalise: they need
    ``normalized=True`` and raise otherwise, never guessing.

    Returns:
      Float32 logits ``[N, num_classes]``.

    Raises:
      errors.UserError: Raw images out of range or of the wrong shape, or
        raw images for an export that predates recorded preprocessing.
    """
    if not normalized and (
      self.preprocessing is not None or self._predates_preprocessing
    ):
      images = self.normalize(images)
    return self._run(self.variables, jnp.asarray(images))

  def normalize(self, images: ArrayLike) -> np.ndarray:
    """Raw images to model input: the manifest's preprocessing, in numpy float32.

    ``(float32(raw) - mean * pixel_max) / (std * pixel_max)`` per channel, the
    training pipeline's own arithmetic (bit-identical input). A ``[N, H, W]``
    batch gets a channel axis when the model takes one channel.

    Raises:
      errors.UserError: No preprocessing recorded, values outside
        ``[0, pixel_max]`` (e.g. images already normalised) or a shape that is
        not ``[N, H, W, C]`` of the model's input.
    """
    spec = self.preprocessing
    where = self.path or "This export"
    if spec is None:
      if self._predates_preprocessing:
        source = self.manifest.get("source") or {}
        redo = (
          f" python eval_ptq.py --workdir {source['workdir']} --export"
          f" {self.w_bits}:{self.a_bits} --export_dir {self.path or 'DIR'}"
          if "workdir" in source
          else " eval_ptq.py --export"
        )
        raise errors.UserError(
          f"{where} records no input preprocessing (it was exported before l1grad"
          " recorded it), so raw images cannot be normalised. Pass model input"
          " normalised as in training with model(images, normalized=True), or"
          f" re-export to record it:{redo}"
        )
      raise errors.UserError(
        f"{where} was exported without preprocessing (\"preprocessing\": null): it"
        " runs on its input as given; there is nothing to normalise with."
      )
    x = np.asarray(images)
    shape = tuple(spec["image_shape"]) if spec.get("image_shape") else None
    if shape is not None:
      if x.ndim == 3 and shape[-1] == 1 and x.shape[1:] == shape[:2]:
        x = x[..., None]
      if x.shape[1:] != shape or x.ndim != 4:
        raise errors.UserError(
          f"Expected a batch of raw images [N, {', '.join(map(str, shape))}]"
          f" ({spec.get('raw', 'raw pixels')}); got shape {list(x.shape)}."
        )
    pixel_max = np.float32(spec["pixel_max"])
    if x.size:
      lo, hi = float(np.min(x)), float(np.max(x))
      if lo < 0 or hi > pixel_max:
        raise errors.UserError(
          f"Raw pixel values must lie in [0, {pixel_max:g}] ({spec.get('raw', 'raw pixels')});"
          f" got [{lo:g}, {hi:g}]. For images already normalised as in training,"
          " call model(images, normalized=True)."
        )
    mean = np.asarray(spec["mean"], np.float32) * pixel_max
    std = np.asarray(spec["std"], np.float32) * pixel_max
    return (x.astype(np.float32) - mean) / std


def load_exported(
  path: str, *, model: nn.Module | None = None
) -> ExportedModel:
  """Loads a directory written by :func:`export_model`.

  Example (digits)::

    model = export.load_exported("exported/digits")
    logits = model(load_digits().images)   # raw pixels 0..16, [N, 8, 8]
    logits = model(batch["image"], normalized=True)  # l1grad.data's input

  The returned model takes **raw images** by default (dtype, range and shape
  in ``manifest["preprocessing"]["raw"]``: digits pixel values 0..16 as
  ``[N, 8, 8]`` or ``[N, 8, 8, 1]``; CIFAR-10 / ImageNet uint8 RGB
  ``[N, H, W, 3]`` at the model's size) and normalises them as training did;
  ``model(x, normalized=True)`` takes input already normalised. An export
  written before the preprocessing was recorded has no ``preprocessing`` in
  its manifest: it accepts only ``normalized=True`` input and says so
  otherwise (re-export to record it). See :meth:`ExportedModel.__call__`.

  Args:
    path: The export directory.
    model: The model to run; default rebuilt from the manifest with
      :func:`l1grad.models.get_model`.

  Returns:
    The runnable model.

  Raises:
    errors.UserError: Not an export directory, or an unknown format.
  """
  from l1grad import models  # pylint: disable=g-import-not-at-top

  manifest_path = os.path.join(path, MANIFEST)
  if not os.path.isfile(manifest_path) or not os.path.isfile(
    os.path.join(path, WEIGHTS)
  ):
    raise errors.UserError(
      f"{path!r} is not an l1grad export (no {MANIFEST}/{WEIGHTS}); write one with"
      " python eval_ptq.py --workdir DIR --export W:A --export_dir OUT."
    )
  with open(manifest_path) as f:
    manifest = json.load(f)
  if manifest.get("format") != FORMAT:
    raise errors.UserError(
      f"{manifest_path} has format {manifest.get('format')!r}; this l1grad reads {FORMAT!r}."
      " Re-export with this version."
    )
  if model is None:
    spec = manifest["model"]
    kwargs = dict(spec["kwargs"])
    if isinstance(kwargs.get("dtype"), str):
      kwargs["dtype"] = jnp.dtype(kwargs["dtype"])
    model = models.get_model(
      spec["name"], num_classes=spec["num_classes"], **kwargs
    )
  with np.load(os.path.join(path, WEIGHTS)) as npz:
    arrays = {k: npz[k] for k in npz.files}
  codes, scales, params_flat = {}, {}, {}
  for name, spec in manifest["kernels"].items():
    c = _decode(arrays[f"codes/{name}"], spec["storage"], tuple(spec["shape"]))
    s = arrays[f"scales/{name}"]
    codes[name], scales[name] = c, s
    # The same float32 product fake_quant forms: n * scale.
    params_flat[name] = (c.astype(np.float32) * s).astype(spec["dtype"])
  state_flat: dict[str, dict[str, np.ndarray]] = {}
  biases = {}
  for key, value in arrays.items():
    kind, _, rest = key.partition(_SEP)
    if kind == "params":
      params_flat[rest] = value
    elif kind == "state":
      collection, _, name = rest.partition(_SEP)
      state_flat.setdefault(collection, {})[name] = value
    elif kind == "biases":
      biases[tuple(rest.split(_SEP))] = jnp.asarray(value)
  params = _unflatten(params_flat)
  state = {c: _unflatten(f) for c, f in state_flat.items()}
  if manifest["folded"]:
    pairs = {
      tuple(e["layer"]): fold.BatchNormLink(
        tuple(e["batch_norm"]), float(e["epsilon"])
      )
      for e in manifest["folded"]
    }
    variables = fold.FoldedVariables(
      params=params,
      biases=biases,
      state=state,
      pairs=flax.core.FrozenDict(pairs),
    )
  else:
    variables = {"params": params, **state}
  return ExportedModel(model, manifest, variables, codes, scales, path=path)


def _dir_bytes(path: str) -> int:
  total = 0
  for root, _, files in os.walk(path):
    total += sum(os.path.getsize(os.path.join(root, f)) for f in files)
  return total


def checkpoint_bytes(workdir: str, step: int) -> int | None:
  """Size on disk of a run's checkpoint at ``step``, if its directory is found.

  Looks for a directory named ``str(step)`` (Orbax's layout) in the workdir
  or one level below.
  """
  for base in [workdir] + [
    os.path.join(workdir, d) for d in sorted(os.listdir(workdir))
  ]:
    candidate = os.path.join(base, str(step))
    if os.path.isdir(candidate):
      return _dir_bytes(candidate)
  return None


def export_run(
  workdir: str,
  pair: tuple[int, int],
  out_dir: str,
  settings: runs.Settings = runs.Settings(),
  *,
  prepared: runs.PreparedRun | None = None,
) -> tuple[ExportInfo, str]:
  """Exports a training run's checkpoint at one (W, A) pair.

  Uses the same preparation as the sweep (batch-norm folding unless
  ``settings.fold`` is False, the same activation ranges), records the
  dataset's input normalisation (so the loaded model takes raw images), and
  checks the export against the fake-quantized model on a test batch.

  Args:
    workdir: The run's directory.
    pair: (weight bits, activation bits).
    out_dir: Export directory.
    settings: Evaluation settings (ranges method, per-channel, fold, step).
    prepared: The run as the sweep prepared it (skips loading it again).

  Returns:
    ``(info, summary)``: sizes and a one-line summary for the console.

  Raises:
    errors.UserError: Bad bits, or a run that cannot be loaded or exported.
  """
  from l1grad import data  # pylint: disable=g-import-not-at-top

  w_bits, a_bits = pair
  bits_lib.check_bits(w_bits, "weight bits of --export")
  bits_lib.check_bits(a_bits, "activation bits of --export")
  prepared = prepared or runs.prepare_run(workdir, settings)
  config = prepared.config
  preprocessing = data.input_normalization(config.dataset)
  batch = next(
    iter(
      data.eval_batches(
        config.dataset,
        "test",
        global_batch_size=min(64, runs.eval_batch_size(config, settings)),
        data_dir=runs.data_dir(config),
        max_examples=64,
      )
    )
  )
  model = prepared.model
  info = export_model(
    out_dir,
    model_name=config.model,
    num_classes=int(model.num_classes),
    model_kwargs=models.config_kwargs(config),
    variables=prepared.eval_variables,
    ranges=prepared.ranges,
    w_bits=w_bits,
    a_bits=a_bits,
    per_channel=settings.per_channel,
    act_ranges=prepared.act_ranges,
    metadata={
      "workdir": os.path.abspath(workdir),
      "step": prepared.step,
      "method": runs.method_label(config),
      "config": runs.config_json(config),
    },
    float_bytes=_nbytes(prepared.variables),
    check_images=batch["image"],
    preprocessing=preprocessing,
  )
  if info.max_abs_diff is None or info.max_abs_diff > 1e-5:
    raise errors.UserError(
      f"The exported model in {out_dir} does not reproduce the fake-quantized logits"
      f" (max difference {info.max_abs_diff}): the model rebuilt from the manifest"
      " differs from the evaluated one (e.g. config.compute_dtype is not float32, or"
      " config.model_kwargs is not what get_model takes). Export a float32 run."
    )
  summary = (
    info.summary(checkpoint_bytes(workdir, prepared.step))
    + f" Load it with l1grad.export.load_exported({out_dir!r}); it takes raw"
    f" images ({preprocessing.raw})."
  )
  return info, summary

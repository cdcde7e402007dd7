"""Pretrained ImageNet weights: the bundled int8 TFLite file, the float Keras ``.h5`` files.

Only this package knows foreign layouts. Each port is a reader (file -> arrays) and a pure
function (arrays -> the Flax variable tree of :class:`~har_flax.models.MobileNetV2`, with Keras
layer names), every shape checked against the tree the model itself declares.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from har_flax.config import Config

ASSETS = Path(__file__).resolve().parent.parent / "assets" / "mobilenet_v2"
BUNDLED_TFLITE = ASSETS / "tf2_mobilenet_v2_1.0_224_ptq.tflite"
LABELS_FILE = ASSETS / "imagenet_labels.txt"
MODEL_NAME = "imagenet-mobilenet-v2"
KIND = "imagenet"

__all__ = [
    "BUNDLED_TFLITE",
    "WeightPortError",
    "check_pretrained_source",
    "check_tree",
    "expected_shapes",
    "imagenet_classes",
    "imagenet_labels",
    "imagenet_model_config",
    "load_pretrained_backbone",
    "write_imagenet_model",
]


class WeightPortError(ValueError):
    """A weight file cannot be ported: wrong format, missing, extra or misshapen tensors."""


# The labels file names two ImageNet classes "crane" (n02012849, the bird, and n03126707, the
# machine). Clients key answers by name, so each gets its own.
_RENAMED = {135: ("crane", "crane (bird)"), 518: ("crane", "crane (machine)")}


@functools.cache
def _labels() -> tuple[str, ...]:
    names = list(LABELS_FILE.read_text(encoding="utf-8").splitlines())
    if len(names) != 1001 or names[0] != "background":
        raise RuntimeError(f"{LABELS_FILE} is damaged: expected 1001 lines starting 'background'")
    for i, (old, new) in _RENAMED.items():
        if names[i] != old:
            raise RuntimeError(f"{LABELS_FILE} is damaged: line {i + 1} is not {old!r}")
        names[i] = new
    return tuple(names)


def imagenet_labels() -> list[str]:
    """The 1001 class names of the TFLite classifier; index 0 is "background", i is class i-1.

    As in the bundled labels file, except that its two "crane"s are told apart: every name is
    unique.
    """
    return list(_labels())


@functools.cache
def _expected_shapes(width: float, include_top: bool, num_classes: int) -> dict:
    import jax
    import jax.numpy as jnp

    from har_flax.models.mobilenet_v2 import MobileNetV2

    model = MobileNetV2(width=width, include_top=include_top, num_classes=num_classes)
    # Parameter shapes do not depend on the image size; a small one keeps the trace cheap.
    tree = jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False)
    )
    return jax.tree.map(lambda s: tuple(s.shape), tree)


def expected_shapes(
    width: float = 1.0, include_top: bool = False, num_classes: int = 1000
) -> dict[str, dict[str, dict[str, tuple[int, ...]]]]:
    """The variable tree MobileNetV2 declares, as shapes.

    Traced with ``jax.eval_shape``, so nothing is allocated or compiled.

    Returns:
      ``{"params" | "batch_stats": {layer: {name: shape}}}``.
    """
    return _expected_shapes(float(width), bool(include_top), int(num_classes))


def check_tree(tree: Mapping, expected: Mapping, what: str) -> None:
    """Raises WeightPortError unless ``tree`` has exactly ``expected``'s keys and shapes.

    Args:
      tree: nested dicts of arrays, e.g. ``{"params": {"Conv1": {"kernel": array}}, ...}``.
      expected: the same nesting with shape tuples at the leaves.
      what: the start of the message, e.g. "the Keras file does not fit MobileNetV2".
    """
    problems: list[str] = []

    def walk(t: Any, e: Any, path: str) -> None:
        if not isinstance(e, Mapping):
            shape = tuple(np.shape(t))
            if shape != tuple(e):
                problems.append(f"{path}: shape {shape}, expected {tuple(e)}")
            return
        if not isinstance(t, Mapping):
            problems.append(f"{path}: expected a group of {sorted(e)}, got an array")
            return
        for key in sorted(set(e) - set(t)):
            problems.append(f"{path}/{key}: missing")
        for key in sorted(set(t) - set(e)):
            problems.append(f"{path}/{key}: unexpected")
        # Parameters before statistics: the first problem shown is the telling one.
        for key in sorted(set(t) & set(e), key=lambda k: (k != "params", k)):
            walk(t[key], e[key], f"{path}/{key}" if path else key)

    walk(tree, expected, "")
    if problems:
        shown = "; ".join(problems[:6]) + (
            f"; ... ({len(problems)} differences in all)" if len(problems) > 6 else ""
        )
        raise WeightPortError(f"{what}: {shown}")


def _backbone_of(variables: Mapping, what: str) -> tuple[dict, dict]:
    """(params, batch_stats) of a MobileNetV2 tree, without the classifier."""
    params = dict(variables["params"])
    stats = dict(variables["batch_stats"])
    if "backbone" in params:  # A FrameClassifier tree from a model directory.
        params, stats = dict(params["backbone"]), dict(stats["backbone"])
    params.pop("predictions", None)
    if not params:
        raise WeightPortError(f"{what} holds no backbone weights")
    return params, stats


def _load_source(source: str | os.PathLike) -> tuple[dict, dict]:
    if str(source) == "tflite":
        from har_flax.weights.tflite import port_tflite

        return _backbone_of(port_tflite(), "the bundled TFLite file")
    path = Path(source)
    if path.is_dir():
        from har_flax.checkpoint import load_model

        _, labels, variables = load_model(path)
        if labels.get("kind") != KIND:
            raise WeightPortError(
                f"{path} is a {labels.get('kind')!r} model directory, not one written by "
                "har-port-weights (kind 'imagenet')"
            )
        return _backbone_of(variables, str(path))
    if path.suffix == ".tflite":
        from har_flax.weights.tflite import port_tflite

        return _backbone_of(port_tflite(path), str(path))
    if path.suffix in (".h5", ".hdf5"):
        from har_flax.weights.keras_h5 import port_keras_h5

        return _backbone_of(port_keras_h5(path), str(path))
    raise _unknown_source(source)


def _unknown_source(source: str | os.PathLike) -> WeightPortError:
    return WeightPortError(
        f"pretrained source {str(source)!r} is neither 'tflite', 'none', a model directory "
        "written by har-port-weights, a .tflite file nor a Keras .h5 file"
    )


def check_pretrained_source(source: str | os.PathLike, width: float) -> None:
    """Refuses at once, without loading anything, a source that could not load.

    Training loads the weights after it has prepared the data (minutes for a data set at a new
    image size): what this can tell from the name alone should not wait for that. A file of
    the right kind may still fail to load then.

    Raises:
      ValueError (WeightPortError): an unknown kind of source, a file or directory that does
        not exist, or the bundled weights (MobileNetV2 1.0) with another ``width``.
    """
    name = str(source)
    if name == "none":
        return
    if name == "tflite":
        if width != 1.0:
            raise WeightPortError(
                f"the bundled ImageNet weights (model.pretrained='tflite') fit MobileNetV2 width "
                f"1.0 only, not model.width={width}; set model.width=1.0 or "
                "model.pretrained='none'"
            )
        return
    path = Path(source)
    if not path.exists():
        raise WeightPortError(
            f"pretrained source {name!r} does not exist; model.pretrained takes 'tflite' (the "
            "bundled weights), 'none', a model directory written by har-port-weights, a "
            ".tflite file or a Keras .h5 file"
        )
    if not (path.is_dir() or path.suffix in (".tflite", ".h5", ".hdf5")):
        raise _unknown_source(source)


def load_pretrained_backbone(variables: Mapping, source: str | os.PathLike = "tflite") -> dict:
    """Puts ImageNet weights into the backbone of CNN-LSTM variables.

    Args:
      variables: ``{"params", "batch_stats"}`` of a CNN-LSTM (``har_flax.models.init_variables``)
        whose backbone has width 1.0.
      source: "tflite" (the bundled file), "none" (returns an unchanged copy), a model directory
        written by ``har-port-weights``, or a ``.tflite`` / Keras ``.h5`` file.

    Returns:
      A copy of ``variables`` whose ``params["backbone"]`` and ``batch_stats["backbone"]`` are the
      ported MobileNetV2 (without its classifier, as numpy arrays of the model's dtypes);
      everything else is shared, not copied.

    Raises:
      ValueError (WeightPortError): the backbone's shapes differ from the weights' (e.g. a width
        other than 1.0), or the source is unreadable.
    """
    out = {k: dict(v) if isinstance(v, Mapping) else v for k, v in variables.items()}
    if str(source) == "none":
        return out
    for collection in ("params", "batch_stats"):
        if "backbone" not in out.get(collection, {}):
            raise WeightPortError(f"variables have no {collection}['backbone'] to load into")
    params, stats = _load_source(source)
    target = {"params": out["params"]["backbone"], "batch_stats": out["batch_stats"]["backbone"]}
    expected = {k: {layer: {n: np.shape(a) for n, a in d.items()} for layer, d in v.items()}
                for k, v in target.items()}  # fmt: skip
    try:
        check_tree(
            {"params": params, "batch_stats": stats},
            expected,
            "shapes (ported vs the model's backbone) differ",
        )
    except WeightPortError as e:
        raise WeightPortError(
            f"pretrained weights from {source} do not fit: {e}. The ImageNet weights fit "
            "MobileNetV2 width 1.0 only; set model.width=1.0 or model.pretrained='none'"
        ) from None
    # Keep the model's parameter dtype (float32 unless configured otherwise).
    for collection, ported in (("params", params), ("batch_stats", stats)):
        out[collection]["backbone"] = {
            layer: {
                n: np.asarray(a, dtype=target[collection][layer][n].dtype) for n, a in d.items()
            }
            for layer, d in ported.items()
        }
    return out


def imagenet_model_config(num_classes: int = 1001) -> Config:
    """The :class:`~har_flax.config.Config` of the per-frame ImageNet classifier (224x224, T=1)."""
    from har_flax.config import Config, ModelConfig

    return Config(
        name=MODEL_NAME,
        model=ModelConfig(num_classes=num_classes, width=1.0, image_size=224, num_frames=1),
    )


def imagenet_classes(num_classes: int) -> list[str]:
    """Class names: 1001 with "background" (TFLite), 1000 without (Keras)."""
    if num_classes == 1001:
        return imagenet_labels()
    if num_classes == 1000:
        return imagenet_labels()[1:]
    raise WeightPortError(f"an ImageNet classifier has 1000 or 1001 classes, not {num_classes}")


def write_imagenet_model(
    out_dir: str | os.PathLike, variables: Mapping, num_classes: int, source: str
) -> Path:
    """Writes the ImageNet classifier as a model directory that the Predictor serves.

    Args:
      out_dir: the model directory (replaced atomically if it exists).
      variables: a MobileNetV2 tree with its classifier (what the ports return), or the
        FrameClassifier tree ``{"params": {"backbone": ...}, "batch_stats": {"backbone": ...}}``.
      num_classes: 1001 (TFLite, with "background") or 1000 (Keras).
      source: where the weights came from, stored in labels.json.

    Returns:
      The model directory.
    """
    from har_flax.checkpoint import save_model

    classes = imagenet_classes(num_classes)
    params, stats = variables["params"], variables["batch_stats"]
    if "backbone" not in params:
        params, stats = {"backbone": params}, {"backbone": stats}
    tree = {"params": params, "batch_stats": stats}
    # Exactly the tree FrameClassifier(num_classes).init declares: MobileNetV2 under "backbone".
    expected = expected_shapes(1.0, True, num_classes)
    check_tree(
        tree,
        {k: {"backbone": v} for k, v in expected.items()},
        f"the ImageNet model from {source} is not FrameClassifier's tree",
    )
    return save_model(
        out_dir,
        config=imagenet_model_config(num_classes),
        classes=classes,
        variables=_as_float32_numpy(tree),
        kind=KIND,
        metadata={"source": source, "name": MODEL_NAME},
    )


def _as_float32_numpy(tree: Any) -> Any:
    """Nested dicts with every leaf as a float32 numpy array."""
    if isinstance(tree, Mapping):
        return {k: _as_float32_numpy(v) for k, v in tree.items()}
    return np.asarray(tree, dtype=np.float32)

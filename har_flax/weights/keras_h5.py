"""Port of the float Keras MobileNetV2 ``.h5`` weights (Keras 2 or Keras 3 names) to Flax.

The file users with internet download is
``mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224[_no_top].h5``, written by Keras 2 in
the legacy HDF5 layout: one group per layer, whose ``weight_names`` attribute lists datasets
such as ``Conv1/kernel:0``. Keras 3 writes the same layout with ``Conv1/kernel``. The Flax model
uses the Keras layer names, so the port is a name-by-name copy: :func:`read_keras_h5` reads the
groups (h5py), :func:`port_keras_layers` maps and checks them (pure).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from har_flax.weights import WeightPortError, check_tree, expected_shapes

# Keras weight name (Keras 3 spelling, or Keras 2 without ":0") -> (collection, Flax name).
_CONV = {"kernel": ("params", "kernel")}
_DEPTHWISE = {"depthwise_kernel": ("params", "kernel"), "kernel": ("params", "kernel")}
_DENSE = {"kernel": ("params", "kernel"), "bias": ("params", "bias")}
_BN = {
    "gamma": ("params", "scale"),
    "beta": ("params", "bias"),
    "moving_mean": ("batch_stats", "mean"),
    "moving_variance": ("batch_stats", "var"),
}
HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


def _attribute_list(group, name: str) -> list[str]:
    """A string-list attribute; Keras splits long ones into ``name0``, ``name1``, ..."""
    if name in group.attrs:
        values = list(group.attrs[name])
    else:
        values, chunk = [], 0
        while f"{name}{chunk}" in group.attrs:
            values.extend(group.attrs[f"{name}{chunk}"])
            chunk += 1
    return [v.decode("utf8") if isinstance(v, bytes) else str(v) for v in values]


def read_keras_h5(path: str | os.PathLike) -> dict[str, dict[str, np.ndarray]]:
    """Reads a Keras legacy-HDF5 weights file.

    Args:
      path: a ``.h5`` file written by ``model.save_weights`` (Keras 2) or
        ``legacy_h5_format.save_weights_to_hdf5_group`` (Keras 3); a full-model ``.h5`` (with
        a ``model_weights`` group) also works.

    Returns:
      ``{layer name: {weight name as stored (e.g. "Conv1/kernel:0"): array}}`` in file order,
      for every layer that has weights.

    Raises:
      WeightPortError: the file is missing or not a Keras HDF5 weights file.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightPortError(f"Keras weights file {path} does not exist")
    with path.open("rb") as f:
        if f.read(8) != HDF5_SIGNATURE:
            raise WeightPortError(
                f"{path} is not an HDF5 file; expected Keras' legacy .h5 weights (e.g. "
                "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5)"
            )
    import h5py

    layers: dict[str, dict[str, np.ndarray]] = {}
    with h5py.File(path, "r") as f:
        root = f["model_weights"] if "model_weights" in f else f
        names = _attribute_list(root, "layer_names")
        if not names and ("layers" in f or "vars" in f):
            raise WeightPortError(
                f"{path} is in Keras 3's native .weights.h5 format, which this port does not "
                "read; use the official legacy .h5 file, or save the weights with Keras' legacy "
                "writer (keras.src.legacy.saving.legacy_h5_format.save_weights_to_hdf5_group)"
            )
        if not names:
            raise WeightPortError(
                f"{path} is an HDF5 file without Keras 'layer_names': not a Keras weights file"
            )
        # Keras 3 stores model-level variables here; MobileNetV2 has none.
        extra = (
            _attribute_list(root["top_level_model_weights"], "weight_names")
            if "top_level_model_weights" in root
            else []
        )
        if extra:
            raise WeightPortError(f"{path}: unexpected top-level weights {extra}")
        for name in names:
            if name not in root:
                raise WeightPortError(f"{path}: layer {name!r} is listed but has no group")
            group = root[name]
            weight_names = _attribute_list(group, "weight_names")
            if weight_names:
                layers[name] = {w: np.asarray(group[w]) for w in weight_names}
    return layers


def _short_name(weight_name: str) -> str:
    """The weight's own name: Keras 2 "block_1_expand/kernel:0" and Keras 3 ".../kernel" alike."""
    short = weight_name.rsplit("/", 1)[-1]
    return short[:-2] if short.endswith(":0") else short


def port_keras_layers(layers: Mapping[str, Mapping[str, np.ndarray]]) -> dict:
    """Maps Keras MobileNetV2 layers to Flax variables. Pure; every name and shape checked.

    Args:
      layers: :func:`read_keras_h5`'s output: ``{layer: {weight name: array}}``. Keras kernels
        are already HWIO; depthwise kernels (3, 3, C, 1) become (3, 3, 1, C).

    Returns:
      ``{"params", "batch_stats"}`` for ``MobileNetV2(width=1.0, include_top=<"predictions" in
      layers>, num_classes=<its output size>)``; float32 numpy arrays.

    Raises:
      WeightPortError: naming every unknown, left-over or missing layer or weight, and every
        wrong shape.
    """
    top = layers.get("predictions")
    num_classes = 1000
    if top is not None:
        kernels = [a for w, a in top.items() if _short_name(w) == "kernel"]
        if len(kernels) == 1 and np.ndim(kernels[0]) == 2:
            num_classes = int(np.shape(kernels[0])[1])
    expected = expected_shapes(1.0, top is not None, num_classes)
    known = set(expected["params"])
    unknown = [name for name in layers if name not in known]
    if unknown:
        raise WeightPortError(f"Keras layers that are not in MobileNetV2: {', '.join(unknown)}")
    missing = [name for name in expected["params"] if name not in layers]
    if missing:
        raise WeightPortError(
            f"MobileNetV2 layers missing from the Keras file: {', '.join(missing)}"
        )

    variables: dict[str, dict[str, dict[str, np.ndarray]]] = {"params": {}, "batch_stats": {}}
    for layer, weights in layers.items():
        table = _weight_table(layer)
        seen: dict[str, str] = {}  # Flax name -> the Keras weight it came from
        for weight_name, array in weights.items():
            short = _short_name(weight_name)
            if short not in table:
                raise WeightPortError(f"Keras layer {layer!r}: unknown weight {weight_name!r}")
            collection, flax_name = table[short]
            if flax_name in seen:
                raise WeightPortError(
                    f"Keras layer {layer!r}: {weight_name!r} and {seen[flax_name]!r} are the "
                    "same weight"
                )
            seen[flax_name] = weight_name
            array = np.asarray(array, np.float32)
            if layer.endswith("depthwise") and array.ndim == 4:
                array = array.transpose(0, 1, 3, 2)  # (3, 3, C, 1) -> (3, 3, 1, C)
            variables[collection].setdefault(layer, {})[flax_name] = array
        absent = sorted({keras for keras, (_, flax) in table.items() if flax not in seen})
        if layer.endswith("depthwise"):  # Either spelling of the one kernel will do.
            absent = [] if "kernel" in seen else ["depthwise_kernel"]
        if absent:
            raise WeightPortError(f"Keras layer {layer!r} lacks weights: {', '.join(absent)}")
    check_tree(variables, expected, "the Keras file does not fit MobileNetV2")
    return variables


def _weight_table(layer: str) -> dict[str, tuple[str, str]]:
    """The Keras weights a MobileNetV2 layer of this name holds, by its name's pattern."""
    if layer == "predictions":
        return _DENSE
    if layer == "bn_Conv1" or layer.endswith(("_BN", "_bn")):
        return _BN
    if layer.endswith("depthwise"):
        return _DEPTHWISE
    return _CONV


def port_keras_h5(path: str | os.PathLike) -> dict:
    """Variables of MobileNetV2 (width 1.0) from a Keras ``.h5`` weights file.

    Args:
      path: e.g. ``mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5``.

    Returns:
      ``{"params", "batch_stats"}`` for ``MobileNetV2(include_top=<file has "predictions">,
      num_classes=1000)``.
    """
    return port_keras_layers(read_keras_h5(path))

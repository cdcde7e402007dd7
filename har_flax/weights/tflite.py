"""Port of the bundled int8 TFLite MobileNetV2 (BatchNorm folded) to the Flax variable tree.

:func:`read_tflite` parses the flatbuffer with the pure-Python ``tflite`` package and
dequantizes every constant tensor; :func:`port_ops` walks the operators in graph order (the
tensor names are long fused strings, so order is the only reliable key) and fills MobileNetV2's
Keras-named layers. See ``har_flax/assets/mobilenet_v2/SOURCE.md`` for the file's facts.
"""

from __future__ import annotations

import dataclasses
import os
import struct
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from har_flax.models.mobilenet_v2 import BN_EPSILON, block_channels, block_prefix
from har_flax.weights import BUNDLED_TFLITE, WeightPortError, check_tree, expected_shapes

NUM_CLASSES = 1001  # ImageNet's 1000 and "background" at index 0.

# Operators that carry no weights; anything else the walk does not know is an error.
_WEIGHTLESS = frozenset({"QUANTIZE", "DEQUANTIZE", "ADD", "MEAN", "RESHAPE", "SOFTMAX"})
_WEIGHTED = frozenset({"CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED"})


@dataclasses.dataclass(frozen=True)
class TFLiteOp:
    """One operator of the graph, in graph order, with its constant inputs dequantized.

    Attributes:
      index: position in the subgraph's operator list.
      op: the builtin operator name ("CONV_2D", "DEPTHWISE_CONV_2D", "ADD", ...).
      weights: the constant inputs, float32 for quantized weights and biases, in TFLite layout
        (conv OHWI, depthwise 1HWC); integer constants (axes, shapes) as stored.
      stride: (h, w) for convolutions, else None.
      padding: "SAME" / "VALID" for convolutions, else None.
      activation: the fused activation ("NONE", "RELU6", ...), else None.
      output_shape: the shape of the first output.
      outputs: the output tensor indices (the interpreter's tensor indices too).
    """

    index: int
    op: str
    weights: tuple[np.ndarray, ...]
    stride: tuple[int, int] | None = None
    padding: str | None = None
    activation: str | None = None
    output_shape: tuple[int, ...] = ()
    outputs: tuple[int, ...] = ()


def _enum_names(enum_cls) -> dict[int, str]:
    return {v: k for k, v in vars(enum_cls).items() if not k.startswith("_")}


def _dequantize(tensor, data: np.ndarray, where: str) -> np.ndarray:
    """``scale[c] * (q - zero_point[c])`` along the tensor's quantized dimension."""
    q = tensor.Quantization()
    scale = q.ScaleAsNumpy() if q is not None and q.ScaleLength() else None
    if scale is None:  # Float weights, or integer structure (axes, shapes) kept as stored.
        return data.astype(np.float32) if data.dtype.kind == "f" else data
    zero = q.ZeroPointAsNumpy() if q.ZeroPointLength() else np.zeros_like(scale, np.int64)
    shape = [1] * data.ndim
    if scale.size > 1:
        axis = q.QuantizedDimension()
        if data.ndim == 0 or data.shape[axis] != scale.size:
            raise WeightPortError(
                f"{where}: {scale.size} quantization scales for axis {axis} of shape {data.shape}"
            )
        shape[axis] = scale.size
    scale = np.asarray(scale, np.float64).reshape(shape)
    zero = np.asarray(zero, np.float64).reshape(shape)
    return (scale * (data.astype(np.float64) - zero)).astype(np.float32)


def read_tflite(path: str | os.PathLike = BUNDLED_TFLITE) -> list[TFLiteOp]:
    """Reads a single-subgraph TFLite model into its operators, in graph order.

    Args:
      path: a ``.tflite`` flatbuffer.

    Returns:
      One :class:`TFLiteOp` per operator, constant tensors dequantized to float32.

    Raises:
      WeightPortError: the file is missing or is not a TFLite model this reader understands.
    """
    import tflite

    path = Path(path)
    if not path.is_file():
        raise WeightPortError(f"TFLite file {path} does not exist")
    buf = path.read_bytes()
    if len(buf) < 8 or buf[4:8] != b"TFL3":
        raise WeightPortError(f"{path} is not a TFLite model (no 'TFL3' flatbuffer identifier)")
    try:
        return _read_ops(tflite, path, buf)
    except WeightPortError:
        raise
    except (struct.error, IndexError, ValueError, TypeError, AttributeError) as e:
        # The flatbuffer reader trusts its offsets: a truncated or corrupted file fails inside.
        raise WeightPortError(
            f"{path} is a damaged TFLite file ({type(e).__name__}: {e}); download it again"
        ) from e


def _read_ops(tflite, path: Path, buf: bytes) -> list[TFLiteOp]:
    """:func:`read_tflite`'s parsing of a buffer that carries the TFLite identifier."""
    model = tflite.Model.GetRootAs(buf, 0)
    if model.SubgraphsLength() != 1:
        raise WeightPortError(f"{path}: expected one subgraph, found {model.SubgraphsLength()}")
    graph = model.Subgraphs(0)
    op_names = _enum_names(tflite.BuiltinOperator)
    type_names = _enum_names(tflite.TensorType)
    act_names = _enum_names(tflite.ActivationFunctionType)
    pad_names = _enum_names(tflite.Padding)
    dtypes = {"INT8": np.int8, "UINT8": np.uint8, "INT32": np.int32, "INT64": np.int64,
              "FLOAT32": np.float32, "FLOAT16": np.float16}  # fmt: skip

    def constant(tensor_index: int, where: str) -> np.ndarray | None:
        tensor = graph.Tensors(tensor_index)
        buffer = model.Buffers(tensor.Buffer())
        if buffer.DataLength():
            raw = buffer.DataAsNumpy().tobytes()
        elif buffer.Offset() > 1:  # Large models keep buffers after the flatbuffer.
            raw = buf[buffer.Offset() : buffer.Offset() + buffer.Size()]
        else:
            return None  # An activation, not a constant.
        type_name = type_names.get(tensor.Type(), str(tensor.Type()))
        if type_name not in dtypes:
            raise WeightPortError(f"{where}: unsupported tensor type {type_name}")
        shape = tuple(int(d) for d in tensor.ShapeAsNumpy()) if tensor.ShapeLength() else ()
        data = np.frombuffer(raw, dtypes[type_name]).reshape(shape)
        return _dequantize(tensor, data, where)

    ops = []
    for i in range(graph.OperatorsLength()):
        operator = graph.Operators(i)
        code = model.OperatorCodes(operator.OpcodeIndex())
        # Old files keep the code in the deprecated byte field; new ones in the int32 one.
        name = op_names.get(max(code.BuiltinCode(), code.DeprecatedBuiltinCode()), "CUSTOM")
        where = f"{path.name} operator #{i} ({name})"
        weights = []
        for t in operator.InputsAsNumpy():
            if t >= 0 and (array := constant(int(t), where)) is not None:
                weights.append(array)
        stride = padding = activation = None
        if name in ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED"):
            opts_cls = {
                "CONV_2D": tflite.Conv2DOptions,
                "DEPTHWISE_CONV_2D": tflite.DepthwiseConv2DOptions,
                "FULLY_CONNECTED": tflite.FullyConnectedOptions,
            }[name]
            table = operator.BuiltinOptions()
            opts = opts_cls()
            opts.Init(table.Bytes, table.Pos)
            activation = act_names.get(opts.FusedActivationFunction(), "UNKNOWN")
            if name != "FULLY_CONNECTED":
                stride = (opts.StrideH(), opts.StrideW())
                padding = pad_names.get(opts.Padding(), "UNKNOWN")
                if (opts.DilationHFactor(), opts.DilationWFactor()) not in ((1, 1), (0, 0)):
                    raise WeightPortError(f"{where}: dilated convolutions are not MobileNetV2")
                if name == "DEPTHWISE_CONV_2D" and opts.DepthMultiplier() not in (0, 1):
                    raise WeightPortError(f"{where}: depth multiplier {opts.DepthMultiplier()}")
        out_shape = tuple(int(d) for d in graph.Tensors(operator.Outputs(0)).ShapeAsNumpy())
        outputs = tuple(int(t) for t in operator.OutputsAsNumpy())
        ops.append(
            TFLiteOp(i, name, tuple(weights), stride, padding, activation, out_shape, outputs)
        )
    return ops


@dataclasses.dataclass(frozen=True)
class _Layer:
    """A weighted layer MobileNetV2 expects next in graph order."""

    conv: str  # Keras name of the convolution (or "predictions").
    bn: str | None  # Keras name of its BatchNorm, folded into the TFLite conv.
    op: str  # "CONV_2D", "DEPTHWISE_CONV_2D" or "dense".
    stride: int
    activation: str  # The fused activation the Keras graph implies.


def _expected_layers(width: float = 1.0) -> list[_Layer]:
    layers = [_Layer("Conv1", "bn_Conv1", "CONV_2D", 2, "RELU6")]
    for block_id, (_, _, _, stride) in enumerate(block_channels(width)):
        p = block_prefix(block_id)
        if block_id:
            layers.append(_Layer(f"{p}expand", f"{p}expand_BN", "CONV_2D", 1, "RELU6"))
        layers.append(
            _Layer(f"{p}depthwise", f"{p}depthwise_BN", "DEPTHWISE_CONV_2D", stride, "RELU6")
        )
        layers.append(_Layer(f"{p}project", f"{p}project_BN", "CONV_2D", 1, "NONE"))
    layers.append(_Layer("Conv_1", "Conv_1_bn", "CONV_2D", 1, "RELU6"))
    layers.append(_Layer("predictions", None, "dense", 1, "NONE"))
    return layers


def _num_residual_adds(width: float = 1.0) -> int:
    return sum(s == 1 and c_in == c_out for c_in, _, c_out, s in block_channels(width))


def port_ops(ops: Sequence[TFLiteOp]) -> dict:
    """Maps TFLite operators (graph order) to MobileNetV2 variables. Pure; every shape checked.

    The BatchNorm folded into each convolution is represented exactly by a BatchNorm with
    scale 1, bias = the folded bias, mean 0 and variance 1 - eps (so ``x / sqrt(var + eps)``
    is ``x``).

    Args:
      ops: :func:`read_tflite`'s output.

    Returns:
      ``{"params", "batch_stats"}`` for ``MobileNetV2(width=1.0, include_top=True,
      num_classes=1001)``; float32 numpy arrays. Kernels: conv HWIO, depthwise (3, 3, 1, C),
      Dense (1280, 1001).

    Raises:
      WeightPortError: naming the operator that does not fit (unknown operator, wrong kind,
        stride, activation or shape, a missing layer, or an operator left over at the end).
    """
    expected = expected_shapes(1.0, True, NUM_CLASSES)
    params: dict[str, dict[str, np.ndarray]] = {}
    stats: dict[str, dict[str, np.ndarray]] = {}
    todo = iter(_expected_layers())
    adds = 0
    for op in ops:
        where = f"TFLite operator #{op.index} ({op.op})"
        if op.op in _WEIGHTLESS:
            adds += op.op == "ADD"
            if op.op in ("QUANTIZE", "DEQUANTIZE", "ADD", "SOFTMAX") and op.weights:
                raise WeightPortError(f"{where} has {len(op.weights)} unexpected constant inputs")
            continue
        if op.op not in _WEIGHTED:
            raise WeightPortError(f"{where} is not part of MobileNetV2")
        layer = next(todo, None)
        if layer is None:
            raise WeightPortError(f"{where} is left over after the classifier 'predictions'")
        where += f" -> {layer.conv}"
        if len(op.weights) != 2:
            raise WeightPortError(f"{where}: expected a kernel and a bias, got {len(op.weights)}")
        kernel, bias = op.weights
        if kernel.dtype.kind != "f" or bias.dtype.kind != "f":
            raise WeightPortError(f"{where}: integer weights without quantization parameters")
        if layer.op == "dense":
            if op.op == "CONV_2D" and kernel.ndim == 4 and kernel.shape[1:3] == (1, 1):
                kernel = kernel[:, 0, 0, :]  # (K, D): a 1x1 convolution on the pooled features
            elif op.op != "FULLY_CONNECTED":
                raise WeightPortError(
                    f"{where}: a {op.op} with kernel {kernel.shape} as classifier"
                )
            kernel = kernel.T  # (D, K)
        else:
            if op.op != layer.op:
                raise WeightPortError(f"{where}: expected {layer.op}")
            if op.stride != (layer.stride, layer.stride):
                raise WeightPortError(f"{where}: stride {op.stride}, expected {layer.stride}")
            if kernel.ndim != 4:
                raise WeightPortError(f"{where}: kernel of shape {kernel.shape}")
            if kernel.shape[1] > 1 and op.padding != "SAME":
                # Keras' explicit stride-2 padding equals SAME on even sizes (224 -> 112 ...).
                raise WeightPortError(f"{where}: padding {op.padding}, expected SAME")
            # OHWI -> HWIO; depthwise 1HWC -> HW1C.
            kernel = (
                kernel.transpose(1, 2, 3, 0) if op.op == "CONV_2D" else kernel.transpose(1, 2, 0, 3)
            )
        if op.activation != layer.activation:
            raise WeightPortError(
                f"{where}: activation {op.activation}, expected {layer.activation}"
            )
        want = expected["params"][layer.conv]["kernel"]
        if kernel.shape != want:
            raise WeightPortError(f"{where}: kernel {kernel.shape} (Flax layout), expected {want}")
        channels = want[-1]
        if bias.shape != (channels,):
            raise WeightPortError(f"{where}: bias {bias.shape}, expected {(channels,)}")
        kernel, bias = kernel.astype(np.float32), bias.astype(np.float32)
        if layer.bn is None:
            params[layer.conv] = {"kernel": kernel, "bias": bias}
        else:
            params[layer.conv] = {"kernel": kernel}
            params[layer.bn] = {"scale": np.ones(channels, np.float32), "bias": bias}
            stats[layer.bn] = {
                "mean": np.zeros(channels, np.float32),
                "var": np.full(channels, 1.0 - BN_EPSILON, np.float32),
            }
    missing = [layer.conv for layer in todo]
    if missing:
        raise WeightPortError(
            f"the TFLite graph ends before {len(missing)} MobileNetV2 layers: "
            f"{', '.join(missing[:5])}"
        )
    if adds != _num_residual_adds():
        raise WeightPortError(f"the TFLite graph has {adds} ADD operators, MobileNetV2 has "
                              f"{_num_residual_adds()} residual connections")  # fmt: skip
    variables = {"params": params, "batch_stats": stats}
    check_tree(variables, expected, "the TFLite port does not fit MobileNetV2")
    return variables


def port_tflite(path: str | os.PathLike = BUNDLED_TFLITE) -> dict:
    """Variables of ``MobileNetV2(width=1.0, include_top=True, num_classes=1001)`` from TFLite.

    Args:
      path: the TFLite model; the bundled int8 file by default.

    Returns:
      ``{"params", "batch_stats"}``, float32 numpy arrays (see :func:`port_ops`).
    """
    return port_ops(read_tflite(path))

"""A small ONNX graph builder for the model zoo: Conv + BatchNormalization (+ ReLU6 as Clip with
inputs) blocks, residual Adds and the pooling/classifier head, with deterministic random weights."""
from __future__ import annotations

from typing import List, Optional

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 13


def make_divisible(v: float, divisor: int = 8, min_value: Optional[int] = None) -> int:
    """The channel rounding of MobileNetV2 / ProxylessNAS / MCUNet: nearest multiple of `divisor`,
    never more than 10 % below `v`."""
    if min_value is None:
        min_value = divisor
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


class OnnxBuilder:
    def __init__(self, name: str, channels: int, resolution: int, seed: int) -> None:
        self.name = name
        self.rng = np.random.default_rng(seed)
        self.nodes: List[onnx.NodeProto] = []
        self.inits: List[onnx.TensorProto] = []
        self.counter = 0
        self.input = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", channels, resolution, resolution])
        self._const("relu6_min", np.array(0.0, np.float32))
        self._const("relu6_max", np.array(6.0, np.float32))

    def _fresh(self, prefix: str) -> str:
        self.counter += 1
        return f"{prefix}_{self.counter}"

    def _const(self, name: str, value: np.ndarray) -> str:
        self.inits.append(numpy_helper.from_array(value, name))
        return name

    def conv_bn(self, x: str, cin: int, cout: int, k: int, stride: int = 1, groups: int = 1,
                act: Optional[str] = "relu6") -> str:
        """Conv (no bias) -> BatchNormalization -> activation, He-initialized."""
        base = self._fresh("conv")
        fan_in = (cin // groups) * k * k
        w = self.rng.normal(0.0, np.sqrt(2.0 / fan_in), (cout, cin // groups, k, k)).astype(np.float32)
        self._const(base + ".weight", w)
        y = base + ".out"
        pad = k // 2
        self.nodes.append(helper.make_node(
            "Conv", [x, base + ".weight"], [y], name=base, kernel_shape=[k, k], strides=[stride, stride],
            pads=[pad, pad, pad, pad], group=groups))
        bn = base + ".bn"
        self._const(bn + ".scale", self.rng.uniform(0.5, 1.5, cout).astype(np.float32))
        self._const(bn + ".bias", self.rng.normal(0.0, 0.1, cout).astype(np.float32))
        self._const(bn + ".mean", self.rng.normal(0.0, 0.1, cout).astype(np.float32))
        self._const(bn + ".var", self.rng.uniform(0.5, 1.5, cout).astype(np.float32))
        z = bn + ".out"
        self.nodes.append(helper.make_node(
            "BatchNormalization", [y, bn + ".scale", bn + ".bias", bn + ".mean", bn + ".var"], [z],
            name=bn, epsilon=1e-5))
        if act is None:
            return z
        out = base + ".act"
        if act == "relu6":
            self.nodes.append(helper.make_node("Clip", [z, "relu6_min", "relu6_max"], [out], name=base + ".relu6"))
        else:
            self.nodes.append(helper.make_node("Relu", [z], [out], name=base + ".relu"))
        return out

    def mb_block(self, x: str, cin: int, cout: int, k: int, stride: int, mid: int, residual: bool) -> str:
        """MobileNetV2 / ProxylessNAS inverted residual: [1x1 expand] -> kxk depthwise -> 1x1 linear."""
        h = x
        if mid != cin:
            h = self.conv_bn(h, cin, mid, 1)
        h = self.conv_bn(h, mid, mid, k, stride, groups=mid)
        h = self.conv_bn(h, mid, cout, 1, act=None)
        if residual:
            out = self._fresh("add")
            self.nodes.append(helper.make_node("Add", [h, x], [out], name=out))
            return out
        return h

    def classifier(self, x: str, cin: int, num_classes: int) -> onnx.ModelProto:
        pooled = self._fresh("gap")
        self.nodes.append(helper.make_node("GlobalAveragePool", [x], [pooled], name=pooled))
        flat = self._fresh("flatten")
        self.nodes.append(helper.make_node("Flatten", [pooled], [flat], name=flat, axis=1))
        w = self.rng.normal(0.0, np.sqrt(1.0 / cin), (num_classes, cin)).astype(np.float32)
        self._const("classifier.weight", w)
        self._const("classifier.bias", np.zeros(num_classes, np.float32))
        self.nodes.append(helper.make_node(
            "Gemm", [flat, "classifier.weight", "classifier.bias"], ["logits"], name="classifier", transB=1))
        out = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", num_classes])
        graph = helper.make_graph(self.nodes, self.name, [self.input], [out], self.inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                                  producer_name="tinytrain.models")
        model.ir_version = 8
        onnx.checker.check_model(model)
        return model

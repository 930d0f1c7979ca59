#!/usr/bin/env python3
"""Train the demo model shipped in the package: python/tinytrain/models/demo_digits.onnx.

A small MobileNet-style CNN (stem conv, depthwise/pointwise, an inverted-residual block with a
residual Add, global average pool, fully connected, trailing Softmax) on scikit-learn digits
upscaled to 1x32x32, pretrained with tinytrain's float numpy reference on the *source* part of the
transfer task (digits 0-4; see tinytrain/datasets.py). Deterministic; about a minute on one core.

    python scripts/train_demo_model.py [--out PATH] [--epochs N]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))

import tinytrain as tt  # noqa: E402
from tinytrain import reference  # noqa: E402
from tinytrain.datasets import digits  # noqa: E402

# (name, in, out, kernel, stride, groups, act); "add" rows add the named tensors
ARCH = [
    ("stem", 1, 16, 3, 2, 1, "relu6"),     # 32 -> 16
    ("dw1", 16, 16, 3, 1, 16, "relu6"),
    ("pw1", 16, 24, 1, 1, 1, "relu6"),
    ("dw2", 24, 24, 3, 2, 24, "relu6"),    # 16 -> 8
    ("pw2", 24, 32, 1, 1, 1, None),
    ("exp3", 32, 96, 1, 1, 1, "relu6"),
    ("dw3", 96, 96, 3, 1, 96, "relu6"),
    ("pw3", 96, 32, 1, 1, 1, None),
    ("add3", "pw2", "pw3"),
    ("dw4", 32, 32, 3, 2, 32, "relu6"),    # 8 -> 4
    ("pw4", 32, 128, 1, 1, 1, "relu6"),
]


def build(seed: int = 0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    inits.append(numpy_helper.from_array(np.array(0.0, np.float32), "relu6.min"))
    inits.append(numpy_helper.from_array(np.array(6.0, np.float32), "relu6.max"))
    x = "input"
    out_of = {}
    for row in ARCH:
        if row[0].startswith("add"):
            name, a, b = row
            nodes.append(helper.make_node("Add", [out_of[a], out_of[b]], [name], name=name))
            x = out_of[name] = name
            continue
        name, cin, cout, k, s, g, act = row
        w = rng.normal(0, np.sqrt(2.0 / (cin // g * k * k)), (cout, cin // g, k, k)).astype(np.float32)
        inits += [numpy_helper.from_array(w, f"{name}.weight"),
                  numpy_helper.from_array(np.zeros(cout, np.float32), f"{name}.bias")]
        y = f"{name}.conv"
        nodes.append(helper.make_node("Conv", [x, f"{name}.weight", f"{name}.bias"], [y], name=name,
                                      kernel_shape=[k, k], strides=[s, s], pads=[k // 2] * 4, group=g))
        if act:
            nodes.append(helper.make_node("Clip", [y, "relu6.min", "relu6.max"], [f"{name}.relu6"], name=f"{name}.relu6"))
            y = f"{name}.relu6"
        x = out_of[name] = y
    nodes.append(helper.make_node("GlobalAveragePool", [x], ["gap"], name="gap"))
    nodes.append(helper.make_node("Flatten", ["gap"], ["features"], name="flatten"))
    inits += [numpy_helper.from_array(rng.normal(0, np.sqrt(1 / 128), (10, 128)).astype(np.float32), "fc.weight"),
              numpy_helper.from_array(np.zeros(10, np.float32), "fc.bias")]
    nodes.append(helper.make_node("Gemm", ["features", "fc.weight", "fc.bias"], ["logits"], name="fc", transB=1))
    nodes.append(helper.make_node("Softmax", ["logits"], ["probabilities"], name="softmax", axis=1))
    graph = helper.make_graph(nodes, "tinytrain_demo_digits",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 1, 32, 32])],
                              [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", 10])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], producer_name="tinytrain")
    model.ir_version = 8
    model.doc_string = ("tinytrain demo: digits 0-4 (source part of tt.datasets.digits), 1x32x32 input in [0, 1], "
                        "10 outputs; trained by scripts/train_demo_model.py")
    return model


def write_back(model: onnx.ModelProto, g: tt.Graph) -> None:
    """Copy the trained IR parameters into the ONNX initializers (no BN, no column permutation:
    the fc reads the 1x1 pooled features)."""
    inits = {i.name: i for i in model.graph.initializer}
    onnx_nodes = {n.name: n for n in model.graph.node}
    for n in g.nodes:
        if not n.trainable:
            continue
        on = onnx_nodes[n.attrs["onnx_node"]]
        for key, idx in (("weight", 1), ("bias", 2)):
            inits[on.input[idx]].CopyFrom(numpy_helper.from_array(n.params[key].astype(np.float32), on.input[idx]))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=tt.models.DEMO_PATH)
    ap.add_argument("--epochs", type=int, default=30)
    args = ap.parse_args()
    x, y = digits("source", "train")
    xt, yt = digits("source", "test")
    model = build()
    g = tt.load_onnx(model)
    t0 = time.time()

    def log(ep, loss):
        if ep % 5 == 4 or ep == args.epochs - 1:
            acc = (reference.forward(g, xt).argmax(1) == yt).mean()
            print(f"epoch {ep + 1:3d}  loss {loss:.4f}  source test acc {acc:.4f}  ({time.time() - t0:.0f}s)")

    reference.train(g, x, y, epochs=args.epochs, lr=0.05, batch=32, momentum=0.9, weight_decay=1e-4, log=log)
    write_back(model, g)
    onnx.checker.check_model(model)
    tmp = args.out + ".tmp"
    onnx.save(model, tmp)
    os.replace(tmp, args.out)
    print(f"wrote {args.out} ({os.path.getsize(args.out)} bytes), float source test accuracy "
          f"{(reference.forward(g, xt).argmax(1) == yt).mean():.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

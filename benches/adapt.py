"""A new user's scenario, end to end with no learning rate given anywhere: a small float CNN of
their own, pretrained on upright scikit-learn digits, exported to ONNX, quantized by tinytrain,
then adapted on the "device" (int8 training through the compiled plan) to the same digits rotated
90 degrees. The int8 run is compared with float SGD of the same network at its best rate (numpy,
`tt.reference`), the rate float SGD needed a sweep to find.

    python benches/adapt.py [--epochs 4] [--json]

prints one table: the rate `lr="auto"` chose, int8 accuracy after adapting, float SGD's best rate
and accuracy, and the seconds the range test added. The tests (tests/test_lr.py) run the same
functions.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from typing import Dict, Tuple

import numpy as np

#: The CNN's trainable layers as named in its ONNX file, input to output.
LAYERS = ("conv1", "conv2", "conv3", "fc")
#: Height (= width) of the activation the classifier flattens: 8 -> 4 -> 2 by the strided convs.
FLAT_HW = 2
#: Float SGD rates swept for the comparison (the user's own tuning, done for them here).
FLOAT_RATES = (0.003, 0.01, 0.03, 0.1, 0.3)


def digits(rotated: bool, split: str) -> Tuple[np.ndarray, np.ndarray]:
    """scikit-learn digits as (N, 1, 8, 8) float32 in [0, 1]; ``rotated``: turned 90 degrees."""
    import tinytrain as tt

    x, y = tt.datasets.digits("all", split, size=8)
    if rotated:
        x = np.ascontiguousarray(np.rot90(x, k=1, axes=(2, 3)))
    return x.astype(np.float32), y


def cnn_onnx(seed: int = 0):
    """conv3x3(1->16) relu, conv3x3 s2 (16->32) relu, conv3x3 s2 (32->32) relu, flatten, fc(128->10):
    He-initialized, as a user would start in any framework."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    inits, nodes = [], []

    def param(name: str, shape, fan_in: int) -> str:
        inits.append(numpy_helper.from_array(rng.normal(0, np.sqrt(2.0 / fan_in), shape).astype(np.float32), name))
        return name

    def conv(x: str, name: str, cin: int, cout: int, stride: int) -> str:
        w = param(f"{name}.weight", (cout, cin, 3, 3), cin * 9)
        inits.append(numpy_helper.from_array(np.zeros(cout, np.float32), f"{name}.bias"))
        nodes.append(helper.make_node("Conv", [x, w, f"{name}.bias"], [f"{name}.out"], name=name,
                                      kernel_shape=[3, 3], strides=[stride, stride], pads=[1, 1, 1, 1]))
        nodes.append(helper.make_node("Relu", [f"{name}.out"], [f"{name}.act"], name=f"{name}.relu"))
        return f"{name}.act"

    x = conv("input", "conv1", 1, 16, 1)
    x = conv(x, "conv2", 16, 32, 2)
    x = conv(x, "conv3", 32, 32, 2)
    nodes.append(helper.make_node("Flatten", [x], ["flat"], name="flatten", axis=1))
    w = param("fc.weight", (10, 128), 128)
    inits.append(numpy_helper.from_array(np.zeros(10, np.float32), "fc.bias"))
    nodes.append(helper.make_node("Gemm", ["flat", w, "fc.bias"], ["logits"], name="fc", transB=1))
    graph = helper.make_graph(nodes, "digits_cnn", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 1, 8, 8])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def float_graph(model):
    import tinytrain as tt

    return tt.load_onnx(model.SerializeToString())


def accuracy(g, x, y) -> float:
    from tinytrain import reference

    return float((reference.forward(g, x).argmax(axis=1) == y).mean())


def with_params(model, g):
    """The ONNX model with the float graph's trained parameters written into its initializers."""
    import onnx
    from onnx import numpy_helper

    out = onnx.ModelProto()
    out.CopyFrom(model)
    trained = {}
    # the importer names layers by kind and position (conv_0, ..., fc_0): same order as the file's
    for onnx_name, n in zip(LAYERS, (n for n in g.nodes if n.trainable)):
        w = np.asarray(n.params["weight"])
        if n.op == "fc":  # tinytrain flattens HWC (as the device stores activations), ONNX CHW
            w = w.reshape(len(w), FLAT_HW, FLAT_HW, -1).transpose(0, 3, 1, 2).reshape(len(w), -1)
        trained[f"{onnx_name}.weight"] = w
        trained[f"{onnx_name}.bias"] = n.params["bias"]
    for i, t in enumerate(out.graph.initializer):
        if t.name in trained:
            want = tuple(t.dims)
            out.graph.initializer[i].CopyFrom(numpy_helper.from_array(
                np.asarray(trained[t.name], np.float32).reshape(want), t.name))
    return out


def pretrained(seed: int = 0):
    """The user's model: the CNN trained in float (SGD with momentum) on upright digits. Returns the
    ONNX model and its upright test accuracy."""
    from tinytrain import reference

    model = cnn_onnx(seed)
    g = float_graph(model)
    x, y = digits(False, "train")
    reference.train(g, x, y, epochs=8, lr=0.02, batch=16, momentum=0.9, seed=seed)
    trained = with_params(model, g)
    xt, yt = digits(False, "test")
    return trained, accuracy(float_graph(trained), xt, yt)


def float_sgd_best(model, epochs: int, seed: int = 0) -> Dict[str, object]:
    """Float per-sample SGD (batch 1, no momentum: what the device does) of every parameter on the
    rotated digits at each of `FLOAT_RATES`; the best by test accuracy."""
    from tinytrain import reference

    x, y = digits(True, "train")
    xt, yt = digits(True, "test")
    runs = {}
    for lr in FLOAT_RATES:
        g = float_graph(model)
        reference.train(g, x, y, epochs=epochs, lr=lr, batch=1, momentum=0.0, seed=seed)
        runs[lr] = accuracy(g, xt, yt)
    best = max(runs, key=lambda r: runs[r])
    return {"lr": best, "accuracy": runs[best], "runs": runs}


def int8_adapt(model, epochs: int, seed: int = 0) -> Dict[str, object]:
    """What a user types: import the ONNX file, quantize on their (rotated) data, compile every
    parameter, train: no rate anywhere. Returns the rate chosen, accuracies and timings."""
    import tinytrain as tt

    x, y = digits(True, "train")
    xt, yt = digits(True, "test")
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "user_cnn.onnx")
        with open(path, "wb") as f:
            f.write(model.SerializeToString())
        q = tt.quantize(tt.load_onnx(path), x[:256])
    plan = tt.compile(q, tt.schemes.full(q), budget="256KB")
    tr = tt.Trainer(plan)
    before = tr.evaluate(xt, yt)
    t0 = time.perf_counter()
    hist = tr.fit(x, y, epochs=epochs, batch_size=1, seed=seed, verbose=False)
    seconds = time.perf_counter() - t0
    choice = tr.lr_choice
    return {"lr": tr.lr, "accuracy_before": before, "accuracy": tr.evaluate(xt, yt), "collapsed": hist["collapsed"],
            "range_test_seconds": choice.seconds, "fit_seconds": seconds,
            "candidates": [(c.lr, c.val_loss, c.val_accuracy, c.collapse) for c in choice.candidates]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--epochs", type=int, default=4, help="adaptation epochs (int8 and float alike)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    model, upright = pretrained(args.seed)
    ref = float_sgd_best(model, args.epochs, args.seed)
    run = int8_adapt(model, args.epochs, args.seed)
    row = {"pretrained_upright_accuracy": upright, "rotated_before": run["accuracy_before"],
           "chosen_lr": run["lr"], "int8_accuracy": run["accuracy"], "collapsed": run["collapsed"],
           "float_sgd_best_lr": ref["lr"], "float_sgd_best_accuracy": ref["accuracy"],
           "float_sgd_runs": ref["runs"], "gap_points": 100 * (ref["accuracy"] - run["accuracy"]),
           "range_test_seconds": run["range_test_seconds"], "fit_seconds": run["fit_seconds"],
           "candidates": run["candidates"]}
    if args.json:
        print(json.dumps(row))
        return 0
    print(f"digits CNN, upright -> rotated 90 degrees, {args.epochs} epochs, every parameter trained")
    print(f"  pretrained (float) on upright digits: {100 * upright:.1f} %; int8 on rotated before adapting: "
          f"{100 * run['accuracy_before']:.1f} %")
    print(f"  {'':34s}{'rate':>10s}{'accuracy':>10s}")
    print(f"  {'tinytrain int8, lr=auto (chosen)':34s}{run['lr']:>10.3g}{100 * run['accuracy']:>9.1f}%")
    print(f"  {'float SGD, best of ' + str(len(FLOAT_RATES)) + ' rates':34s}{ref['lr']:>10.3g}{100 * ref['accuracy']:>9.1f}%")
    print(f"  gap {row['gap_points']:+.1f} points; range test {run['range_test_seconds']:.2f} s of "
          f"{run['fit_seconds']:.2f} s training" + ("; COLLAPSED" if run["collapsed"] else ""))
    print("  range test: " + ", ".join(f"{lr:g}: loss {loss:.3f} acc {100 * acc:.0f}%" + (f" ({why})" if why else "")
                                         for lr, loss, acc, why in run["candidates"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

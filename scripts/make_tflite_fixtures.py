"""Make the converter fixtures in tests/fixtures/tflite/ (run once; the files are committed).

Needs TensorFlow and tf2onnx, which are generator-only dependencies (never test or runtime ones):
    python3 -m venv .venv-tf
    .venv-tf/bin/pip install tensorflow-cpu==2.15.1 tf2onnx==1.16.1 onnx==1.16.2 onnxruntime==1.26.0 sympy scikit-learn "numpy<2"
    .venv-tf/bin/python scripts/make_tflite_fixtures.py [NAME ...]

For each of four small networks (a DS-CNN keyword-spotting net, a MobileNetV1-0.25-style net, a
ResNet-8-style net with 1x1 stride-2 shortcuts, a fully connected autoencoder), trained briefly on
scikit-learn digits (tests/_digits_fixtures.py says how each input is made), it writes:

  NAME.tflite        full-integer int8 TFLite (int8 input and output), TFLiteConverter
  NAME.onnx          tf2onnx of NAME.tflite (QDQ)
  NAME_float.onnx    tf2onnx of the float TFLite model
  NAME_qop.onnx      onnxruntime.quantization.quantize_static(NAME_float.onnx), QOperator, uint8
                     activations, per-channel int8 weights
  NAME_float.tflite  the float32 TFLite model (ds_cnn and autoencoder only, to keep the files small)
  ds_cnn_float_io.tflite  int8 inside, float32 input and output (QUANTIZE / DEQUANTIZE at the edges)

and fixtures.json (versions of the tools, float accuracies). Training is seeded but TensorFlow is
not bit-reproducible across machines: re-running changes the files, not what the tests check.
"""
from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# oneDNN kernels aborted with a heap corruption while training the ResNet here
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import tf2onnx  # noqa: E402
import onnx  # noqa: E402
import onnxruntime  # noqa: E402
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
from _digits_fixtures import SHAPES, digits  # noqa: E402

OUT = os.path.join(ROOT, "tests", "fixtures", "tflite")
L = tf.keras.layers


def bn_act(x, act="relu"):
    # a short training run: faster moving statistics, or inference-mode BN lags the weights
    x = L.BatchNormalization(momentum=0.9)(x)
    return L.ReLU(6.0)(x) if act == "relu6" else L.ReLU()(x)


def ds_cnn():
    inp = L.Input(SHAPES["ds_cnn"])
    # (5, 3) stride 2 'same' on 16x8: TFLite pads [1, 0] top/left, [2, 1] bottom/right (asymmetric)
    x = bn_act(L.Conv2D(16, (5, 3), strides=2, padding="same", use_bias=False)(inp))
    x = bn_act(L.DepthwiseConv2D(3, padding="same", use_bias=False)(x))
    x = bn_act(L.Conv2D(24, 1, use_bias=False)(x))
    # collapse the 4 coefficients with a depth multiplier of 2: an 8x1 map of 48 channels
    x = bn_act(L.DepthwiseConv2D((1, 4), depth_multiplier=2, use_bias=False)(x))
    x = bn_act(L.Conv2D(24, (3, 1), padding="same", use_bias=False)(x))  # k x 1 on a width-1 map
    x = L.AveragePooling2D((8, 1))(x)
    x = L.Flatten()(x)
    return tf.keras.Model(inp, L.Softmax()(L.Dense(10)(x)), name="ds_cnn")


def mobilenet():
    inp = L.Input(SHAPES["mobilenet"])
    x = bn_act(L.Conv2D(8, 3, strides=2, padding="same", use_bias=False)(inp), "relu6")

    def block(x, ch, stride):
        if stride == 2:  # keras.applications.MobileNet pads explicitly before a 'valid' stride-2 dw
            x = L.ZeroPadding2D(((0, 1), (0, 1)))(x)
        x = bn_act(L.DepthwiseConv2D(3, strides=stride, padding="same" if stride == 1 else "valid",
                                     use_bias=False)(x), "relu6")
        return bn_act(L.Conv2D(ch, 1, use_bias=False)(x), "relu6")

    for ch, s in ((16, 1), (32, 2), (32, 1), (64, 2), (64, 1), (128, 2)):
        x = block(x, ch, s)
    x = L.GlobalAveragePooling2D()(x)
    x = L.Dropout(0.1)(x)
    return tf.keras.Model(inp, L.Softmax()(L.Dense(10)(x)), name="mobilenet")


def resnet8():
    inp = L.Input(SHAPES["resnet8"])
    x = bn_act(L.Conv2D(8, 3, padding="same", use_bias=False)(inp))
    x = L.MaxPooling2D(2)(x)

    def block(x, ch, stride):
        y = bn_act(L.Conv2D(ch, 3, strides=stride, padding="same", use_bias=False)(x))
        y = L.BatchNormalization(momentum=0.9)(L.Conv2D(ch, 3, padding="same", use_bias=False)(y))
        if stride != 1:
            x = L.Conv2D(ch, 1, strides=stride)(x)  # the 1x1 stride-2 shortcut
        return L.ReLU()(L.Add()([x, y]))

    x = block(x, 8, 1)
    x = block(x, 16, 2)
    x = block(x, 32, 2)
    x = L.AveragePooling2D(4)(x)
    x = L.Flatten()(x)
    return tf.keras.Model(inp, L.Softmax()(L.Dense(10)(x)), name="resnet8")


def autoencoder():
    inp = L.Input(SHAPES["autoencoder"])
    x = inp
    for u in (32, 16, 8, 16, 32):
        x = L.Dense(u, activation="relu")(x)
    return tf.keras.Model(inp, L.Dense(64)(x), name="autoencoder")


def convert(model, x_rep, int8: bool, int8_io: bool = True) -> bytes:
    conv = tf.lite.TFLiteConverter.from_keras_model(model)
    if int8:
        conv.optimizations = [tf.lite.Optimize.DEFAULT]
        conv.representative_dataset = lambda: ([x_rep[i: i + 1]] for i in range(len(x_rep)))
        conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        if int8_io:
            conv.inference_input_type = tf.int8
            conv.inference_output_type = tf.int8
    return conv.convert()


class _Reader(CalibrationDataReader):
    def __init__(self, name, x):
        self.it = iter([{name: x[i: i + 1]} for i in range(len(x))])

    def get_next(self):
        return next(self.it, None)


MODELS = {"ds_cnn": (ds_cnn, 30), "mobilenet": (mobilenet, 20), "resnet8": (resnet8, 12),
          "autoencoder": (autoencoder, 15)}


def main(names) -> None:
    """One process per model: TensorFlow and onnxruntime's quantizer in one long-lived process
    crashed here (a heap corruption at exit), and separate processes keep each file independent.
    ``names`` remakes only those models (fixtures.json keeps the others' entries)."""
    import subprocess

    os.makedirs(OUT, exist_ok=True)
    meta = {"models": {}}
    if os.path.isfile(os.path.join(OUT, "fixtures.json")):
        with open(os.path.join(OUT, "fixtures.json")) as f:
            meta = json.load(f)
    meta.update({"tensorflow": tf.__version__, "tf2onnx": tf2onnx.__version__, "onnx": onnx.__version__,
                 "onnxruntime": onnxruntime.__version__})
    for name in names:
        out = subprocess.run([sys.executable, os.path.abspath(__file__), "--one", name], check=True, stdout=subprocess.PIPE,
                             text=True).stdout
        meta["models"][name] = json.loads(out.strip().splitlines()[-1])
        print(name, meta["models"][name], flush=True)
    with open(os.path.join(OUT, "fixtures.json"), "w") as f:
        json.dump(meta, f, indent=1, sort_keys=True)
        f.write("\n")


def make(name: str) -> None:
    tf.keras.utils.set_random_seed(0)
    build, epochs = MODELS[name]
    model = build()
    # the classifiers learn digits 0-4 (5-9 are learned on the device); the autoencoder is a
    # generic one, pretrained on all digits (the device then learns what its own "normal" is)
    part = "all" if name == "autoencoder" else "source"
    xs, ys = digits(name, part, "train")
    xt, yt = digits(name, part, "test")
    if name == "autoencoder":
        model.compile(tf.keras.optimizers.Adam(3e-3), "mse")
        model.fit(xs, xs, epochs=epochs, batch_size=32, verbose=0)
        score = float(model.evaluate(xt, xt, verbose=0))
        info = {"float_test_mse": score}
    else:
        model.compile(tf.keras.optimizers.Adam(3e-3), "sparse_categorical_crossentropy", ["accuracy"])
        model.fit(xs, ys, epochs=epochs, batch_size=32, verbose=0)
        info = {"float_source_test_accuracy": float(model.evaluate(xt, yt, verbose=0)[1])}
    rep = xs[:200]
    int8 = convert(model, rep, True)
    flt = convert(model, rep, False)
    p = lambda suffix: os.path.join(OUT, name + suffix)  # noqa: E731
    with open(p(".tflite"), "wb") as f:
        f.write(int8)
    if name == "ds_cnn":
        with open(p("_float_io.tflite"), "wb") as f:
            f.write(convert(model, rep, True, int8_io=False))
    tf2onnx.convert.from_tflite(p(".tflite"), opset=13, output_path=p(".onnx"))
    flt_path = p("_float.tflite")
    with open(flt_path, "wb") as f:
        f.write(flt)
    tf2onnx.convert.from_tflite(flt_path, opset=13, output_path=p("_float.onnx"))
    if name not in ("ds_cnn", "autoencoder"):
        os.remove(flt_path)
    fm = onnx.load(p("_float.onnx"))
    quantize_static(p("_float.onnx"), p("_qop.onnx"), _Reader(fm.graph.input[0].name, rep),
                    quant_format=QuantFormat.QOperator, activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8, per_channel=True)
    info["files"] = {s: os.path.getsize(p(s)) for s in (".tflite", ".onnx", "_float.onnx", "_qop.onnx")}
    print(json.dumps(info), flush=True)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--one"]:
        make(sys.argv[2])
    else:
        main(sys.argv[1:] or list(MODELS))

"""The import conformance table of issue 22: model x form x import / bit-exact / train / export.

    python benches/conformance.py            # prints the table (markdown)

Rows: the five real files of ../shared/models (or $TINYTRAIN_MODELS) as .tflite, through tf2onnx
(when it and TensorFlow are installed), as float ONNX (tinytrain's export of their float twin, then
tt.quantize) and through onnxruntime's quantizer (QOperator and QDQ); the converter fixtures in
tests/fixtures/tflite (TensorFlow 2.15.1's
.tflite, tf2onnx 1.16.1's QDQ and float ONNX, onnxruntime's QOperator); one synthetic model per
failure class. "bit-exact" is against LiteRT's reference kernels for a .tflite, equality with
the .tflite's import for tf2onnx's form of it, and the difference from onnxruntime running the
file (output LSB, or argmax agreement when its output is the Softmax) for onnxruntime's forms.
Each check is in tests/_conformance_cases.py, which tests/test_conformance.py asserts on.
"""
import os
import sys
import tempfile
import time

os.environ.setdefault("TINYTRAIN_PROGRESS", "0")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))

import tinytrain as tt  # noqa: E402

import _conformance_cases as C  # noqa: E402


def rows():
    d = C.models_dir()
    tmp = tempfile.mkdtemp(prefix="tt-conformance-")
    if d is not None:
        for name in C.REAL_FILES:
            path = os.path.join(d, name)
            yield C.conform(name, ".tflite", lambda: tt.load_tflite(path), open(path, "rb").read())
            src = tt.load_tflite(path)
            proto = C.float_form(src).to_onnx()
            yield C.conform(name, "float ONNX -> tt.quantize", lambda: tt.load_onnx(proto))
            converted = C.tf2onnx_form(path, os.path.join(tmp, f"{name}.tf2onnx.onnx"))
            if converted is not None:
                twin = src if isinstance(src, tt.QuantizedModel) else None
                yield C.conform(name, "tf2onnx" + (" QDQ" if twin else " float -> tt.quantize"),
                                lambda: tt.load_onnx(converted), twin=twin)
            for fmt in ("QOperator", "QDQ"):
                out = C.onnxruntime_quantized(src, os.path.join(tmp, f"{name}.{fmt}.onnx"), fmt)
                yield C.conform(name, f"onnxruntime quantizer {fmt}", lambda: tt.load_onnx(out), onnx_path=out)
    for net in ("ds_cnn", "resnet8", "autoencoder", "mobilenet"):
        base = os.path.join(C.FIXTURES, net)
        yield C.conform(f"fixture {net}", ".tflite", lambda: tt.load_tflite(base + ".tflite"),
                        open(base + ".tflite", "rb").read())
        yield C.conform(f"fixture {net}", "tf2onnx QDQ", lambda: tt.load_onnx(base + ".onnx"),
                        twin=tt.load_tflite(base + ".tflite"))
        yield C.conform(f"fixture {net}", "tf2onnx float -> tt.quantize", lambda: tt.load_onnx(base + "_float.onnx"))
        yield C.conform(f"fixture {net}", "onnxruntime quantizer QOperator", lambda: tt.load_onnx(base + "_qop.onnx"),
                        onnx_path=base + "_qop.onnx")
    for name, form, load, data in C.synthetic_cases():
        yield C.conform(name, form, load, data)


def main() -> None:
    head = ["model", "form", "import", "bit-exact", "train", "export (ONNX in onnxruntime, MCU bundle)"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    t0 = time.time()
    notes = []
    for r in rows():
        print("| " + " | ".join(r.cells()) + " |", flush=True)
        if r.note and not r.note.startswith("float"):
            notes.append(f"{r.model} / {r.form}: {r.note}")
    if C.models_dir() is None:
        print("\n(../shared/models not found: the real files were not run)")
    for n in notes:
        print(n)
    print(f"\n{time.time() - t0:.0f} s; LiteRT's reference kernels from ai-edge-litert")
    d = C.models_dir()
    if d is not None:
        print("\nFULLY_CONNECTED against LiteRT's reference kernels (64 random int8 inputs): outputs that differ "
              "when tt-core requantizes the layer's accumulators with single / double rounding")
        print("| file | layer | single | double | outputs |\n|---|---|---|---|---|")
        for name in C.REAL_FILES:
            if "int8" in name:
                for layer, (single, double, total) in C.fc_rounding_mismatches(
                        open(os.path.join(d, name), "rb").read()).items():
                    print(f"| {name} | {layer} | {single} | {double} | {total} |")


if __name__ == "__main__":
    main()

"""Export a compiled plan for a microcontroller: the files tt-mcu's firmware includes.

    tinytrain export PLAN.ttp --mcu OUT_DIR [--data train.npz] [--test test.npz]
    plan.export_mcu(OUT_DIR, x, y, x_test, y_test)

writes, as one folder swapped in whole (nothing to hand-edit):

    plan.bin      the plan (tt-core's format)                    -> flash, include_bytes!
    params.bin    the frozen parameter blob it was compiled with -> flash, 4-byte aligned
    train_x.bin   int8 samples, back to back, quantized as the plan's input (HWC)
    train_y.bin   one uint8 class label per sample
    test_x.bin    held-out samples, same layout (optional: empty when not given)
    test_y.bin    their labels
    lr.bin        the learning rate the firmware trains with: one float32, little-endian (the
                  plan's: `tt.compile(..., lr=)`, or the rate `tinytrain compile --lr auto --data`
                  chose; the device can change it at run time, `Trainer::set_lr` / `tt_set_lr`)
    manifest.json arena bytes, input shape and quantization, learning rate, file sizes, CRC-32s

The firmware examples (crates/tt-mcu/examples/*) build against such a folder with
``TT_MCU_BUNDLE=OUT_DIR``; their build script runs the same plan on the host and the firmware
must reproduce that run bit for bit.
"""
from __future__ import annotations

import json
import zlib
from typing import Dict, Optional

import numpy as np

from . import datacheck
from .outputs import check_folder, write_folder_atomic
from .plan import Plan
from .trainer import Trainer

FILES = ("plan.bin", "params.bin", "train_x.bin", "train_y.bin", "test_x.bin", "test_y.bin", "lr.bin")
BUNDLE_FILES = FILES + ("manifest.json",)


def _samples(tr: Trainer, x, y, what: str):
    if x is None and y is None:
        return b"", b"", 0
    if x is None or y is None:
        raise ValueError(f"{what}: give both samples and labels")
    xq = tr._inputs(datacheck.check_inputs(np.asarray(x), tr._in_scale, tr._in_zp, f"{what}: inputs"))
    labels = datacheck.plan_labels(tr.plan, y, len(xq), f"{what}: labels")
    if len(labels) != len(xq):
        raise ValueError(f"{what}: {len(xq)} samples but {len(labels)} labels")
    if not np.issubdtype(labels.dtype, np.integer) or (len(labels) and (labels.min() < 0 or labels.max() > 255)):
        raise ValueError(f"{what}: labels must be integers in [0, 255]")
    return xq.astype(np.int8).tobytes(), labels.astype(np.uint8).tobytes(), len(labels)


def export_mcu(plan: Plan, out_dir: str, x=None, y=None, x_test=None, y_test=None,
               lr: Optional[float] = None) -> Dict[str, object]:
    """Write the firmware bundle of ``plan`` (and optional training / test samples, float32 NCHW
    or already-quantized int8) into ``out_dir``; returns the manifest. ``lr``: the rate the
    firmware trains with (``lr.bin``; default the plan's own), e.g. ``trainer.lr`` after a
    `Trainer` chose one."""
    check_folder(out_dir, "bundle folder", allowed=BUNDLE_FILES)
    from .lr import parse_lr

    lr = plan.lr if lr is None else parse_lr(lr)
    if lr == "auto":
        raise ValueError("export_mcu needs a rate (a number): choose one with tt.choose_lr or a Trainer's fit")
    if plan.loss != "cross_entropy" and (y is not None or y_test is not None):
        raise ValueError("sample labels are class indices: export samples only for a cross-entropy plan")
    tr = Trainer(plan, lr=None)
    train_x, train_y, n_train = _samples(tr, x, y, "training samples")
    test_x, test_y, n_test = _samples(tr, x_test, y_test, "test samples")
    rate = np.asarray([lr], dtype="<f4")
    data = dict(zip(FILES, (plan.plan_bytes, plan.params, train_x, train_y, test_x, test_y, rate.tobytes())))
    inp = plan.meta.get("input", {})
    macs = None
    if plan.model is not None:
        from .model import layer_stats

        macs = sum(int(r["macs"]) for r in layer_stats(plan.model))
    manifest = {
        "format": "tinytrain-mcu-bundle",
        "version": 1,
        "arena_bytes": plan.memory.peak_bytes,
        "state_bytes": plan.memory.state_bytes,
        "flash_bytes": len(plan.plan_bytes) + len(plan.params),
        "input": {"shape": inp.get("shape"), "scale": inp.get("scale"), "zero_point": inp.get("zero_point"),
                  "layout": "HWC int8"},
        "forward_macs": macs,
        "lr": float(rate[0]),
        "train_samples": n_train,
        "test_samples": n_test,
        "files": {k: {"bytes": len(v), "crc32": zlib.crc32(v)} for k, v in data.items()},
    }
    data["manifest.json"] = (json.dumps(manifest, indent=2) + "\n").encode()
    write_folder_atomic(out_dir, data, "bundle folder")
    return manifest


def _load_xy(path: Optional[str]):
    if path is None:
        return None, None
    with np.load(path) as d:
        if "X" not in d or "Y" not in d:
            raise ValueError(f"{path}: expected arrays X (samples) and Y (labels)")
        return d["X"], d["Y"]


def cli_export(args) -> int:
    if args.onnx:
        from .fileio import load_model

        q = load_model(args.source, args.calib)
        q.to_onnx(args.onnx)
        if args.json:
            print(json.dumps({"source": args.source, "onnx": args.onnx, "layers": len(q.layers)}))
        else:
            print(f"wrote {args.onnx}: int8 QDQ ONNX of {args.source} ({len(q.layers)} trainable layers)")
        return 0
    plan = Plan.load(args.source)
    x, y = _load_xy(args.data)
    xt, yt = _load_xy(args.test)
    m = export_mcu(plan, args.mcu, x, y, xt, yt, lr=args.lr)
    if args.json:
        print(json.dumps(m))
    else:
        print(f"wrote {args.mcu}: plan {m['files']['plan.bin']['bytes']} B + params "
              f"{m['files']['params.bin']['bytes']} B (flash), arena {m['arena_bytes']} B (SRAM), "
              f"{m['train_samples']} training / {m['test_samples']} test samples; the firmware trains at lr={m['lr']:.3g}")
    return 0


def add_cli_parser(sub) -> None:
    p = sub.add_parser("export", help="the firmware bundle of a plan (--mcu), or a model as int8 QDQ ONNX (--onnx)")
    p.add_argument("source", help="plan file (.ttp) from `tinytrain compile` with --mcu; a model (.onnx/.tflite) with --onnx")
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--mcu", metavar="OUT_DIR", help="folder for the firmware bundle (what tt-mcu includes)")
    target.add_argument("--onnx", metavar="OUT", help="write the int8 model as a QDQ ONNX file onnxruntime runs")
    p.add_argument("--calib", help="calibration data (.npz/.npy) when --onnx is given a float model")
    p.add_argument("--data", help=".npz with X (float32 NCHW or int8) and Y: samples shipped for training")
    p.add_argument("--test", help=".npz with X and Y: held-out samples shipped for accuracy")
    p.add_argument("--lr", type=float, default=None,
                   help="learning rate the firmware trains with (default: the plan's, see `tinytrain compile --lr`)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cli_export)

"""The `tinytrain` command line: one entry point, a sub-command per step."""
from __future__ import annotations

import argparse
import json
import sys
import warnings
from typing import List, Optional


def _cmd_demo(args: argparse.Namespace) -> int:
    from . import demo

    return demo.run(json_output=args.json, out_dir=args.out, budget=args.budget, epochs=args.epochs,
                    workers=args.workers, peers=not args.no_peers, lr=args.lr)


def _print_json(obj) -> None:
    print(json.dumps(obj, indent=None, default=lambda o: o.item() if hasattr(o, "item") else str(o)))


def _cmd_inspect(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from . import load_onnx
    from .errors import UnsupportedOperatorError
    from .model import layer_stats

    try:
        if str(args.model).lower().endswith(".tflite"):
            from .tflite_import import load_tflite

            g = load_tflite(args.model)
        else:
            g = load_onnx(args.model)
    except UnsupportedOperatorError as exc:
        if args.json:
            _print_json({"model": args.model, "supported": False, "unsupported": str(exc)})
        else:
            print(f"{args.model}: not supported by tinytrain: {exc}")
        return 1
    rows = layer_stats(g)
    if args.json:
        _print_json({"model": args.model, "supported": True, "quantized": g.tensors[g.input].scale is not None,
                     "softmax_tail": g.softmax_tail, "layers": rows})
        return 0
    table = Table(title=f"{args.model}")
    for col in ("layer", "op", "output (C,H,W)", "params", "MACs", "act"):
        table.add_column(col, justify="right" if col in ("params", "MACs") else "left")
    for r in rows:
        table.add_row(r["name"], r["op"], str(r["output"]), f"{r['params']:,}", f"{r['macs']:,}", str(r["act"]))
    console = Console()
    console.print(table)
    console.print(f"{sum(r['params'] for r in rows):,} parameters, {sum(r['macs'] for r in rows):,} MACs, "
                  f"{len(g.layers)} trainable layers; every op is supported"
                  + ("; trailing Softmax kept for inference, skipped for training" if g.softmax_tail else ""))
    return 0


def _cmd_quantize(args: argparse.Namespace) -> int:
    from . import load_onnx, quantize
    from .fileio import load_data
    from .model import QuantizedModel

    g = load_onnx(args.model)
    if isinstance(g, QuantizedModel):
        raise ValueError(f"{args.model} is already quantized; tinytrain keeps its scales as they are")
    x, _ = load_data(args.calib, need_labels=False)
    q = quantize(g, x, method=args.method, percentile=args.percentile)
    q.to_onnx(args.output)
    if args.json:
        _print_json({"model": args.model, "output": args.output, "method": args.method, "layers": len(q.layers)})
    else:
        print(f"wrote {args.output}: int8 QDQ model, {len(q.layers)} trainable layers, calibrated on {len(x)} samples")
    return 0


def _collapse_exit(what: str, keep_going: bool) -> int:
    """Exit status after a collapse: 3 (nothing written), or 0 with ``--keep-going``."""
    if keep_going:
        print(f"warning: {what}; kept going (--keep-going)", file=sys.stderr)
        return 0
    print(f"tinytrain: {what}; nothing written (--keep-going writes it anyway)", file=sys.stderr)
    return 3


def _cmd_search(args: argparse.Namespace) -> int:
    from .fileio import load_data, load_model
    from .sparse_search import search

    q = load_model(args.model, args.calib)
    x, y = load_data(args.data)
    ratios = tuple(float(r) for r in args.ratios.split(","))
    result = search(q, x, y, budget=args.budget, ratios=ratios, population=args.population,
                    generations=args.generations, seed=args.seed, workers=args.workers, epochs=args.epochs, lr=args.lr)
    from .fileio import write_atomic

    # a collapsed baseline only drops out of the comparison; a searched scheme that collapsed at the
    # rate it was given means the rate is wrong for what the search returns
    final = [c for c in result.collapsed if c["stage"] == "verification" and c["what"].startswith("searched")]
    if final:
        first = final[0]
        rc = _collapse_exit(f"{len(final)} fine-tune(s) of the search's final comparison collapsed (e.g. {first['what']} at "
                            f"lr={first['lr']:g}: {first['collapse']}); lower --lr or use --lr auto", args.keep_going)
        if rc:
            return rc
    write_atomic(args.output, result.scheme.to_json())
    if args.plot:
        result.plot(args.plot)
    summary = {"scheme": args.output, "peak_bytes": result.peak_bytes, "budget_bytes": result.budget_bytes,
               "score": result.score, "pareto": result.pareto, "contributions": result.contributions,
               "lr": result.lr, "lr_choice": result.lr_choice.to_dict() if result.lr_choice else None,
               "winner": result.winner, "margin_points": result.margin_points, "accuracy": result.accuracy,
               "baselines": [{k: v for k, v in b.items() if k != "scheme"} for b in result.baselines],
               "collapsed": result.collapsed}
    if args.json:
        _print_json(summary)
    else:
        if result.lr_choice is not None:
            print(result.lr_choice.summary())
        print(result.baseline_table())
        print(f"wrote {args.output}: {result.winner} scheme, held-out accuracy {100 * result.accuracy:.1f} % "
              f"({result.margin_points:+.1f} points over the best "
              f"{'baseline' if result.winner == 'searched' else 'searched scheme'}), "
              f"peak {result.peak_bytes / 1024:.1f} KB of {result.budget_bytes / 1024:.0f} KB; train it at lr={result.lr:.3g}")
    return 0


def _cmd_memory(args: argparse.Namespace) -> int:
    from .engine import cli_memory

    return cli_memory(args)


def _cmd_compile(args: argparse.Namespace) -> int:
    from .engine import _cli_plan, cli_compile
    from .lr import FALLBACK_LR, choose_lr

    note = None
    if args.lr == "auto" and args.data:
        from .fileio import load_data

        x, y = load_data(args.data)
        if args.calib is None:
            args.calib = args.data
        _, plan = _cli_plan(args, budget_check=True)
        choice = choose_lr(plan, x, y, seed=args.seed)
        args.lr = choice.lr
        note = choice.summary()
    elif args.lr == "auto":
        note = (f"lr: no --data to choose a rate from: the plan stores {FALLBACK_LR:g} (a Trainer chooses from its "
                "data; the device's rate can be set at run time, tt_set_lr)")
    rc = cli_compile(args)
    if note and not args.json:
        print(note)
    return rc


def _cmd_train(args: argparse.Namespace) -> int:
    from .engine import _cli_plan
    from .fileio import load_data
    from .trainer import Trainer

    x, y = load_data(args.data)
    if args.calib is None:
        args.calib = args.data
    q, plan = _cli_plan(args, budget_check=True)
    trainer = Trainer(plan, lr=args.lr, momentum=args.momentum)
    history = trainer.fit(x, y, epochs=args.epochs, batch_size=args.batch_size, seed=args.seed, verbose=not args.json)
    if history["collapsed"]:
        rc = _collapse_exit(f"training collapsed at lr={trainer.lr:g}: {history['collapse']}; lower --lr "
                            "(or --lr auto)", args.keep_going)
        if rc:
            return rc
    trainer.model.to_onnx(args.output)
    if args.plot:
        from .plots import loss_curve_plot

        loss_curve_plot(history, args.plot)
    summary = {"model": args.model, "output": args.output, "samples": int(len(x)), "epochs": args.epochs,
               "history": history, "lr": trainer.lr, "skipped_steps": trainer.skipped_steps, "peak_bytes": plan.memory.peak_bytes,
               "measured_high_water_bytes": trainer.high_water_bytes}
    if args.json:
        _print_json(summary)
    else:
        last = {k: v[-1] for k, v in history.items() if isinstance(v, list) and v}
        print(f"trained {args.epochs} epoch(s) on {len(x)} samples through the plan "
              f"(peak SRAM {plan.memory.peak_bytes / 1024:.1f} KB): "
              + ", ".join(f"{k} {v:.4g}" for k, v in last.items())
              + (f"; {trainer.skipped_steps} non-finite step(s) skipped" if trainer.skipped_steps else "")
              + ("; the loss diverged: lower the learning rate" if history.get("diverged") else "")
              + (f"; COLLAPSED: {history['collapse']}" if history["collapsed"] else ""))
        print(f"wrote {args.output}: the trained int8 model (QDQ ONNX)")
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from . import datacheck
    from .fileio import load_data, load_model

    x, y = load_data(args.data)
    q = load_model(args.model, args.calib or args.data)
    metric, value = datacheck.score(q, x, y, args.data)
    if args.json:
        _print_json({"model": args.model, "samples": int(len(x)), metric: value})
    else:
        print(f"{args.model}: {metric} {value:.4f} on {len(x)} samples (int8 inference)")
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from . import bench

    return bench.main(args.models.split(","), args.schemes.split(","), args.steps, not args.no_peers,
                      args.json, args.plot)


def _lr_arg(value: str):
    """``--lr``: checked as it is parsed, with the checker's own message."""
    from .lr import parse_lr

    try:
        return parse_lr(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _lr_option(p: argparse.ArgumentParser, extra: str = "") -> None:
    p.add_argument("--lr", type=_lr_arg, default="auto", metavar="auto|FLOAT",
                   help="learning rate; auto (default): a short range test on the data chooses it" + extra)


def _keep_going_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--keep-going", action="store_true",
                   help="when training collapses (constant prediction, saturated logits, ...), still write the "
                        "result and exit 0 (default: exit 3, nothing written)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tinytrain", description=__doc__)
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="import, quantize, search, compile under 256 KB, train, report")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    p.add_argument("--out", default="tinytrain-demo", help="folder for plots and artifacts")
    p.add_argument("--budget", default="256KB", help="SRAM budget of the training step")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--workers", type=int, default=None, help="parallel fine-tunes in the search (default: all cores)")
    p.add_argument("--no-peers", action="store_true", help="skip the PyTorch comparison")
    _lr_option(p)
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("bench", help="memory and time of a training step vs PyTorch (and other peers)")
    p.add_argument("--models", default="demo,mbv2-w0.35,mcunet-5fps,proxyless-w0.3",
                   help="comma-separated: demo, mbv2-w0.35, mcunet-5fps, proxyless-w0.3")
    p.add_argument("--schemes", default="full,bias,sparse", help="comma-separated: full, bias, sparse")
    p.add_argument("--steps", type=int, default=5, help="timed steps per configuration")
    p.add_argument("--no-peers", action="store_true", help="measure tinytrain only")
    p.add_argument("--plot", help="write a bar chart (PNG) here")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_bench)

    p = sub.add_parser("inspect", help="layers, parameters, MACs, and ops that are not supported (and why)")
    p.add_argument("model", help="ONNX file")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_inspect)

    p = sub.add_parser("quantize", help="post-training int8 quantization of a float ONNX model")
    p.add_argument("model", help="float ONNX file")
    p.add_argument("--calib", required=True, help="calibration inputs (.npz with X, or .npy), float32 NCHW")
    p.add_argument("-o", "--output", required=True, help="where to write the int8 QDQ ONNX model")
    p.add_argument("--method", choices=("minmax", "percentile"), default="minmax")
    p.add_argument("--percentile", type=float, default=99.99)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_quantize)

    p = sub.add_parser("search", help="contribution analysis + evolutionary search of a sparse scheme")
    p.add_argument("model", help="ONNX file (float models are quantized with --calib or synthetic data)")
    p.add_argument("--data", required=True, help=".npz with X (float32 NCHW) and Y (labels)")
    p.add_argument("--calib", help="calibration data for a float model (default: --data)")
    p.add_argument("--budget", default="256KB")
    p.add_argument("-o", "--output", required=True, help="scheme JSON to write")
    p.add_argument("--ratios", default="0.125,0.25,0.5,1", help="channel ratios tried per layer")
    p.add_argument("--population", type=int, default=40)
    p.add_argument("--generations", type=int, default=30)
    p.add_argument("--epochs", type=int, default=2, help="epochs of each contribution fine-tune")
    _lr_option(p)
    _keep_going_option(p)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=None, help="parallel fine-tunes (default: all cores)")
    p.add_argument("--plot", help="write the search plot (PNG) here")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_search)

    from .engine import add_cli_options

    p = sub.add_parser("memory", help="peak SRAM of training a model under a scheme, and where it goes")
    add_cli_options(p)
    p.set_defaults(func=_cmd_memory)

    p = sub.add_parser("compile", help="compile training under a scheme and budget into a plan file")
    add_cli_options(p)
    p.add_argument("-o", "--output", required=True, help="plan file to write (.ttp)")
    _lr_option(p, " (the rate the firmware trains with); auto needs --data to choose one")
    p.add_argument("--data", help=".npz with X and Y: the range test of --lr auto runs on it")
    p.add_argument("--seed", type=int, default=0, help="seed of the range test")
    p.set_defaults(func=_cmd_compile)

    p = sub.add_parser("train", help="train a model through its compiled plan on .npz data; writes the trained model")
    add_cli_options(p)
    p.add_argument("--data", required=True, help=".npz with X (float32 NCHW) and Y (labels, or float targets for mse)")
    p.add_argument("-o", "--output", required=True, help="trained int8 model to write (QDQ ONNX)")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=1)
    _lr_option(p)
    _keep_going_option(p)
    p.add_argument("--momentum", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--plot", help="write the loss curve (PNG) here")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("evaluate", help="accuracy (or MSE for float targets) of a model's int8 inference on .npz data")
    p.add_argument("model", help="ONNX file")
    p.add_argument("--data", required=True, help=".npz with X and Y")
    p.add_argument("--calib", help="calibration data if the model is float (default: --data)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_evaluate)

    from .mcu import add_cli_parser as add_mcu_export

    add_mcu_export(sub)
    from .fleet_cli import add_cli_parser as add_fleet

    add_fleet(sub)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.debug:
        warnings.formatwarning = lambda msg, category, *rest: f"warning: {msg}\n"
    if getattr(args, "command", None) == "search" and getattr(args, "calib", None) is None:
        args.calib = args.data
    try:
        from .outputs import check_cli_outputs

        check_cli_outputs(args)
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # one clear line for users; --debug shows the traceback
        if args.debug:
            raise
        print(f"tinytrain {args.command}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

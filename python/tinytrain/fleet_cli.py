"""`tinytrain fleet ...`: federated sparse training with Flower from the command line.

- ``simulate``: a federation of simulated devices on this machine (Flower's simulation engine).
- ``prepare``: the demo fleet's files (int8 model, plan, per-device data, test data) for a deployment.
- ``server``: a Flower SuperLink plus the tinytrain ServerApp run on it; waits for the run, reports.
- ``client``: a Flower SuperNode whose ClientApp trains this device's plan on its data.

Flower is imported only when a sub-command runs, so ``tinytrain --help`` works without it.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter, defaultdict
from typing import Dict, List, Mapping, Optional


def _fleet():
    from . import fleet  # raises ImportError naming `pip install 'tinytrain-mcu[fleet]'`

    return fleet


def _need_flower() -> None:
    """The process orchestrating SuperLink / SuperNode does not import Flower itself (its import
    leaves a non-daemon thread behind that would keep this process alive after the node stops)."""
    import importlib.util

    if importlib.util.find_spec("flwr") is None:
        raise ImportError("tinytrain fleet needs Flower (flwr with its simulation engine): pip install 'tinytrain-mcu[fleet]'")


def _print_json(obj) -> None:
    print(json.dumps(obj, default=lambda o: o.item() if hasattr(o, "item") else str(o)))


def run_problems(hist: Mapping[str, object]) -> List[str]:
    """One line per round in which a device failed or an update was rejected: how many, and why
    (each distinct reason with its count), and whether the round changed the global model."""
    seen: Dict[int, Dict[str, Counter]] = defaultdict(lambda: {"failed": Counter(), "rejected": Counter()})
    for what in ("failed", "rejected"):
        for row in hist.get(what, []):
            seen[int(row["round"])][what][str(row["reason"])] += 1
    stalled = set(int(r) for r in hist.get("rounds_without_update", []))
    lines = []
    for r in sorted(set(seen) | stalled):
        parts = []
        for what, label in (("failed", "device(s) failed"), ("rejected", "update(s) rejected")):
            reasons = seen[r][what]
            if reasons:
                parts.append(f"{sum(reasons.values())} {label} ("
                             + "; ".join(f"{n}x {reason}" if n > 1 else reason for reason, n in reasons.most_common())
                             + ")")
        if r in stalled:
            parts.append("no valid update: the global model did not change")
        lines.append(f"round {r}: " + ", ".join(parts))
    return lines


def _report_problems(hist, rounds: int) -> int:
    """Says on stderr how many devices failed or sent an update the server refused, and why; the
    exit code: 1 when a round had no valid update (the run did not do what it was asked), else 0."""
    lines = run_problems(hist)
    for line in lines:
        print(f"tinytrain fleet: {line}", file=sys.stderr)
    stalled = list(hist.get("rounds_without_update", []))
    if stalled:
        print(f"tinytrain fleet: error: {len(stalled)} of {rounds} round(s) had no valid update "
              f"(round(s) {', '.join(map(str, stalled))}): the global model did not learn from them", file=sys.stderr)
        return 1
    return 0


# ---------------------------------------------------------------------- simulate
def cmd_simulate(args: argparse.Namespace) -> int:
    fleet = _fleet()
    from .progress import progress_bar
    from .units import format_bytes

    t0 = time.perf_counter()
    # a bad setting fails here, before the search
    cfg = fleet.RunConfig(rounds=args.rounds, epochs=args.epochs, fraction_train=args.fraction,
                          min_train_nodes=max(1, int(args.fraction * args.clients)),
                          min_available_nodes=args.clients, seed=args.seed, server_lr=args.server_lr,
                          server_momentum=args.server_momentum,
                          rounds_per_epoch=args.rounds_per_epoch, lr_decay=args.lr_decay, method=args.method,
                          aggregation=args.aggregation, max_samples_per_client=args.max_samples)
    plan, (x, y), test = fleet.demo_setup(args.scheme, args.budget, args.seed, args.workers, args.update_budget)
    layout = fleet.Layout(plan)
    parts = fleet.partition(y, args.clients, args.partition, seed=args.seed)
    setup_s = time.perf_counter() - t0
    with progress_bar("federated rounds", args.rounds, enabled=not args.json) as advance:
        def on_round(r: int, m: Dict[str, float]) -> None:
            if r > 0:
                advance(1, round=r, accuracy=float(m.get("accuracy", float("nan"))))

        hist = fleet.simulate(plan, x, y, parts, cfg, test=test, lr=args.lr, on_round=on_round, verbose=args.verbose)
    wall = time.perf_counter() - t0 - setup_s
    sparse = layout.nbytes
    # the download: the global parameters, and with SCAFFOLD the control variate (int8 + a float32 scale each)
    download = sparse + (sum(math.prod(e.shape) + 4 for e in layout.entries) if args.method == "scaffold" else 0)
    full_int8 = layout.model_bytes()
    full_fp32 = 4 * layout.model_params()
    report = {
        "clients": args.clients, "rounds": args.rounds, "partition": args.partition, "epochs_per_round": args.epochs,
        "rounds_per_epoch": args.rounds_per_epoch, "lr": args.lr, "lr_decay": args.lr_decay, "server_lr": args.server_lr,
        "server_momentum": args.server_momentum, "method": args.method,
        "samples_per_client": [int(len(p)) for p in parts], "scheme": layout.scheme.to_dict(),
        "accuracy": hist["accuracy"], "accepted": hist["accepted"], "rejected": hist["rejected"], "failed": hist["failed"],
        "rounds_without_update": hist["rounds_without_update"], "aggregation": args.aggregation,
        "max_samples_per_client": hist["max_samples_per_client"],
        "update_bytes": sparse, "update_bytes_on_the_wire": fleet.record_bytes(hist["params"]),
        "full_int8_model_bytes": full_int8, "full_fp32_model_bytes": full_fp32,
        "int8_model_over_update": full_int8 / sparse, "fp32_model_over_update": full_fp32 / sparse,
        "download_bytes": download, "int8_model_over_download": full_int8 / download,
        "peak_sram_bytes": plan.memory.peak_bytes, "seconds": {"setup": round(setup_s, 2), "federation": round(wall, 2)},
    }
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        try:
            from .plots import fleet_accuracy_plot

            label = "sparse int8 FedAvg" + (" + SCAFFOLD" if args.method == "scaffold" else "")
            report["plot"] = fleet_accuracy_plot({f"{args.clients} devices, {label}": hist["accuracy"]},
                                                 os.path.join(args.out, "fleet_accuracy.png"))
        except ImportError as exc:
            report["plot"] = f"skipped: {exc}"
        from .fileio import write_atomic

        write_atomic(os.path.join(args.out, "fleet.json"), json.dumps(report, default=float))
    if args.json:
        code = _report_problems(hist, args.rounds)  # on stderr, before the JSON: its last line stays the report
        _print_json(report)
        return code
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"tinytrain fleet: {args.clients} simulated devices, {args.partition}, {args.rounds} rounds")
    t.add_column("round", justify="right")
    t.add_column("test accuracy", justify="right")
    t.add_column("updates averaged", justify="right")
    for r, a in enumerate(hist["accuracy"]):
        t.add_row(str(r) if r else "0 (before)", f"{100 * a:.1f} %", str(hist["accepted"].get(r, "-")))
    console = Console()
    console.print(t)
    s = Table(show_header=False)
    for k, v in [
        ("update per device per round", f"{format_bytes(sparse)} ({len(layout.entries)} arrays: int8 weights of "
                                        f"the updated channels, int32 biases)"),
        ("download per device per round", f"{format_bytes(download)} ({full_int8 / download:.1f}x fewer than the "
                                          f"whole int8 model" + (", with the control variate)" if args.method == "scaffold"
                                                                  else ")")),
        ("whole int8 model", f"{format_bytes(full_int8)} ({full_int8 / sparse:.1f}x the update)"),
        ("fp32 FedAvg of the whole model", f"{format_bytes(full_fp32)} ({full_fp32 / sparse:.1f}x the update)"),
        ("peak SRAM of a device's training step", format_bytes(plan.memory.peak_bytes)),
        ("aggregation", args.aggregation),
        ("rejected updates", str(len(hist["rejected"]))),
        ("failed devices (no reply)", str(len(hist["failed"]))),
        ("time (s)", f"setup {setup_s:.1f}, federation {wall:.1f}"),
    ] + ([("plot", str(report["plot"]))] if "plot" in report else []):
        s.add_row(k, v)
    console.print(s)
    return _report_problems(hist, args.rounds)


# ---------------------------------------------------------------------- prepare
def cmd_prepare(args: argparse.Namespace) -> int:
    fleet = _fleet()
    import numpy as np

    from .fileio import write_atomic

    plan, (x, y), (xt, yt) = fleet.demo_setup(args.scheme, args.budget, args.seed, args.workers, args.update_budget)
    os.makedirs(args.out, exist_ok=True)
    files = {"model": os.path.join(args.out, "model_int8.onnx"), "plan": os.path.join(args.out, "plan.ttp"),
             "test": os.path.join(args.out, "test.npz")}
    plan.model.to_onnx(files["model"])
    plan.save(files["plan"])
    np.savez(files["test"], X=xt, Y=yt)
    clients = []
    for i, p in enumerate(fleet.partition(y, args.clients, args.partition, seed=args.seed)):
        path = os.path.join(args.out, f"client_{i}.npz")
        np.savez(path, X=x[p], Y=y[p])
        clients.append(path)
    manifest = {**files, "clients": clients, "scheme": fleet.Layout(plan).scheme.to_dict(), "plan_tag": fleet.plan_tag(plan)}
    write_atomic(os.path.join(args.out, "fleet.json"), json.dumps(manifest))
    if args.json:
        _print_json(manifest)
    else:
        print(f"wrote {args.out}: model_int8.onnx, plan.ttp, test.npz and {len(clients)} client_<i>.npz "
              f"({args.partition}); start `tinytrain fleet server --plan {files['plan']} --model {files['model']}` "
              f"and one `tinytrain fleet client --server HOST:PORT --plan {files['plan']} --data client_<i>.npz` "
              "per device")
    return 0


# ---------------------------------------------------------------------- processes
def _free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _flower_bin(name: str) -> str:
    # the console scripts installed with flwr, beside the running interpreter
    here = os.path.join(os.path.dirname(sys.executable), name)
    found = here if os.path.exists(here) else shutil.which(name)
    if not found:
        raise FileNotFoundError(f"{name} not found: pip install 'tinytrain-mcu[fleet]'")
    return found


def _env(home: str) -> Dict[str, str]:
    env = dict(os.environ)
    env["FLWR_HOME"] = home
    env["FLWR_DISABLE_UPDATE_CHECK"] = "1"
    env["FLWR_TELEMETRY_ENABLED"] = "0"
    # the Flower subprocesses (ServerApp, ClientApp) import tinytrain as this process does
    pkg_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join([pkg_root] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    return env


def _stop(proc: Optional[subprocess.Popen]) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


_APP_TOML = """[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "tinytrain-fleet"
version = "1.0.0"
description = "tinytrain: federated sparse int8 training"
license = "Apache-2.0"
dependencies = []

[tool.flwr.app]
publisher = "tinytrain"

[tool.flwr.app.components]
serverapp = "tinytrain.fleet:SERVER_APP"
clientapp = "{clientapp}"

[tool.flwr.app.config]
{config}
"""


def _toml_value(v) -> str:
    return json.dumps(v) if isinstance(v, str) else ("true" if v is True else "false" if v is False else repr(v))


def cmd_server(args: argparse.Namespace) -> int:
    _need_flower()
    from .progress import progress_bar

    # a bad setting fails here, not in the ServerApp after the SuperLink started
    _fleet().RunConfig(rounds=args.rounds, rounds_per_epoch=args.rounds_per_epoch, server_momentum=args.server_momentum,
                       aggregation=args.aggregation, max_samples_per_client=args.max_samples)
    work = tempfile.mkdtemp(prefix="tinytrain-fleet-server-")
    out = os.path.abspath(args.result or os.path.join(work, "result.json"))
    progress = os.path.abspath(args.progress or os.path.join(work, "progress.jsonl"))
    config = {
        "plan": os.path.abspath(args.plan), "model": os.path.abspath(args.model),
        "test-data": os.path.abspath(args.test_data) if args.test_data else "",
        "rounds": args.rounds, "epochs": args.epochs, "batch-size": 1, "fraction-train": args.fraction,
        "min-clients": args.min_clients, "wait-clients": args.wait_clients or args.min_clients,
        "min-valid": args.min_valid, "fraction-evaluate": args.fraction_evaluate, "round-timeout": args.round_timeout,
        "seed": args.seed, "server-lr": args.server_lr,
        "server-momentum": args.server_momentum, "lr-decay": args.lr_decay, "method": args.method,
        "rounds-per-epoch": args.rounds_per_epoch, "out": out, "progress": progress,
        "aggregation": args.aggregation, "max-samples": args.max_samples or 0,
        "output": os.path.abspath(args.output) if args.output else "",
    }
    for k in ("plan", "model"):
        if not os.path.exists(config[k]):
            raise FileNotFoundError(f"{config[k]}: no such {k} file")
    app = os.path.join(work, "app")
    os.makedirs(app)
    with open(os.path.join(app, "pyproject.toml"), "w", encoding="utf-8") as f:
        f.write(_APP_TOML.format(clientapp=args.client_app,
                                 config="\n".join(f'"{k}" = {_toml_value(v)}' for k, v in config.items())))
    port = args.port or _free_port(args.host)
    with open(os.path.join(work, "config.toml"), "w", encoding="utf-8") as f:
        f.write(f'[superlink]\ndefault = "tinytrain"\n\n[superlink.tinytrain]\naddress = "127.0.0.1:{port}"\n'
                "insecure = true\n")
    env = _env(work)
    log_path = os.path.join(work, "superlink.log")
    link = run = None
    say = (lambda *a: None) if args.json else (lambda *a: print(*a, file=sys.stderr, flush=True))
    try:
        with open(log_path, "wb") as log:
            link = subprocess.Popen([_flower_bin("flower-superlink"), "--insecure", "--host", args.host, "--port",
                                     str(port), "--disable-runtime-dependency-installation"],
                                    env=env, stdout=log, stderr=subprocess.STDOUT)
        _wait_http(f"http://127.0.0.1:{port}/health", link, log_path, timeout=60)
        say(f"tinytrain fleet server: Flower SuperLink on {args.host}:{port}; waiting for "
            f"{config['wait-clients']} client(s) (tinytrain fleet client --server HOST:{port} ...)")
        run_log = os.path.join(work, "run.log")
        with open(run_log, "wb") as rl:
            run = subprocess.Popen([_flower_bin("flwr"), "run", app, "tinytrain", "--stream"], env=env, cwd=work,
                                   stdout=rl, stderr=subprocess.STDOUT)
        seen = 0
        with progress_bar("federated rounds", args.rounds, enabled=not args.json) as advance:
            while not os.path.exists(out):
                if run.poll() is not None and not os.path.exists(out):
                    raise RuntimeError(f"the Flower run ended without a result; see {run_log} and {log_path}:\n"
                                       + _tail(run_log) + _tail(log_path))
                if os.path.exists(progress):
                    with open(progress, encoding="utf-8") as f:
                        rows = [json.loads(line) for line in f if line.strip()]
                    for row in rows[seen:]:
                        if row["round"] > 0:
                            advance(1, round=row["round"], **({"accuracy": row["accuracy"]} if "accuracy" in row else {}))
                    seen = len(rows)
                time.sleep(0.3)
        with open(out, encoding="utf-8") as f:
            result = json.load(f)
        if "error" in result:
            raise RuntimeError(f"the ServerApp failed: {result['error']}")
        run.wait(30)
    finally:
        _stop(run)
        _stop(link)
    result.update({"superlink_port": port, "log": run_log, "result": out})
    code = _report_problems(result, args.rounds)
    if args.json:
        _print_json(result)
    else:
        acc = result.get("accuracy") or []
        if acc:
            print("test accuracy per round: " + ", ".join(f"{100 * a:.1f} %" for a in acc))
        print(f"updates averaged per round: {result['accepted']}; rejected: {len(result['rejected'])}; "
              f"failed devices: {len(result['failed'])} (each with its reason below and in --result)")
        if args.output:
            print(f"wrote {args.output}: the global int8 model (QDQ ONNX)")
    return code


def _tail(path: str, n: int = 30) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return "".join(f.readlines()[-n:])
    except OSError:
        return ""


def _wait_http(url: str, proc: subprocess.Popen, log_path: str, timeout: float) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"the Flower SuperLink exited with code {proc.returncode}:\n{_tail(log_path)}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.3)
    raise TimeoutError(f"the Flower SuperLink did not answer {url} within {timeout:g} s")


def cmd_client(args: argparse.Namespace) -> int:
    _need_flower()
    for k in ("plan", "data"):
        if not os.path.exists(getattr(args, k)):
            raise FileNotFoundError(f"{getattr(args, k)}: no such {k} file")
    home = tempfile.mkdtemp(prefix="tinytrain-fleet-client-")
    node = {"plan": os.path.abspath(args.plan), "data": os.path.abspath(args.data), "seed": args.seed}
    if args.lr is not None:
        node["lr"] = args.lr
    for item in args.node_config or []:
        k, sep, v = item.partition("=")
        if not sep or not k:
            raise ValueError(f"--node-config takes KEY=VALUE, got {item!r}")
        node[k] = v
    cmd = [_flower_bin("flower-supernode"), "--insecure", "--superlink", args.server,
           "--port", str(args.port or _free_port()),
           "--node-config", " ".join(f"{k}={_toml_value(v)}" for k, v in node.items())]
    if args.max_wait_time is not None:
        cmd += ["--max-wait-time", str(args.max_wait_time)]
    proc = subprocess.Popen(cmd, env=_env(home))
    stopped = []

    def forward(signum, frame):
        # Only signal the SuperNode here: the interrupted proc.wait() below holds Popen's wait
        # lock, so waiting inside the handler would deadlock; that wait returns once it exits.
        stopped.append(signum)
        proc.terminate()

    signal.signal(signal.SIGTERM, forward)
    try:
        code = proc.wait()
        return 128 + stopped[0] if stopped else code
    except KeyboardInterrupt:
        _stop(proc)
        return 130
    finally:  # the node's Flower home holds only the installed app
        shutil.rmtree(home, ignore_errors=True)


# ---------------------------------------------------------------------- parser
def add_cli_parser(sub) -> None:
    p = sub.add_parser("fleet", help="federated sparse training with Flower: simulate, prepare, server, client")
    fs = p.add_subparsers(dest="fleet_command", required=True)

    def demo_options(q: argparse.ArgumentParser) -> None:
        q.add_argument("--scheme", default="searched",
                       help="searched (tt.search under --budget, as the demo) | full | bias | last:K | paper | FILE.json")
        q.add_argument("--budget", default="256KB", help="SRAM budget of a device's training step")
        q.add_argument("--update-budget", default="20x",
                       help="bytes one update may carry, for --scheme searched: a size (800B), NX, N times "
                            "fewer than the whole int8 model (default 20x), or none (bounded by --budget only)")
        q.add_argument("--partition", default="dirichlet:0.3", help="iid | dirichlet:ALPHA (label skew)")
        q.add_argument("--seed", type=int, default=0)
        q.add_argument("--workers", type=int, default=None, help="parallel fine-tunes of the scheme search")
        q.add_argument("--json", action="store_true")


    def server_options(q: argparse.ArgumentParser) -> None:
        q.add_argument("--aggregation", default="mean",
                       help="how the server combines the valid updates: mean (FedAvg, weighted by sample count) | "
                            "median | trimmed:BETA (coordinate-wise trimmed mean, e.g. trimmed:0.2) | krum:F "
                            "(Multi-Krum, F devices assumed hostile) | clip:C (each step and sample count bounded "
                            "to C times the round's median, e.g. clip:2): the robust ones bound what one device can do")
        q.add_argument("--max-samples", type=int, default=None,
                       help="the largest sample count a device may report for a round; a reply above it is rejected "
                            "(default: the largest device's samples x epochs in simulate, 2^32-1 for a server)")

    q = fs.add_parser("simulate", help="a federation of simulated devices on this machine (Flower simulation engine)")
    q.add_argument("--clients", type=int, default=20)
    q.add_argument("--rounds", type=int, default=10)
    q.add_argument("--epochs", type=int, default=1, help="local epochs per round")
    q.add_argument("--rounds-per-epoch", type=int, default=1,
                   help="K > 1: each round trains on the next 1/K of a device's data (K rounds per epoch)")
    q.add_argument("--lr", type=float, default=None, help="device learning rate (default: the plan's)")
    q.add_argument("--fraction", type=float, default=1.0, help="fraction of the devices trained per round")
    q.add_argument("--server-lr", type=float, default=1.0, help="server step toward the devices' mean (1: FedAvg)")
    q.add_argument("--server-momentum", type=float, default=0.0,
                   help="FedAvgM: the server's momentum beta in [0, 1) over its steps (0: none)")
    q.add_argument("--lr-decay", choices=("none", "linear"), default="none",
                   help="the devices' learning-rate schedule: linear decays it over the run's epochs of data")
    q.add_argument("--method", choices=("fedavg", "scaffold"), default="fedavg",
                   help="fedavg, or scaffold: FedAvg with SCAFFOLD's drift correction (the server also sends its "
                        "control variate, int8: the download doubles, the upload does not change)")
    q.add_argument("--out", default="tinytrain-fleet", help="folder for the plot and the JSON report")
    q.add_argument("--verbose", action="store_true", help="show Flower's and Ray's logs")
    server_options(q)
    demo_options(q)
    q.set_defaults(func=cmd_simulate)

    q = fs.add_parser("prepare", help="the demo fleet's files for a deployment: model, plan, test and per-device data")
    q.add_argument("--out", required=True)
    q.add_argument("--clients", type=int, default=4)
    demo_options(q)
    q.set_defaults(func=cmd_prepare)

    q = fs.add_parser("server", help="a Flower SuperLink running the tinytrain ServerApp (SparseFedAvg)")
    q.add_argument("--plan", required=True, help="the devices' plan (.ttp)")
    q.add_argument("--model", required=True, help="the int8 model the plan was compiled from (QDQ ONNX)")
    q.add_argument("--test-data", help=".npz with X and Y: centralized test accuracy of the global model per round")
    q.add_argument("--rounds", type=int, default=10)
    q.add_argument("--epochs", type=int, default=1, help="local epochs per round")
    q.add_argument("--min-clients", type=int, default=2,
                   help="Flower's minimum of available and sampled clients per round")
    q.add_argument("--wait-clients", type=int, default=None, help="clients to wait for before round 1 (default: --min-clients)")
    q.add_argument("--min-valid", type=int, default=1, help="valid updates a round needs to change the global model")
    q.add_argument("--fraction", type=float, default=1.0, help="fraction of the connected clients trained per round")
    q.add_argument("--rounds-per-epoch", type=int, default=1,
                   help="K > 1: each round a device trains on the next 1/K of its data (K rounds per epoch)")
    q.add_argument("--server-lr", type=float, default=1.0, help="server step toward the devices' mean (1: FedAvg)")
    q.add_argument("--server-momentum", type=float, default=0.0,
                   help="FedAvgM: the server's momentum beta in [0, 1) over its steps (0: none)")
    q.add_argument("--lr-decay", choices=("none", "linear"), default="none",
                   help="the devices' learning-rate schedule: linear decays it over the run's epochs of data")
    q.add_argument("--method", choices=("fedavg", "scaffold"), default="fedavg",
                   help="fedavg, or scaffold: FedAvg with SCAFFOLD's drift correction (the server also sends its "
                        "control variate, int8: the download doubles, the upload does not change)")
    q.add_argument("--fraction-evaluate", type=float, default=0.0, help="fraction evaluating on their own data per round")
    q.add_argument("--round-timeout", type=float, default=600.0,
                   help="seconds a round waits for replies; a silent (dead) client is left out after it")
    q.add_argument("--host", default="0.0.0.0", help="address the SuperLink listens on")
    q.add_argument("--port", type=int, default=9092, help="SuperLink port (0: a free one)")
    q.add_argument("--client-app", default="tinytrain.fleet:CLIENT_APP", help="the ClientApp the devices run (module:attr)")
    q.add_argument("--result", help="write the run's JSON result here")
    q.add_argument("--progress", help="append one JSON line per finished round here (for monitoring)")
    q.add_argument("-o", "--output", help="write the global int8 model (QDQ ONNX) here")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--json", action="store_true")
    server_options(q)
    q.set_defaults(func=cmd_server)

    q = fs.add_parser("client", help="a Flower SuperNode: this device trains its plan on its data each round")
    q.add_argument("--server", required=True, help="the SuperLink as HOST:PORT")
    q.add_argument("--plan", required=True, help="the plan the server averages (.ttp)")
    q.add_argument("--data", required=True, help=".npz with X and Y: this device's samples")
    q.add_argument("--lr", type=float, default=None)
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--port", type=int, default=0, help="the SuperNode's local ClientApp port (0: a free one)")
    q.add_argument("--max-wait-time", type=float, default=None, help="give up after this many seconds without the server")
    q.add_argument("--node-config", action="append", metavar="KEY=VALUE",
                   help="extra node config for a custom ClientApp (the server's --client-app); repeatable")
    q.set_defaults(func=cmd_client)

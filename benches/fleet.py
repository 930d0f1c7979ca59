"""Fleet benchmark: do devices that share only their sparse int8 updates learn as well as pooling
their data, and how many bytes does a round cost?

Task: the demo model (`tt.models.demo()`, pretrained on digits 0-4, quantized as `tinytrain demo`
does) learns digits 5-9. The target train split is dealt to 20 devices by a Dirichlet(0.3) label
skew (most devices see one or two of the five new digits); accuracy is on the target test split.
For each scheme, with the same plan and epochs (every sample is seen R times), and each method's
learning rate chosen on a validation split (20 % of the target train split, stratified, never the
test split) from ``--lrs`` (for (b) from ``--federated-lrs`` if given, and the server step of (b) from
``--server-lrs``; 1 is plain FedAvg; ``--server-momentum`` beta makes it FedAvgM):

  (a) local only:   every device trains alone for R epochs; the mean test accuracy over devices
  (b) federated:    R rounds of one local epoch, SparseFedAvg (Flower's simulation engine); with
                    ``--method scaffold`` FedAvg with SCAFFOLD's drift correction
  (c) centralized:  one device trains on the union of the data for R epochs

Bytes per device per round: the upload (the sparse update's parameters: int8 weights of the trained
channels + int32 biases; its update blob with header, section headers and CRC; what Flower carries,
.npy per array) and the download (the global parameters, plus with SCAFFOLD the control variate:
int8 values and a float32 scale per parameter), against the whole int8 model and fp32 FedAvg of the
whole model, each direction and both together.

    python benches/fleet.py [--clients 20] [--rounds 10] [--alpha 0.3] [--schemes searched,...]
        [--update-budget 20x] [--json]
    python benches/fleet.py --combine seed0.json seed1.json seed2.json [--json] [--plot mean.png]

Schemes: ``searched`` (the demo's: `tt.search` under 256 KB), ``searched@16KB`` (the search under a
16 KB SRAM budget), ``classifier`` (the classifier's weights and bias: the smallest the search can
give without ``--update-budget``), ``classifier-half-in`` (half of the classifier's input channels and its
bias, hand-made). ``--update-budget`` bounds the bytes of a searched scheme's update (``20x``: 20 times
fewer than the whole int8 model), the classifier's input channels then searched too.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings

import numpy as np

import tinytrain as tt
from tinytrain import fleet


def make_scheme(name: str, q, x, y, seed: int, update_budget=None) -> tt.Scheme:
    if name.startswith("searched"):
        budget = name.split("@")[1] if "@" in name else "256KB"
        return tt.search(q, x[:320], y[:320], budget=budget, population=24, generations=12, seed=seed, epochs=1,
                         max_update_bytes=fleet.update_limit(update_budget, q.weight_bytes())).scheme
    if name == "classifier":
        return tt.Scheme(["fc_0"], {"fc_0": 1.0}, name="classifier")
    if name == "classifier-half-in":
        return tt.Scheme(["fc_0"], {"fc_0": 0.5}, {"fc_0": "input"}, name="classifier-half-in")
    raise ValueError(f"unknown scheme {name!r}")


def local_only(plan, shards, sets, rounds, lr, seed, decay="none", every_epoch=True):
    """Mean over devices of the accuracy on each of ``sets`` after every epoch (``every_epoch``)
    or after the last one only."""
    # Every row uses the same learning rate grid; a device with a handful of samples can trip fit's
    # divergence alarm, and this row reports the accuracy it reaches anyway.
    warnings.filterwarnings("ignore", "training diverged", RuntimeWarning)
    curves = []
    for i, (x, y) in enumerate(shards):
        tr = tt.Trainer(plan, lr=lr)
        acc = [[tr.evaluate(*s) for s in sets]] if every_epoch else []
        for r in range(rounds):
            tr.lr = lr * fleet.lr_scale(decay, r, rounds)
            tr.fit(x, y, epochs=1, seed=seed * 1009 + i + 7919 * r, verbose=False)
            if every_epoch or r == rounds - 1:
                acc.append([tr.evaluate(*s) for s in sets])
        curves.append(acc)
    return np.mean(curves, axis=0).T.tolist()  # [set][round]


def centralized(plan, x, y, sets, rounds, lr, seed, decay="none", every_epoch=True):
    warnings.filterwarnings("ignore", "training diverged", RuntimeWarning)
    tr = tt.Trainer(plan, lr=lr)
    acc = [[tr.evaluate(*s) for s in sets]] if every_epoch else []
    for r in range(rounds):
        tr.lr = lr * fleet.lr_scale(decay, r, rounds)
        tr.fit(x, y, epochs=1, seed=seed + 7919 * r, verbose=False)
        if every_epoch or r == rounds - 1:
            acc.append([tr.evaluate(*s) for s in sets])
    return np.asarray(acc).T.tolist()


def chosen_run(run, lrs, val, test):
    """``run(lr, sets, every_epoch)`` for every rate, judged on ``val`` after the last epoch only;
    then the best rate again with ``[val, test]`` after every epoch. Training is deterministic (the
    seeds fix the order and the plan's seed the rounding), so the re-run is the chosen run itself;
    evaluating every device on the test set every epoch for every rate was most of the bench's time."""
    finals = {lr: run(lr, [val], False)[0][-1] for lr in lrs}
    best = max(lrs, key=lambda lr: finals[lr])
    curves = run(best, [val, test], True)
    if not np.isclose(curves[0][-1], finals[best], rtol=0, atol=1e-9):  # a mean over devices: summation order
        raise RuntimeError(f"re-running lr={best} gave validation accuracy {curves[0][-1]}, not {finals[best]}")
    return curves + [best]


def federated(plan, x, y, parts, val, test, rounds, lr, server_lr, seed, per_epoch=1, decay="none", method="fedavg",
              momentum=0.0):
    """``rounds`` epochs of each device's data in ``rounds * per_epoch`` rounds; the test accuracy
    after each epoch (every ``per_epoch``-th round)."""
    cfg = fleet.RunConfig(rounds=rounds * per_epoch, epochs=1, rounds_per_epoch=per_epoch, min_train_nodes=len(parts),
                          min_available_nodes=len(parts), seed=seed, server_lr=server_lr, lr_decay=decay, method=method,
                          server_momentum=momentum)
    hist = fleet.simulate(plan, x, y, parts, cfg, test=test, lr=lr)
    hist["per_round"] = hist["accuracy"]
    hist["accuracy"] = hist["accuracy"][::per_epoch]
    lay = fleet.Layout(plan)
    final = lay.apply(lay.model, hist["params"])
    return hist, float((final.predict(val[0]) == val[1]).mean())


def split_validation(x, y, fraction, seed):
    """A stratified hold-out of the devices' data for choosing learning rates (never the test set)."""
    rng = np.random.default_rng(seed + 99)
    val = np.concatenate([rng.permutation(np.flatnonzero(y == c))[: int(round(fraction * (y == c).sum()))]
                          for c in np.unique(y)])
    keep = np.setdiff1d(np.arange(len(y)), val)
    return (x[keep], y[keep]), (x[val], y[val])


def combine(paths) -> dict:
    """Seeds run apart (``--json``, one ``--first-seed`` each, in parallel) summed up: per seed (a),
    (b) with its own setting, (b) with the one setting whose validation accuracy is best on average
    over the seeds, and (c); their mean and spread, and (c) - (b)."""
    runs = [json.load(open(p)) for p in paths]
    rows = [r["rows"][0] for r in runs]
    if len({(r["scheme"], r["method"], d["rounds"], d["rounds_per_epoch"], d.get("server_momentum", 0.0))
            for r, d in zip(rows, runs)}) != 1:
        raise SystemExit("--combine: the files are not runs of the same scheme, method, server momentum and rounds")
    seeds = [s for r in rows for s in r["seeds"]]
    labels = set(seeds[0]["validation_final"]["federated"])
    if any(set(s["validation_final"]["federated"]) != labels for s in seeds):
        raise SystemExit("--combine: the runs tried different (b) settings")
    mean_val = {k: float(np.mean([s["validation_final"]["federated"][k] for s in seeds])) for k in sorted(labels)}
    shared = max(mean_val, key=mean_val.get)

    def shared_curve(s):
        if shared in s.get("federated_runs", {}):
            return s["federated_runs"][shared]
        chosen = s["chosen"]["federated"]
        if f"lr={chosen['lr']},server_lr={chosen['server_lr']}" == shared:
            return s["federated"]
        raise SystemExit(f"--combine: a run without every setting's curve did not choose {shared}")

    per_epoch = {"local_only": [s["local_only"] for s in seeds], "federated_own_setting": [s["federated"] for s in seeds],
                 "federated_shared_setting": [shared_curve(s) for s in seeds],
                 "centralized": [s["centralized"] for s in seeds]}
    fin = {k: [100 * curve[-1] for curve in curves] for k, curves in per_epoch.items()}
    out = {"scheme": rows[0]["scheme"], "method": rows[0]["method"], "shared_setting": shared,
           "mean_validation": mean_val,
           "mean_per_epoch": {k: (100 * np.mean(v, axis=0)).tolist() for k, v in per_epoch.items()},
           "final": fin, "mean": {k: float(np.mean(v)) for k, v in fin.items()},
           "std": {k: float(np.std(v)) for k, v in fin.items()}, "ratios": rows[0]["ratios"]}
    for k in ("federated_own_setting", "federated_shared_setting"):
        gap = np.array(fin["centralized"]) - np.array(fin[k])
        out[f"gap_{k}"] = {"per_seed": gap.tolist(), "mean": float(gap.mean()), "std": float(gap.std())}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--combine", nargs="+", metavar="JSON",
                    help="sum up --json outputs of separate seeds (and nothing else): (b) also with the one "
                         "setting best on validation over all of them")
    ap.add_argument("--clients", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--alpha", type=float, default=0.3)
    ap.add_argument("--lrs", default="0.01,0.02,0.05", help="device learning rates tried (chosen on validation)")
    ap.add_argument("--federated-lrs", default=None,
                    help="device learning rates tried for (b) (default: --lrs); each is a whole Flower simulation, "
                         "while (a) and (c) try every rate of --lrs at the cost of training alone")
    ap.add_argument("--server-lrs", default="1,1.5,2", help="server steps tried for (b) (chosen on validation)")
    ap.add_argument("--server-momentum", type=float, default=0.0,
                    help="(b)'s server momentum beta (FedAvgM; 0: none), the same for every setting tried")
    ap.add_argument("--rounds-per-epoch", type=int, default=1,
                    help="(b) runs --rounds epochs of the devices' data in this many times more rounds, each "
                         "round on 1/K of a device's data (same samples seen as (a) and (c))")
    ap.add_argument("--lr-decay", choices=fleet.LR_DECAYS, default="none",
                    help="learning-rate schedule over the epochs, the same for (a), (b) and (c)")
    ap.add_argument("--method", choices=fleet.METHODS, default="fedavg",
                    help="(b)'s method: plain FedAvg, or with SCAFFOLD's drift correction (the download carries the "
                         "control variate too)")
    ap.add_argument("--seeds", type=int, default=1)
    ap.add_argument("--first-seed", type=int, default=0,
                    help="seeds --first-seed .. --first-seed + --seeds - 1: more seeds later, in a separate run")
    ap.add_argument("--schemes", default="searched,searched@16KB,classifier,classifier-half-in")
    ap.add_argument("--update-budget", default=None,
                    help="bytes an update of a searched scheme may carry: a size (800B) or NX, N times fewer "
                         "than the whole int8 model (20x)")
    ap.add_argument("--plot", help="write the accuracy-per-round plot (PNG) here")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.combine:
        out = combine(args.combine)
        if args.json:
            print(json.dumps(out))
        else:
            print(f"{out['scheme']}, {out['method']}; (b)'s shared setting {out['shared_setting']} "
                  f"(mean validation {out['mean_validation']})")
            for k, v in out["final"].items():
                print(f"  {k:<25}" + " ".join(f"{x:5.1f}" for x in v) +
                      f"   mean {out['mean'][k]:.1f} +- {out['std'][k]:.1f} %")
            for k in ("federated_own_setting", "federated_shared_setting"):
                g = out[f"gap_{k}"]
                print(f"  (c) - (b) {k[10:]:<15}" + " ".join(f"{x:5.1f}" for x in g["per_seed"]) +
                      f"   mean {g['mean']:.1f} +- {g['std']:.1f} points")
            print("test accuracy after each epoch, mean over the seeds (%):")
            for k, v in out["mean_per_epoch"].items():
                print(f"  {k:<25}" + " ".join(f"{x:3.0f}" for x in v))
        if args.plot:
            from tinytrain.plots import fleet_accuracy_plot

            fleet_accuracy_plot({label: [a / 100 for a in out["mean_per_epoch"][k]] for k, label in [
                ("local_only", "(a) local only"), ("federated_own_setting", "(b) federated sparse"),
                ("centralized", "(c) centralized")]}, args.plot,
                title=f"mean of {len(out['final']['centralized'])} seeds, scheme {out['scheme']}", xlabel="epoch of data")
        return 0
    os.environ.setdefault("TINYTRAIN_PROGRESS", "0")

    q = tt.quantize(tt.load_onnx(tt.models.demo()), tt.datasets.digits("source", "train")[0][:256])
    x, y = tt.datasets.digits("target", "train")
    test = tt.datasets.digits("target", "test")
    (x, y), val = split_validation(x, y, 0.2, 0)
    lrs = [float(v) for v in args.lrs.split(",")]
    server_lrs = [float(v) for v in args.server_lrs.split(",")]
    fed_lrs = [float(v) for v in (args.federated_lrs or args.lrs).split(",")]
    rows = []
    for name in args.schemes.split(","):
        scheme = make_scheme(name, q, x, y, 0, args.update_budget)
        if name.startswith("searched") and args.update_budget:
            name = f"{name} (update <= {args.update_budget})"
        plan = tt.compile(q, scheme, budget="256KB")
        layout = fleet.Layout(plan)
        blob = len(tt.Trainer(plan).export_update(0))
        per_seed = []
        for seed in range(args.first_seed, args.first_seed + args.seeds):
            parts = fleet.partition(y, args.clients, f"dirichlet:{args.alpha}", seed=seed)
            shards = [(x[p], y[p]) for p in parts]
            t0 = time.perf_counter()
            # each method gets the learning rate (and server step) whose final validation accuracy is best
            a = chosen_run(lambda lr, sets, every: local_only(plan, shards, sets, args.rounds, lr, seed, args.lr_decay, every),
                           lrs, val, test)
            c = chosen_run(lambda lr, sets, every: centralized(plan, x, y, sets, args.rounds, lr, seed, args.lr_decay, every),
                           lrs, val, test)
            t1 = time.perf_counter()
            runs = [(federated(plan, x, y, parts, val, test, args.rounds, lr, slr, seed, args.rounds_per_epoch,
                               args.lr_decay, args.method, args.server_momentum), lr, slr)
                    for lr in fed_lrs for slr in server_lrs]
            (hist, _), b_lr, b_slr = max(runs, key=lambda r: r[0][1])
            per_seed.append({"local_only": a[1], "federated": hist["accuracy"], "centralized": c[1],
                             "federated_per_round": hist["per_round"],
                             "chosen": {"local_only": {"lr": a[2]}, "centralized": {"lr": c[2]},
                                        "federated": {"lr": b_lr, "server_lr": b_slr}},
                             "validation_final": {"local_only": a[0][-1], "centralized": c[0][-1],
                                                  "federated": {f"lr={lr},server_lr={slr}": v for (_, v), lr, slr in runs}},
                             # every (b) setting's test curve, for choosing one setting for all seeds (--combine)
                             "federated_runs": {f"lr={lr},server_lr={slr}": h["accuracy"] for (h, _), lr, slr in runs},
                             "rejected": len(hist["rejected"]),
                             "seconds": {"local+central": round(t1 - t0, 1), "federated": round(time.perf_counter() - t1, 1)}})
            wire = fleet.record_bytes(hist["params"])
        mean = {k: np.mean([s[k] for s in per_seed], axis=0).tolist() for k in ("local_only", "federated", "centralized")}
        control = ({k: np.zeros(v.shape) for k, v in hist["params"].items()} if args.method == "scaffold" else {})
        down = layout.nbytes + sum(v.size + 4 for v in control.values())  # int8 values + a float32 scale each
        down_wire = wire + (fleet.record_bytes(fleet.from_record(fleet.control_to_record(control))) if control else 0)
        rows.append({
            "scheme": name, "definition": scheme.to_dict(), "peak_sram_bytes": plan.memory.peak_bytes,
            "accuracy": mean, "final": {k: v[-1] for k, v in mean.items()},
            "method": args.method, "server_momentum": args.server_momentum,
            "bytes": {"update_params": layout.nbytes, "update_blob": blob, "flower_wire": wire,
                      "download": down, "download_flower_wire": down_wire,
                      "int8_model": layout.model_bytes(), "fp32_model": 4 * layout.model_params()},
            "ratios": {"int8_model/update": layout.model_bytes() / layout.nbytes,
                       "fp32_model/update": 4 * layout.model_params() / layout.nbytes,
                       "int8_model/update_blob": layout.model_bytes() / blob,
                       "int8_model/download": layout.model_bytes() / down,
                       "int8_model_both_ways/update_and_download": 2 * layout.model_bytes() / (layout.nbytes + down)},
            "seeds": per_seed,
        })
        if not args.json:
            r = rows[-1]
            print(f"{name}: final test accuracy (a) local {100 * r['final']['local_only']:.1f} %  (b) federated "
                  f"{100 * r['final']['federated']:.1f} %  (c) centralized {100 * r['final']['centralized']:.1f} %; "
                  f"chosen {per_seed[-1]['chosen']}; update {layout.nbytes} B (blob {blob} B, Flower {wire} B): "
                  f"int8 model {r['ratios']['int8_model/update']:.1f}x, fp32 model {r['ratios']['fp32_model/update']:.1f}x; "
                  f"(b) {args.method}, server momentum {args.server_momentum}: download {down} B ({r['ratios']['int8_model/download']:.1f}x), both ways "
                  f"{r['ratios']['int8_model_both_ways/update_and_download']:.1f}x fewer than int8 FedAvg",
                  flush=True)
            if args.seeds > 1:
                fin = {k: 100 * np.array([s[k][-1] for s in per_seed]) for k in ("local_only", "federated", "centralized")}
                gap = fin["centralized"] - fin["federated"]
                print("  per seed (a) / (b) / (c): " + ", ".join(
                    f"{a:.1f} / {b:.1f} / {c:.1f}" for a, b, c in zip(*fin.values())) +
                    "; mean +- std " + ", ".join(f"{v.mean():.1f} +- {v.std():.1f}" for v in fin.values()) +
                    f"; (c) - (b) {gap.mean():.1f} +- {gap.std():.1f} points (min {gap.min():.1f}, max {gap.max():.1f})",
                    flush=True)
    if args.plot:
        from tinytrain.plots import fleet_accuracy_plot

        main_row = rows[0]
        fleet_accuracy_plot({f"({k[0]}) {label}": main_row["accuracy"][key] for k, (key, label) in
                             zip("abc", [("local_only", "local only"), ("federated", "federated sparse"),
                                         ("centralized", "centralized")])}, args.plot,
                            title=f"{args.clients} devices, Dirichlet({args.alpha}), scheme {main_row['scheme']}",
                            xlabel="epoch of data")
    if args.json:
        print(json.dumps({"clients": args.clients, "rounds": args.rounds, "rounds_per_epoch": args.rounds_per_epoch,
                          "lr_decay": args.lr_decay, "method": args.method, "server_momentum": args.server_momentum,
                          "alpha": args.alpha, "lrs": lrs, "federated_lrs": fed_lrs,
                          "server_lrs": server_lrs,
                          "seeds": args.seeds, "first_seed": args.first_seed, "rows": rows}))
    else:
        print("\nper round (mean over seeds), (a) local / (b) federated / (c) centralized:")
        for r in rows:
            print(f"  {r['scheme']}:")
            for k in ("local_only", "federated", "centralized"):
                print(f"    {k:<12}" + " ".join(f"{100 * v:5.1f}" for v in r["accuracy"][k]))
    return 0


if __name__ == "__main__":
    sys.exit(main())

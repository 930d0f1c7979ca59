"""Fleet benchmark: one hostile device and one broken device against the server's validation and
robust aggregation.

Task: the demo fleet (`tinytrain fleet simulate`'s task: the demo model, pretrained on digits 0-4,
learns digits 5-9), 10 simulated devices in Flower's simulation engine, a Dirichlet label skew.
Rows, each the test accuracy after every round:

  honest                 10 honest devices, FedAvg (``mean``)
  honest, 8 devices      the 8 devices that stay honest below, alone (FedAvg): the two hostile
                         devices' data never reaches the fleet, which on a label-skewed split can
                         cost accuracy by itself
  poisoned, <agg>        8 honest devices, one poisoning device and one broken device:
                         - the poisoner trains nothing and sends every trained value at its limit
                           (int8 weights +127, biases +2^30 for the first output, -2^30 for the
                           others: well formed, in range) with ``--poison-count`` samples
                           (default 10^15, beyond what a device can have: the server's cap refuses
                           it; ``cap`` is exactly the cap, which passes validation, so only the
                           aggregation stands between it and the model);
                         - the broken device trains honestly but reports a list-valued metric
                           (``train-loss: [1, 2, 3]``), which made Flower's metric aggregation raise.

    python benches/fleet_poison.py [--rounds 5] [--clients 10] [--aggregations mean,median,trimmed:0.2,krum:1,clip:2]
        [--poison-count 1e15|cap] [--scheme last:2] [--json]

The rejected replies and failed devices of each run are counted in the table and listed with
their reasons in ``--json``.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

import numpy as np

import tinytrain as tt
from tinytrain import fleet

_B_LIMIT = 2 ** 30  # the bias bound devices and the server keep (tt-core's BIAS_LIMIT)


class PoisonClient:
    """A device that sends every trained value at its limit and claims ``count`` samples."""

    def __init__(self, plan, count: int) -> None:
        self.plan = plan
        self.count = int(count)

    def fit(self, params, config=None, control=None):
        out = {}
        for k, v in params.items():
            if v.dtype == np.int8:
                out[k] = np.full(v.shape, 127, np.int8)
            else:
                b = np.full(v.shape, -_B_LIMIT, np.int32)
                b[..., :1] = _B_LIMIT
                out[k] = b
        return out, self.count, {"train-loss": 0.0}

    def evaluate(self, params, config=None):
        return 0.0, 1, {"accuracy": 1.0}


class BadMetricClient(fleet.FleetClient):
    """An honest device whose train reply carries a list-valued metric."""

    def fit(self, params, config=None, control=None):
        p, n, metrics = super().fit(params, config, control)
        return p, n, {**metrics, "train-loss": [1, 2, 3]}


def hostile_factory(lr, seed, poison_count, poisoner: int = 0, broken: int = 1):
    """``simulate``'s client_factory: device ``poisoner`` poisons, device ``broken`` sends a bad
    metric, the others are honest `FleetClient`s (seeded as `fleet.simulate` seeds its own)."""

    def make(i, plan, x, y):
        if i == poisoner:
            return PoisonClient(plan, poison_count)
        cls = BadMetricClient if i == broken else fleet.FleetClient
        return cls(plan, x, y, lr=lr, seed=seed * 1009 + i)

    return make


def samples_cap(parts, epochs: int) -> int:
    """The server's cap in `fleet.simulate` (the largest device's samples times the local epochs)."""
    return max(len(p) for p in parts) * epochs


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--clients", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--partition", default="dirichlet:0.3")
    ap.add_argument("--scheme", default="last:2", help="the devices' scheme (fleet.demo_setup); searched is slower")
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--aggregations", default="mean,median,trimmed:0.2,krum:1,clip:2")
    ap.add_argument("--poison-count", default="1e15", help="the poisoner's sample count: a number, or cap")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    os.environ.setdefault("TINYTRAIN_PROGRESS", "0")

    plan, (x, y), test = fleet.demo_setup(args.scheme, seed=args.seed)
    parts = fleet.partition(y, args.clients, args.partition, seed=args.seed)
    cfg = fleet.RunConfig(rounds=args.rounds, min_train_nodes=args.clients, min_available_nodes=args.clients,
                          seed=args.seed)
    count = samples_cap(parts, cfg.epochs) if args.poison_count == "cap" else int(float(args.poison_count))
    runs = ([("honest", "mean", None, parts), (f"honest, {args.clients - 2} devices", "mean", None, parts[2:])]
            + [(f"poisoned, {a}", a, count, parts) for a in args.aggregations.split(",")])
    rows = []
    for label, aggregation, poison, fleet_parts in runs:
        t0 = time.perf_counter()
        n = len(fleet_parts)
        c = dataclasses.replace(cfg, aggregation=aggregation, min_train_nodes=n, min_available_nodes=n,
                                max_samples_per_client=samples_cap(parts, cfg.epochs))
        # the hostile devices are 0 and 1; the 8-device run keeps the others' seeds
        factory = (hostile_factory(args.lr, args.seed, poison) if poison is not None else
                   None if n == len(parts) else
                   (lambda i, p, xs, ys: fleet.FleetClient(p, xs, ys, lr=args.lr, seed=args.seed * 1009 + i + 2)))
        hist = fleet.simulate(plan, x, y, fleet_parts, c, test=test, lr=args.lr, client_factory=factory)
        rows.append({"run": label, "aggregation": aggregation, "poison_count": poison, "accuracy": hist["accuracy"],
                     "accepted": hist["accepted"], "rejected": hist["rejected"], "failed": hist["failed"],
                     "rounds_without_update": hist["rounds_without_update"],
                     "max_samples_per_client": hist["max_samples_per_client"],
                     "seconds": round(time.perf_counter() - t0, 1)})
        if not args.json:
            r = rows[-1]
            print(f"{label:<24} final {100 * r['accuracy'][-1]:5.1f} %  per round "
                  + " ".join(f"{100 * a:4.0f}" for a in r["accuracy"])
                  + f"  rejected {len(r['rejected'])}, failed {len(r['failed'])}  ({r['seconds']} s)", flush=True)
    honest, honest8 = rows[0]["accuracy"][-1], rows[1]["accuracy"][-1]
    for r in rows:
        r["points_below_honest"] = 100 * (honest - r["accuracy"][-1])
        r["points_below_honest_8"] = 100 * (honest8 - r["accuracy"][-1])
    if args.json:
        print(json.dumps({"clients": args.clients, "rounds": args.rounds, "partition": args.partition,
                          "scheme": fleet.Layout(plan).scheme.to_dict(), "poison_count": count, "rows": rows}))
        return 0
    print(f"\n{args.clients} devices, {args.partition}, {args.rounds} rounds, scheme {args.scheme}; poisoner's count "
          f"{count:.3g} (server cap {rows[0]['max_samples_per_client']})")
    print("| run | final test accuracy | points below honest (10 / 8 devices) | rejected replies | failed devices |")
    print("| --- | --- | --- | --- | --- |")
    for r in rows:
        reasons = sorted({x["reason"].split(" (")[0] for x in r["rejected"]})
        print(f"| {r['run']} | {100 * r['accuracy'][-1]:.1f} % | {r['points_below_honest']:.1f} / "
              f"{r['points_below_honest_8']:.1f} | "
              f"{len(r['rejected'])}{' (' + '; '.join(reasons) + ')' if reasons else ''} | {len(r['failed'])} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Sparse-update scheme search: contribution analysis, then evolutionary search under a budget.

Contribution analysis (Lin et al. 2022, Sec. 2.3): starting from the deployed int8 model, each
candidate update is fine-tuned on its own with tt-core's int8 training (QAS SGD) and its held-out
accuracy compared with a baseline that updates only the classifier:

* ``bias_gain[k]``: the biases of the last ``k`` layers (a prefix from the output, as the paper
  observed the gain is in the late layers),
* ``weight_gain[layer][r]``: one layer's weights at channel ratio ``r`` (with its bias).

The evolutionary search then maximises ``bias_gain[k] + sum(weight_gain[layer][r])`` over schemes
whose exact planner peak (``tt.compile``) fits the budget. Both stages are deterministic for a
fixed seed: fine-tunes are independent jobs whose results do not depend on the order in which the
worker processes finish, and the search draws every random number from one seeded generator.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import warnings
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from .fileio import write_atomic
from .trainer import CONSTANT_CLASS, collapse_fix
from .units import parse_bytes

CACHE_FORMAT = 2  # 2: fine-tunes that collapsed are recorded
DEFAULT_RATIOS = (1 / 8, 1 / 4, 1 / 2, 1.0)


@dataclass(frozen=True)
class FineTuneSettings:
    epochs: int = 2
    batch_size: int = 1
    #: a rate, or "auto": each fine-tune chooses its own by `tt.choose_lr` on its training split
    lr: object = 0.05
    val_fraction: float = 0.3

    def key(self) -> str:
        return f"e{self.epochs}-b{self.batch_size}-lr{self.lr!r}-v{self.val_fraction!r}"


@dataclass
class Contributions:
    """Accuracy gains (in points of held-out accuracy) over the classifier-only baseline."""

    layers: List[str]
    ratios: Tuple[float, ...]
    baseline_accuracy: float
    bias_gain: Dict[int, float]
    weight_gain: Dict[str, Dict[float, float]]
    #: Set when the classifier's weights may be partially updated along this axis.
    classifier_axis: Optional[str] = None
    #: The analysis's fine-tunes that collapsed: {"what", "collapse"}.
    collapsed: List[Dict[str, object]] = field(default_factory=list)

    def rows(self, costs: Dict[str, Dict[str, object]]) -> List[Dict[str, object]]:
        """Per layer, input to output: bias gain (prefix ending here), weight gain per ratio, costs."""
        n = len(self.layers)
        out = []
        for i, name in enumerate(self.layers):
            k = n - i
            out.append(
                {
                    "layer": name,
                    "bias_depth": k,
                    "bias_gain": self.bias_gain.get(k, 0.0),
                    "bias_cost_bytes": costs.get(name, {}).get("bias"),
                    "weight_gain": dict(self.weight_gain.get(name, {})),
                    "weight_cost_bytes": dict(costs.get(name, {}).get("weight", {})),
                }
            )
        return out


@dataclass
class SearchResult:
    scheme: object
    peak_bytes: int
    score: float
    budget_bytes: int
    contributions: List[Dict[str, object]]
    pareto: List[Tuple[int, float]]
    evaluated: List[Tuple[int, float]] = field(repr=False, default_factory=list)
    #: The best schemes by summed contribution, each fine-tuned for real: held-out accuracy.
    verified: List[Dict[str, object]] = field(repr=False, default_factory=list)
    #: Bytes of one update of the scheme (`update_bytes`).
    update_bytes: int = 0
    #: The simple schemes that fit the same budget (classifier only, bias only, last k layers for
    #: each k that fits), fine-tuned on the same split: name, scheme, peak_bytes, update_bytes,
    #: accuracy, collapse (None or why). They compete with the verified schemes.
    baselines: List[Dict[str, object]] = field(repr=False, default_factory=list)
    #: What won the held-out comparison: "searched" or a baseline's name.
    winner: str = "searched"
    #: Held-out accuracy of the winner minus the best of the other side (points; the searched
    #: scheme against the best baseline, or the winning baseline against the best searched one).
    margin_points: float = float("nan")
    #: Held-out accuracy of the returned scheme (NaN when nothing was fine-tuned).
    accuracy: float = float("nan")
    #: The rate the returned scheme was fine-tuned at (with ``lr="auto"``: its own range test's
    #: choice, the rate to train it with), and the range test that set the contribution
    #: analysis's rate (None: the rate was given).
    lr: float = float("nan")
    lr_choice: Optional[object] = field(repr=False, default=None)
    #: Fine-tunes that collapsed ({what, collapse, lr, stage}; stage "contribution analysis" or
    #: "verification", the final comparison): a rate too high shows here first.
    collapsed: List[Dict[str, object]] = field(repr=False, default_factory=list)

    def baseline_table(self) -> str:
        """The final comparison as text: every baseline and the searched scheme, best first."""
        rows = [dict(b) for b in self.baselines]
        rows.append({"name": "searched", "peak_bytes": self.peak_bytes, "update_bytes": self.update_bytes,
                     "accuracy": max([v["accuracy"] for v in self.verified if v.get("collapse") is None] or [float("nan")]),
                     "collapse": None if any(v.get("collapse") is None for v in self.verified) else "every candidate"})
        rows.sort(key=lambda r: -(r["accuracy"] if r["accuracy"] == r["accuracy"] else -1.0))
        out = [f"{'scheme':<12}{'peak KB':>9}{'update B':>10}{'accuracy':>10}"]
        for r in rows:
            mark = " <- winner" if r["name"] == self.winner else ""
            acc = "collapsed" if r.get("collapse") else f"{100 * r['accuracy']:.1f} %"
            out.append(f"{r['name']:<12}{r['peak_bytes'] / 1024:>9.1f}{r['update_bytes']:>10}{acc:>10}{mark}")
        return "\n".join(out)

    def plot(self, path: str) -> str:
        """Scatter of every scheme evaluated, the Pareto front and the budget line."""
        from .plots import search_plot

        return search_plot(self, path)


# --------------------------------------------------------------------------- fine-tune jobs


def _scheme(layers: Sequence[str], bias_depth: int, weights: Dict[str, float], axis: Optional[Dict[str, str]] = None):
    from .schemes import Scheme

    classifier = layers[-1]
    bias_layers = list(layers[len(layers) - bias_depth :]) if bias_depth else []
    if classifier not in bias_layers:
        bias_layers.append(classifier)
    for name in weights:
        if name not in bias_layers:
            bias_layers.append(name)
    ratios = {classifier: 1.0, **weights}
    return Scheme(bias_layers=bias_layers, weight_ratios=ratios, channel_axis=axis or {})


def update_bytes(q, scheme) -> int:
    """Bytes of the parameters one update of ``scheme`` carries (what a fleet device sends): int8
    weights of the updated channels and int32 biases; the update blob adds its fixed headers."""
    from . import _core

    total = 0
    for name, r in scheme.resolved(q.layers).items():
        wq = np.asarray(q.node(name).params["weight_q"])
        if r["ratio"] > 0:
            axis = 1 if r["axis"] == "input" else 0
            k = _core.channels_for_ratio(wq.shape[axis], r["ratio"])  # what tt.compile trains
            total += wq.size // wq.shape[axis] * k
        if r["bias"]:
            total += 4 * wq.shape[0]
    return int(total)


def _finetune_accuracy(job) -> Tuple[float, Optional[str], float]:
    """One independent fine-tune from the deployed weights; returns held-out accuracy, why
    training collapsed (None: it did not) and the rate it trained at."""
    from .engine import compile as compile_plan
    from .trainer import Trainer

    q, scheme, data, settings = job
    xtr, ytr, xva, yva = data
    plan = compile_plan(q, scheme, budget=None)
    trainer = Trainer(plan, lr=settings.lr, momentum=0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the search reports collapses itself
        try:
            hist = trainer.fit(xtr, ytr, epochs=settings.epochs, batch_size=settings.batch_size, verbose=False)
        except ValueError as exc:
            if settings.lr != "auto" or not str(exc).startswith("no learning rate trains"):
                raise
            return float("nan"), str(exc), float("nan")  # no candidate rate trains it
    # A fine-tune of the search is short (an epoch or two, few samples) and may end in the
    # one-class phase early training passes through: its held-out accuracy judges that; only
    # broken outputs (saturated, constant, frozen or growing loss) count as collapse here.
    why = None if hist["collapse"] == CONSTANT_CLASS else hist["collapse"]
    return float(trainer.evaluate(xva, yva)), why, float(trainer.lr)


def _run_jobs(jobs, workers: int, progress_label: str) -> List[Tuple[float, Optional[str], float]]:
    from .progress import progress_bar

    results: List[Optional[Tuple[float, Optional[str], float]]] = [None] * len(jobs)
    pending = list(range(len(jobs)))
    for attempt in range(2):  # a crashed worker pool is retried once with the unfinished jobs
        if not pending:
            break
        if workers <= 1:
            with progress_bar(progress_label, total=len(pending)) as advance:
                for i in pending:
                    results[i] = _finetune_accuracy(jobs[i])
                    advance()
            pending = []
            break
        try:
            with ProcessPoolExecutor(max_workers=workers) as pool, progress_bar(
                progress_label, total=len(pending)
            ) as advance:
                futures = {i: pool.submit(_finetune_accuracy, jobs[i]) for i in pending}
                for i, fut in futures.items():
                    results[i] = fut.result()
                    advance()
            pending = []
        except BrokenProcessPool:
            pending = [i for i in pending if results[i] is None]
            warnings.warn(
                f"a worker process died during {progress_label}; retrying {len(pending)} job(s)"
                + (" serially" if attempt == 0 else ""),
                RuntimeWarning,
            )
            workers = 1
    return [(float(r[0]), r[1], float(r[2])) for r in results]  # type: ignore[index]


# --------------------------------------------------------------------------- caching


def _digest_arrays(*arrays: np.ndarray) -> str:
    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(str((a.dtype.str, a.shape)).encode())
        h.update(a.tobytes())
    return h.hexdigest()


def model_digest(q) -> str:
    h = hashlib.sha256()
    for node in q.nodes:
        h.update(f"{node.name}|{node.op}|{sorted(node.attrs.items())!r}".encode())
        for key in sorted(node.params):
            h.update(key.encode())
            h.update(_digest_arrays(node.params[key]).encode())
    for name in sorted(q.tensors):
        t = q.tensors[name]
        h.update(f"{name}|{t.shape}|{t.scale!r}|{t.zero_point!r}".encode())
    return h.hexdigest()


def default_cache_dir() -> str:
    base = os.environ.get("TINYTRAIN_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "tinytrain"
    )
    return base


def _load_cache(path: str, key: str) -> Optional[dict]:
    if not os.path.exists(path):
        return None
    try:
        with open(path, "r", encoding="utf-8") as f:
            doc = json.load(f)
        body = doc["body"]
        digest = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
        if doc.get("format") != CACHE_FORMAT or doc.get("key") != key or doc.get("sha256") != digest:
            raise ValueError("key or checksum does not match")
        return body
    except (OSError, ValueError, KeyError, TypeError) as exc:
        warnings.warn(f"ignoring contribution cache {path}: {exc}; recomputing", RuntimeWarning)
        return None


def _store_cache(path: str, key: str, body: dict) -> None:
    digest = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
    os.makedirs(os.path.dirname(path), exist_ok=True)  # tinytrain's own cache folder, made on first use
    write_atomic(path, json.dumps({"format": CACHE_FORMAT, "key": key, "sha256": digest, "body": body}))


# --------------------------------------------------------------------------- analysis


def _split(X: np.ndarray, Y: np.ndarray, val_fraction: float, seed: int):
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(X))
    n_val = max(1, int(round(len(X) * val_fraction)))
    va, tr = order[:n_val], order[n_val:]
    if len(tr) == 0:
        raise ValueError(f"need more than {len(X)} samples to hold {val_fraction:.0%} out for validation")
    return X[tr], Y[tr], X[va], Y[va]


def contribution_analysis(
    q,
    X: np.ndarray,
    Y: np.ndarray,
    ratios: Sequence[float] = DEFAULT_RATIOS,
    settings: FineTuneSettings = FineTuneSettings(),
    seed: int = 0,
    workers: Optional[int] = None,
    cache_dir: Optional[str] = None,
    classifier_axis: Optional[str] = None,
) -> Contributions:
    """Measure the accuracy gain of each bias prefix and each (layer, ratio) weight update; with
    ``classifier_axis`` ('input' or 'output') also of the classifier's weights at each ratio below 1
    along that axis (the baseline is the whole classifier: gain 0 at ratio 1)."""
    layers = list(q.layers)
    if not layers:
        raise ValueError("the model has no trainable layer (conv or fc)")
    ratios = tuple(float(r) for r in ratios)
    for r in ratios:
        if not 0.0 < r <= 1.0:
            raise ValueError(f"channel ratio {r} is not in (0, 1]")
    key = "|".join([model_digest(q), _digest_arrays(X, Y), settings.key(), repr(ratios), str(seed)])
    if classifier_axis is not None:
        if classifier_axis not in ("input", "output"):
            raise ValueError(f"classifier axis must be 'input' or 'output', got {classifier_axis!r}")
        key += f"|classifier-{classifier_axis}"
    cache_path = os.path.join(cache_dir or default_cache_dir(), f"contrib-{hashlib.sha256(key.encode()).hexdigest()[:32]}.json")
    cached = _load_cache(cache_path, key)
    if cached is not None:
        return Contributions(
            layers=layers,
            ratios=ratios,
            baseline_accuracy=cached["baseline"],
            bias_gain={int(k): v for k, v in cached["bias_gain"].items()},
            weight_gain={n: {float(r): g for r, g in d.items()} for n, d in cached["weight_gain"].items()},
            classifier_axis=classifier_axis,
            collapsed=list(cached["collapsed"]),
        )

    data = _split(np.asarray(X, dtype=np.float32), np.asarray(Y), settings.val_fraction, seed)
    n = len(layers)
    configs: List[Tuple[str, object]] = [("baseline", None)]
    configs += [("bias", k) for k in range(1, n + 1)]
    # The classifier's weights are always updated; its gain is the baseline itself.
    configs += [("weight", (name, r)) for name in layers[:-1] for r in ratios]
    if classifier_axis is not None:
        configs += [("weight", (layers[-1], r)) for r in ratios if r < 1.0]
    jobs = []
    for kind, arg in configs:
        if kind == "baseline":
            scheme = _scheme(layers, 0, {})
        elif kind == "bias":
            scheme = _scheme(layers, arg, {})
        else:
            name, r = arg
            scheme = _scheme(layers, 0, {name: r}, {layers[-1]: classifier_axis} if name == layers[-1] else None)
        jobs.append((q, scheme, data, settings))
    workers = (os.cpu_count() or 1) if workers is None else max(1, int(workers))
    results = _run_jobs(jobs, workers, "contribution analysis")
    accs = [r[0] for r in results]
    collapsed = [{"what": _config_name(kind, arg), "collapse": r[1]} for (kind, arg), r in zip(configs, results)
                 if r[1] is not None]
    baseline = accs[0]
    bias_gain: Dict[int, float] = {}
    weight_gain: Dict[str, Dict[float, float]] = {name: {} for name in layers[:-1]}
    if classifier_axis is not None:
        weight_gain[layers[-1]] = {1.0: 0.0}
    for (kind, arg), acc in zip(configs[1:], accs[1:]):
        gain = 100.0 * (acc - baseline)
        if kind == "bias":
            bias_gain[arg] = gain
        else:
            weight_gain[arg[0]][arg[1]] = gain
    _store_cache(
        cache_path,
        key,
        {
            "baseline": baseline,
            "bias_gain": {str(k): v for k, v in bias_gain.items()},
            "weight_gain": {n: {repr(r): g for r, g in d.items()} for n, d in weight_gain.items()},
            "collapsed": collapsed,
        },
    )
    return Contributions(layers, ratios, baseline, bias_gain, weight_gain, classifier_axis, collapsed)


def _config_name(kind: str, arg) -> str:
    if kind == "baseline":
        return "classifier only"
    if kind == "bias":
        return f"biases of the last {arg} layers"
    return f"{arg[0]} weights at ratio {arg[1]:g}"


# --------------------------------------------------------------------------- evolutionary search

# (bias depth, ratio index + 1 per non-classifier layer, 0 = frozen; under an update-size limit
# one more gene: the classifier's ratio index + 1, never 0 as the classifier always trains)
Genome = Tuple[int, Tuple[int, ...]]


class _Evaluator:
    def __init__(self, q, contributions: Contributions, budget: int, reorder: bool, compile_kwargs,
                 max_update_bytes: Optional[int] = None):
        self.q = q
        self.c = contributions
        self.budget = budget
        self.reorder = reorder
        self.compile_kwargs = compile_kwargs
        self.max_update_bytes = max_update_bytes
        self.peaks: Dict[Genome, int] = {}
        self.sizes: Dict[Genome, int] = {}

    @property
    def classifier_free(self) -> bool:
        """Whether genomes carry the classifier's ratio (else it trains whole)."""
        return self.c.classifier_axis is not None

    def _ratio(self, name: str, i: int) -> float:
        # the classifier's last option is its whole weight matrix even when 1 is not among the ratios
        if name == self.c.layers[-1] and i == len(self.c.ratios) + 1:
            return 1.0
        return self.c.ratios[i - 1]

    def scheme(self, g: Genome):
        k, idx = g
        weights = {name: self._ratio(name, i) for name, i in zip(self.c.layers, idx) if i > 0}
        classifier = self.c.layers[-1]
        axis = {classifier: self.c.classifier_axis} if weights.get(classifier, 1.0) < 1.0 else None
        return _scheme(self.c.layers, k, weights, axis)

    def score(self, g: Genome) -> float:
        k, idx = g
        s = self.c.bias_gain.get(k, 0.0)
        for name, i in zip(self.c.layers, idx):
            if i > 0:
                s += self.c.weight_gain[name][self._ratio(name, i)]
        return s

    def update_bytes(self, g: Genome) -> int:
        if g not in self.sizes:
            self.sizes[g] = update_bytes(self.q, self.scheme(g))
        return self.sizes[g]

    def feasible(self, g: Genome) -> bool:
        if self.max_update_bytes is not None and self.update_bytes(g) > self.max_update_bytes:
            return False
        return self.peak(g) <= self.budget

    def peak(self, g: Genome) -> int:
        if g not in self.peaks:
            from .engine import compile as compile_plan

            plan = compile_plan(self.q, self.scheme(g), budget=None, reorder=self.reorder, **self.compile_kwargs)
            self.peaks[g] = int(plan.memory.peak_bytes)
        return self.peaks[g]


def _pareto(points: List[Tuple[int, float]]) -> List[Tuple[int, float]]:
    front: List[Tuple[int, float]] = []
    best = -math.inf
    for peak, score in sorted(set(points), key=lambda p: (p[0], -p[1])):
        if score > best:
            front.append((peak, score))
            best = score
    return front


def evolutionary_search(
    evaluator: _Evaluator,
    population: int,
    generations: int,
    seed: int,
    mutation_rate: float = 0.1,
    parent_fraction: float = 0.25,
) -> Tuple[Genome, List[Tuple[int, float]]]:
    from .progress import progress_bar

    rng = np.random.default_rng(seed)
    c = evaluator.c
    n = len(c.layers)
    n_opts = len(c.ratios) + 1
    free = n - 1
    # the classifier's options: each ratio, and the whole matrix
    cls_opts = len(c.ratios) + (0 if 1.0 in c.ratios else 1)
    whole = tuple([c.ratios.index(1.0) + 1 if 1.0 in c.ratios else cls_opts]) if evaluator.classifier_free else ()

    def fitness(g: Genome) -> float:
        return evaluator.score(g) if evaluator.feasible(g) else -math.inf

    def classifier_gene() -> Tuple[int, ...]:
        return (int(rng.integers(1, cls_opts + 1)),) if evaluator.classifier_free else ()

    def random_genome(density: float) -> Genome:
        k = int(rng.integers(0, n + 1))
        idx = tuple(int(rng.integers(1, n_opts)) if rng.random() < density else 0 for _ in range(free))
        return (k, idx + classifier_gene())

    def mutate(g: Genome) -> Genome:
        k, idx = g
        if rng.random() < 0.5:
            k = int(np.clip(k + rng.integers(-max(1, n // 4), max(1, n // 4) + 1), 0, n))
        new = tuple(int(rng.integers(0, n_opts)) if rng.random() < mutation_rate else i for i in idx[:free])
        tail = idx[free:]
        if tail and rng.random() < mutation_rate:
            tail = classifier_gene()
        return (k, new + tail)

    def crossover(a: Genome, b: Genome) -> Genome:
        k = a[0] if rng.random() < 0.5 else b[0]
        return (k, tuple(x if rng.random() < 0.5 else y for x, y in zip(a[1], b[1])))

    # Seeds: bias-only prefixes and last-k full updates (cheap, always in the space), then sparse
    # random schemes.
    depths = sorted(set(np.linspace(0, n, num=min(n + 1, max(2, population // 4)), dtype=int).tolist()))
    pop: List[Genome] = [(k, (0,) * free + whole) for k in depths]
    pop += [(k, tuple(n_opts - 1 if i >= n - k else 0 for i in range(free)) + whole) for k in depths if k > 1]
    if evaluator.classifier_free:
        # each classifier ratio alone, so that a tight update-size limit has feasible seeds
        pop += [(k, (0,) * free + (i,)) for i in range(1, cls_opts + 1) for k in (0, 1)]
    while len(pop) < population:
        pop.append(random_genome(density=float(rng.uniform(0.02, 0.3))))
    seen: Dict[Genome, float] = {}
    with progress_bar("evolutionary search", total=generations) as advance:
        for _ in range(generations):
            for g in pop:
                if g not in seen:
                    seen[g] = fitness(g)
            ranked = sorted(set(pop), key=lambda g: (-seen[g], g))
            n_par = max(2, int(population * parent_fraction))
            parents = [g for g in ranked[:n_par] if seen[g] > -math.inf] or ranked[:n_par]
            children: List[Genome] = list(parents)
            while len(children) < population:
                if rng.random() < 0.5:
                    a, b = rng.integers(0, len(parents), size=2)
                    child = crossover(parents[a], parents[b])
                else:
                    child = mutate(parents[int(rng.integers(0, len(parents)))])
                children.append(child)
            pop = children
            advance()
    for g in pop:
        if g not in seen:
            seen[g] = fitness(g)
    evaluated = [(evaluator.peak(g), evaluator.score(g)) for g in seen]
    feasible = sorted((g for g, f in seen.items() if f > -math.inf), key=lambda g: (-seen[g], evaluator.peak(g), g))
    return feasible, evaluated


def search(
    q,
    X: np.ndarray,
    Y: np.ndarray,
    budget="256KB",
    ratios: Sequence[float] = DEFAULT_RATIOS,
    population: int = 40,
    generations: int = 30,
    seed: int = 0,
    workers: Optional[int] = None,
    epochs: int = 2,
    lr="auto",
    batch_size: int = 1,
    val_fraction: float = 0.3,
    reorder: bool = True,
    cache_dir: Optional[str] = None,
    verify: int = 6,
    max_update_bytes=None,
    **compile_kwargs,
) -> SearchResult:
    """Find the sparse-update scheme for ``q`` that fits ``budget`` (planner peak, exact).

    Contribution analysis (cached), then an evolutionary search of the summed contribution under
    the budget; the ``verify`` best schemes by that sum are fine-tuned for real and the most
    accurate on the held-out split is returned (``verify=0`` keeps the top sum).

    ``max_update_bytes`` (e.g. ``"800B"``) also bounds what one update carries (`update_bytes`: the
    int8 weights of the trained channels and the int32 biases, what a fleet device sends per
    round); the classifier's weights may then train on a part of their input channels too, each
    such ratio measured by the contribution analysis like the other layers' ratios.
    """
    from . import datacheck
    from .errors import MemoryBudgetError

    lr = lr if isinstance(lr, str) and lr.strip().lower() == "auto" else datacheck.check_lr(lr)
    X, Y = datacheck.check_search_data(q, X, Y, compile_kwargs.get("loss"))
    budget_bytes = parse_bytes(budget)
    size_limit = None if max_update_bytes is None else parse_bytes(max_update_bytes)
    layers = list(q.layers)
    if not layers:
        raise ValueError("the model has no trainable layer (conv or fc)")
    ratios = tuple(float(r) for r in ratios)
    axis = None if size_limit is None else "input"
    contributions_placeholder = Contributions(layers, ratios, 0.0, {}, {}, axis)
    evaluator = _Evaluator(q, contributions_placeholder, budget_bytes, reorder, compile_kwargs, size_limit)
    minimum = evaluator.peak((0, (0,) * (len(layers) - 1)))
    if minimum > budget_bytes:
        raise MemoryBudgetError(
            minimum, budget_bytes,
            f"no scheme fits: even updating only the classifier needs it (short by {minimum - budget_bytes} bytes)",
        )
    if size_limit is not None:
        smallest = evaluator.update_bytes((0, (0,) * (len(layers) - 1) + (1 + ratios.index(min(ratios)),)))
        if smallest > size_limit:
            raise ValueError(f"no scheme fits max_update_bytes={size_limit}: the smallest update (the classifier's "
                             f"bias and {min(ratios):g} of its input channels) is {smallest} bytes")
    from .lr import choose_lr, parse_lr

    lr = parse_lr(lr)
    n_workers = (os.cpu_count() or 1) if workers is None else max(1, int(workers))
    data = _split(np.asarray(X, dtype=np.float32), np.asarray(Y), val_fraction, seed)
    baselines = _fitting_baselines(q, evaluator)
    lr_choice = None
    if lr == "auto":
        from .engine import compile as compile_plan

        # One rate for the contribution analysis (its gains compare fine-tunes with each other):
        # the one chosen for the largest baseline, the most layers trained. The final comparison
        # then gives every scheme its own range test (the stable band moves with the scheme: on
        # the demo model the classifier alone collapses from 0.01, the last 4 layers not below
        # 0.2), so each competes at its own rate and the winner's rate is returned with it.
        plan = compile_plan(q, baselines[-1]["scheme"], budget=None, reorder=reorder, **compile_kwargs)
        lr_choice = choose_lr(plan, data[0], data[1], seed=seed)
        lr = lr_choice.lr
    settings = FineTuneSettings(epochs=epochs, batch_size=batch_size, lr=float(lr), val_fraction=val_fraction)
    contrib = contribution_analysis(q, X, Y, ratios, settings, seed, workers, cache_dir, axis)
    evaluator.c = contrib
    ranked, evaluated = evolutionary_search(evaluator, population, generations, seed)
    # Contributions are measured one update at a time and do not add up exactly (late layers
    # overlap in what they can fix), so the best few by summed contribution are fine-tuned for
    # real, on the same split, together with the simple baselines that fit, and the most accurate
    # one wins: the search never returns less than what a fixed scheme would have given.
    final = settings if lr_choice is None else FineTuneSettings(epochs, batch_size, "auto", val_fraction)
    candidates = ranked[: max(1, verify)]
    jobs = [(q, evaluator.scheme(g), data, final) for g in candidates]
    jobs += [(q, b["scheme"], data, final) for b in baselines]
    results = _run_jobs(jobs, n_workers, "verifying best schemes and baselines")
    verified = [
        {"scheme": evaluator.scheme(g), "peak_bytes": evaluator.peak(g), "score": evaluator.score(g), "accuracy": a,
         "update_bytes": evaluator.update_bytes(g), "collapse": why, "lr": rate}
        for g, (a, why, rate) in zip(candidates, results)
    ]
    for b, (a, why, rate) in zip(baselines, results[len(candidates):]):
        b["accuracy"], b["collapse"], b["lr"] = a, why, rate
    collapsed = [dict(c, lr=settings.lr, stage="contribution analysis") for c in contrib.collapsed]
    collapsed += [{"what": f"searched scheme #{i + 1}", "collapse": v["collapse"], "lr": v["lr"], "stage": "verification"}
                  for i, v in enumerate(verified) if v["collapse"] is not None]
    collapsed += [{"what": f"baseline {b['name']}", "collapse": b["collapse"], "lr": b["lr"], "stage": "verification"}
                  for b in baselines if b["collapse"] is not None]
    final_collapsed = [c for c in collapsed if c["stage"] == "verification"]
    if final_collapsed:
        c = final_collapsed[0]
        warnings.warn(f"{len(final_collapsed)} fine-tune(s) of the search's final comparison collapsed (e.g. {c['what']} "
                      f"at lr={c['lr']:g}: {c['collapse']}); they are out of the comparison. {collapse_fix(c['lr'])}",
                      RuntimeWarning, stacklevel=2)
    elif collapsed:
        # at the analysis's one shared rate a small update (the classifier alone) can collapse where
        # larger ones learn: that is measured as such (a low gain); the final comparison gives every
        # scheme its own rate
        warnings.warn(f"{len(collapsed)} of the contribution analysis's fine-tunes collapsed at its shared rate "
                      f"lr={settings.lr:g} (e.g. {collapsed[0]['what']}: {collapsed[0]['collapse']}); they count as "
                      "measured, the final comparison trained every scheme at its own rate", RuntimeWarning, stacklevel=2)

    def key(acc: float, why) -> float:
        return -1.0 if why is not None or acc != acc else acc

    ok_verified = [i for i, v in enumerate(verified) if v["collapse"] is None]
    ok_baselines = [b for b in baselines if b["collapse"] is None]
    if not ok_verified and not ok_baselines:
        raise ValueError(f"every scheme the search fine-tuned collapsed (lr={verified[0]['lr']:g}: "
                         f"{verified[0]['collapse']}): no scheme is worth returning. {collapse_fix(verified[0]['lr'])}")
    best_i = max(range(len(candidates)), key=lambda i: (key(verified[i]["accuracy"], verified[i]["collapse"]), -i))
    searched_acc = key(verified[best_i]["accuracy"], verified[best_i]["collapse"])
    best_b = max(baselines, key=lambda b: (key(b["accuracy"], b["collapse"]), -b["peak_bytes"]))
    baseline_acc = key(best_b["accuracy"], best_b["collapse"])
    if searched_acc >= baseline_acc:
        scheme, peak, score = evaluator.scheme(candidates[best_i]), evaluator.peak(candidates[best_i]), evaluator.score(candidates[best_i])
        size, winner, acc, margin = evaluator.update_bytes(candidates[best_i]), "searched", searched_acc, searched_acc - baseline_acc
        rate = verified[best_i]["lr"]
    else:
        scheme, peak, score = best_b["scheme"], best_b["peak_bytes"], _baseline_score(evaluator, best_b["scheme"])
        size, winner, acc, margin = best_b["update_bytes"], best_b["name"], baseline_acc, baseline_acc - searched_acc
        rate = best_b["lr"]
    costs = _single_update_costs(evaluator, minimum)
    return SearchResult(
        scheme=scheme,
        peak_bytes=peak,
        score=score,
        budget_bytes=budget_bytes,
        contributions=contrib.rows(costs),
        pareto=_pareto(evaluated),
        evaluated=evaluated,
        verified=verified,
        update_bytes=size,
        baselines=baselines,
        winner=winner,
        margin_points=100.0 * margin if min(searched_acc, baseline_acc) >= 0 else float("nan"),
        accuracy=acc,
        lr=rate,
        lr_choice=lr_choice,
        collapsed=collapsed,
    )


def _baseline_score(evaluator: _Evaluator, scheme) -> float:
    """The summed contribution of a baseline that is a point of the search space (NaN otherwise:
    bias only trains no classifier weights)."""
    c = evaluator.c
    n, free = len(c.layers), len(c.layers) - 1
    if 1.0 not in c.ratios:
        return float("nan")
    full = c.ratios.index(1.0) + 1
    whole = (full,) if evaluator.classifier_free else ()
    want = scheme.resolved(c.layers)
    for k in range(1, n + 1):
        g = (k, tuple(full if i >= n - k else 0 for i in range(free)) + whole)
        if evaluator.scheme(g).resolved(c.layers) == want:
            return evaluator.score(g)
    return float("nan")


def _fitting_baselines(q, evaluator: _Evaluator) -> List[Dict[str, object]]:
    """The simple schemes within the budget and update-size limit, smallest first: classifier
    only, bias only, then the last k layers for k = 2, 3, ... while they fit (peaks grow with k)."""
    from . import schemes
    from .engine import compile as compile_plan

    layers = list(q.layers)
    out: List[Dict[str, object]] = []

    def fits(name: str, scheme) -> bool:
        size = update_bytes(q, scheme)
        if evaluator.max_update_bytes is not None and size > evaluator.max_update_bytes:
            return False
        plan = compile_plan(q, scheme, budget=None, reorder=evaluator.reorder, **evaluator.compile_kwargs)
        if plan.memory.peak_bytes > evaluator.budget:
            return False
        out.append({"name": name, "scheme": scheme, "peak_bytes": int(plan.memory.peak_bytes), "update_bytes": size,
                    "accuracy": float("nan"), "collapse": None})
        return True

    fits("classifier", schemes.last_layers(q, 1))
    fits("bias_only", schemes.bias_only(q))
    for k in range(2, len(layers) + 1):
        if not fits(f"last_{k}", schemes.last_layers(q, k)):
            break
    if not out:  # the classifier's whole matrix is over the update-size limit
        g = (0, (0,) * (len(layers) - 1) + ((1 + evaluator.c.ratios.index(min(evaluator.c.ratios)),)
                                            if evaluator.classifier_free else ()))
        out.append({"name": "classifier_part", "scheme": evaluator.scheme(g), "peak_bytes": evaluator.peak(g),
                    "update_bytes": evaluator.update_bytes(g), "accuracy": float("nan"), "collapse": None})
    return out


def _single_update_costs(evaluator: _Evaluator, base_peak: int) -> Dict[str, Dict[str, object]]:
    """Extra peak bytes over the classifier-only plan of each single update the analysis measured."""
    c = evaluator.c
    n = len(c.layers)
    free = n - 1
    costs: Dict[str, Dict[str, object]] = {}
    for i, name in enumerate(c.layers):
        entry: Dict[str, object] = {"bias": evaluator.peak((n - i, (0,) * free)) - base_peak, "weight": {}}
        if i < free:
            for j, r in enumerate(c.ratios):
                idx = tuple(j + 1 if t == i else 0 for t in range(free))
                entry["weight"][r] = evaluator.peak((0, idx)) - base_peak  # type: ignore[index]
        costs[name] = entry
    return costs

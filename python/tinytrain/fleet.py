"""Fleets: many devices learn together with Flower, sharing only their sparse int8 updates.

Each device trains its compiled plan on its own data (the same sparse int8 update as alone); after
a round it sends only the parameters its scheme updates -- the int8 weights of the updated channels
and the int32 biases -- plus its sample count. The server averages them (`SparseFedAvg`: FedAvg
over the dequantized updates, re-quantized with the plan's frozen scales by stochastic rounding,
as training rounds) and sends the new global values back. Raw data never leaves a device.
With ``method="scaffold"`` the server also sends SCAFFOLD's control variate (Karimireddy et al.,
ICML 2020: the devices' mean gradient, int8 with one scale per parameter) and every device
corrects each local step by ``c - c_i`` (`Trainer.correction`), so label-skewed devices stop
pulling the model toward their own classes; what a device sends is unchanged.

Everything runs on Flower's Message API: `client_app` builds the `ClientApp`, `server_app` the
`ServerApp`; `simulate` runs a whole federation on this machine with Flower's simulation engine
(Ray), and `tinytrain fleet server` / `tinytrain fleet client` deploy the same apps over the
network (a Flower SuperLink and SuperNodes). Needs ``pip install 'tinytrain-mcu[fleet]'``.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import os
from dataclasses import dataclass
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

try:
    from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp
    from flwr.serverapp import Grid, ServerApp
    from flwr.serverapp.strategy import FedAvg
    from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords
except ImportError as _exc:  # pragma: no cover - depends on the environment
    raise ImportError("tinytrain.fleet needs Flower (flwr with its simulation engine): "
                      "pip install 'tinytrain-mcu[fleet]'") from _exc

from . import _core
from .errors import UpdateError
from .plan import Plan
from .schemes import Scheme
from .trainer import Trainer
from .update import Update, read_update
from .update import _layout as _update_layout

__all__ = ["Layout", "FleetClient", "GatewayClient", "SparseFedAvg", "RunConfig", "client_app", "server_app", "run_server", "partition",
           "simulate", "demo_setup", "plan_tag", "lr_scale", "LR_DECAYS", "METHODS", "SERVER_APP", "CLIENT_APP"]

log = logging.getLogger("tinytrain.fleet")

#: The MetricRecord key of the sample count, as Flower's strategies expect it.
COUNT_KEY = "num-examples"
_W_MAX = _core.WEIGHT_LIMIT  # symmetric int8 weights: training saturates to [-127, 127]
_B_MAX = _core.BIAS_LIMIT  # biases: the bound tt-core keeps them in (int32 sums stay exact); devices refuse more
#: How a fleet learns: plain FedAvg, or FedAvg with SCAFFOLD's drift correction.
METHODS = ("fedavg", "scaffold")
#: The train message's ArrayRecord of the global control variate (SCAFFOLD).
CONTROL_KEY = "control"
#: A device's own control variate between rounds, in its Flower node state.
_STATE_KEY = "tinytrain-control"


@dataclass(frozen=True)
class Entry:
    """One exchanged array: the updated channels of a layer's int8 weights, or its int32 bias."""

    key: str
    layer: str
    kind: str  # "weight" | "bias"
    shape: Tuple[int, ...]
    dtype: np.dtype
    index: Tuple[slice, ...]  # where the array sits in the layer's full OIHW weight / bias
    scale: np.ndarray  # float64, broadcastable to `shape`: the frozen quantization scale

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * self.dtype.itemsize


class Layout:
    """What a plan's scheme updates, in the order it is exchanged: for each updated layer (input to
    output) ``"<layer>.weight"`` (int8, the updated channels, ONNX OIHW / (out, in) layout) and
    ``"<layer>.bias"`` (int32), with the frozen scales that give their real values."""

    def __init__(self, plan: Plan) -> None:
        if plan.model is None:
            raise ValueError("the fleet needs the plan's quantized model for its scales: "
                             "tt.Plan.load(path, model=q) or a plan from tt.compile")
        self.plan = plan
        self.model = plan.model
        #: The scheme as `tt.compile` was given it (for display: what is trained comes from tt-core).
        self.scheme = Scheme.from_dict(plan.meta["scheme"])
        entries: List[Entry] = []
        for p in _update_layout(plan)[0]:
            n = self.model.node(p.layer)
            s_w = np.asarray(n.params["weight_scale"], dtype=np.float64).reshape(-1)
            if p.kind == "weight":
                full = np.asarray(n.params["weight_q"]).shape
                # the trained slice is the first channels along one axis: W[:k] or W[:, :k]
                index = (slice(None), slice(0, p.shape[1])) if p.shape[1] < full[1] else (slice(0, p.shape[0]),)
                scale = s_w[index[0]].reshape((-1,) + (1,) * (len(full) - 1))
                entries.append(Entry(p.name, p.layer, "weight", p.shape, np.dtype(np.int8), index, scale))
            else:
                s_in = float(self.model.tensors[n.inputs[0]].scale)
                entries.append(Entry(p.name, p.layer, "bias", p.shape, np.dtype(np.int32), (slice(None),), s_in * s_w))
        if not entries:
            raise ValueError("the plan's scheme updates nothing: a fleet has nothing to share")
        self.entries = entries

    # ------------------------------------------------------------------ sizes
    @property
    def keys(self) -> List[str]:
        return [e.key for e in self.entries]

    @property
    def nbytes(self) -> int:
        """Bytes of one update's parameters (int8 weights + int32 biases)."""
        return sum(e.nbytes for e in self.entries)

    def model_bytes(self) -> int:
        """Bytes of the whole int8 model's parameters (int8 weights + int32 biases)."""
        return int(self.model.weight_bytes())

    def model_params(self) -> int:
        return int(sum(np.asarray(n.params["weight_q"]).size + np.asarray(n.params["bias_q"]).size
                       for n in self.model.nodes if n.trainable))

    # ------------------------------------------------------------------ values
    def extract(self, q) -> Dict[str, np.ndarray]:
        """The exchanged arrays of a `QuantizedModel` (e.g. ``trainer.model``)."""
        out = {}
        for e in self.entries:
            n = q.node(e.layer)
            src = n.params["weight_q"] if e.kind == "weight" else n.params["bias_q"]
            out[e.key] = np.ascontiguousarray(np.asarray(src)[e.index], dtype=e.dtype)
        return out

    def apply(self, q, params: Mapping[str, np.ndarray]):
        """A copy of `QuantizedModel` ``q`` with ``params`` written into its updated channels."""
        q = copy.deepcopy(q)
        for e in self.entries:
            n = q.node(e.layer)
            field = "weight_q" if e.kind == "weight" else "bias_q"
            full = np.array(n.params[field], dtype=e.dtype)
            full[e.index] = params[e.key]
            n.params[field] = full
        return q

    def check(self, params: Mapping[str, object], count: object = None) -> Optional[str]:
        """Why an update must not be averaged in (``None`` if it is well formed): the keys, dtype,
        shape and range of every array, and a sample count that is a finite integer >= 0 (0: the device
        had nothing to train on this round, `SparseFedAvg` leaves it out of the mean)."""
        if not isinstance(params, Mapping):
            return f"the update is a {type(params).__name__}, not a mapping of arrays"
        missing = [k for k in self.keys if k not in params]
        extra = sorted(set(params) - set(self.keys))
        if missing:
            return f"missing arrays {missing}"
        if extra:
            return f"unexpected arrays {extra} (not updated by the plan's scheme)"
        for e in self.entries:
            a = params[e.key]
            if not isinstance(a, np.ndarray):
                return f"{e.key}: a {type(a).__name__}, not a numpy array"
            if a.dtype.kind == "f" and not np.all(np.isfinite(a)):
                return f"{e.key}: {int((~np.isfinite(a)).sum())} non-finite values"
            if a.dtype != e.dtype:
                return f"{e.key}: dtype {a.dtype}, expected {e.dtype}"
            if a.shape != e.shape:
                return f"{e.key}: shape {a.shape}, expected {e.shape}"
            if e.kind == "weight" and a.size and int(a.min()) < -_W_MAX:
                return f"{e.key}: int8 weight -128 (symmetric weights are in [-127, 127])"
            if e.kind == "bias" and a.size and int(np.abs(a.astype(np.int64)).max()) > _B_MAX:
                return f"{e.key}: a bias beyond +-2^30 (the bound a device keeps its biases in)"
        if count is not None:
            if isinstance(count, bool) or not isinstance(count, (int, float, np.integer, np.floating)):
                return f"sample count {count!r} is not a number"
            if not math.isfinite(float(count)) or float(count) != int(count) or int(count) < 0:
                return f"sample count {count!r} is not a whole number >= 0"
        return None

    def dequantize(self, params: Mapping[str, np.ndarray]) -> Dict[str, np.ndarray]:
        return {e.key: params[e.key].astype(np.float64) * e.scale for e in self.entries}

    def quantize(self, values: Mapping[str, np.ndarray], rng: np.random.Generator) -> Dict[str, np.ndarray]:
        """Real values -> int8 weights / int32 biases with the frozen scales, rounded stochastically
        (unbiased: E[round(v)] = v, so averaging never drifts toward zero the way nearest rounding
        of many small steps does), saturating as training does (weights to [-127, 127], biases to
        +-2^30)."""
        out = {}
        for e in self.entries:
            v = np.asarray(values[e.key], dtype=np.float64) / e.scale
            r = np.floor(v + rng.random(v.shape))
            lo, hi = (-_W_MAX, _W_MAX) if e.kind == "weight" else (-_B_MAX, _B_MAX)
            out[e.key] = np.clip(r, lo, hi).astype(e.dtype)
        return out

    def mean(self, updates: Sequence[Tuple[Mapping[str, np.ndarray], int]]) -> Dict[str, np.ndarray]:
        """The sample-weighted mean of the dequantized updates, in real values."""
        if not updates:
            raise ValueError("nothing to average")
        total = float(sum(n for _, n in updates))
        mean = {e.key: np.zeros(e.shape, dtype=np.float64) for e in self.entries}
        for params, n in updates:
            for k, v in self.dequantize(params).items():
                mean[k] += v * (n / total)
        return mean

    def average(self, updates: Sequence[Tuple[Mapping[str, np.ndarray], int]], rng: np.random.Generator,
                current: Optional[Mapping[str, np.ndarray]] = None, server_lr: float = 1.0) -> Dict[str, np.ndarray]:
        """FedAvg: the sample-weighted mean of the dequantized updates, re-quantized. With the
        ``current`` global values, the server step is ``current + server_lr * (mean - current)``
        (``server_lr = 1``: the mean itself; above 1: the server extrapolates the devices' mean
        step, as FedOpt's server learning rate does)."""
        mean = self.mean(updates)
        if current is not None and server_lr != 1.0:
            for k, g in self.dequantize(current).items():
                mean[k] = g + server_lr * (mean[k] - g)
        return self.quantize(mean, rng)


#: Learning-rate schedules over a run (`lr_scale`).
LR_DECAYS = ("none", "linear")


def lr_scale(decay: str, epoch: int, epochs: int) -> float:
    """The learning-rate multiplier of ``epoch`` (0-based) of ``epochs``: ``"none"`` 1; ``"linear"``
    ``1 - epoch / epochs`` (1 in the first epoch, ``1 / epochs`` in the last). Counted in epochs of
    the data, so a federation and a centralized run seeing each sample as often get the same schedule;
    a fleet sends it to its devices each round (``"lr-scale"`` in the train config)."""
    if decay not in LR_DECAYS:
        raise ValueError(f"lr decay must be one of {LR_DECAYS}, got {decay!r}")
    if epochs < 1 or not 0 <= epoch < epochs:
        raise ValueError(f"epoch {epoch} is not in [0, {epochs})")
    return 1.0 if decay == "none" else 1.0 - epoch / epochs


# ---------------------------------------------------------------------- records <-> arrays
def to_record(params: Mapping[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in params.items()})


def from_record(record: ArrayRecord) -> Dict[str, np.ndarray]:
    """Arrays of a record; raises ValueError naming the array that cannot be read."""
    out = {}
    for k, a in record.items():
        try:
            out[k] = a.numpy()
        except Exception as exc:  # a malformed Array (bad bytes, foreign serialization) from a peer
            raise ValueError(f"{k}: unreadable array ({exc})") from None
    return out


def record_bytes(params: Mapping[str, np.ndarray]) -> int:
    """Bytes Flower carries for these arrays (their .npy serialization, headers included)."""
    return sum(len(a.data) for a in to_record(params).values())


def control_to_record(control: Mapping[str, np.ndarray]) -> ArrayRecord:
    """The control variate as it travels to the devices: per parameter its values as int8
    (``<name>``) and one float32 scale (``<name>:scale``, the largest magnitude / 127)."""
    out = {}
    for k, v in control.items():
        v = np.asarray(v, dtype=np.float64)
        scale = float(np.max(np.abs(v))) / 127.0 if v.size else 0.0
        q = np.zeros(v.shape, np.int8) if scale == 0.0 else np.clip(np.round(v / scale), -127, 127).astype(np.int8)
        out[k] = q
        out[k + ":scale"] = np.array([scale], dtype=np.float32)
    return to_record(out)


def control_from_record(record: ArrayRecord, plan: Plan) -> Dict[str, np.ndarray]:
    """The control variate (float64, LSB units per step) a `control_to_record` record carries;
    ValueError naming what does not fit the parameters ``plan`` trains."""
    arrays = from_record(record)
    want = {p.name: p.shape for p in _update_layout(plan)[0]}
    names = {k for k in arrays if not k.endswith(":scale")}
    if names != set(want):
        raise ValueError(f"control variate for {sorted(names)}, the plan trains {sorted(want)}")
    out = {}
    for k, shape in want.items():
        q, scale = arrays[k], arrays.get(k + ":scale")
        if q.dtype != np.int8 or q.shape != shape:
            raise ValueError(f"control variate {k}: {q.dtype} {q.shape}, expected int8 {shape}")
        if scale is None or scale.shape != (1,) or not np.isfinite(scale).all() or float(scale[0]) < 0:
            raise ValueError(f"control variate {k}: no finite scale >= 0")
        out[k] = q.astype(np.float64) * float(scale[0])
    return out


def _mean_step(start: np.ndarray, end: np.ndarray, steps: int, lr: float) -> np.ndarray:
    """What each of a round's ``steps`` SGD steps at rate ``lr`` subtracted (LSB units), on average:
    the gradient plus the correction, from the values before and after the round. The device's new
    ``c_i`` and the server's account of it both start from this."""
    return (np.asarray(start, dtype=np.float64) - np.asarray(end, dtype=np.float64)) / (steps * lr)


# ---------------------------------------------------------------------- client
class FleetClient:
    """A device of the fleet: a `Trainer` on ``plan`` and the device's data ``(x, y)``.

    ``get_parameters()`` returns the scheme's trained parameters (read from the trainer's update
    blob, `tt.read_update`); ``fit(params, config)`` loads the global values
    (`Trainer.apply_update`), trains ``config["epochs"]`` local epochs through the plan and returns
    ``(params, samples trained on, metrics)`` (with ``config["rounds-per-epoch"] = K`` above 1 a
    round trains on the next 1/K of the device's data, dealt afresh each epoch: K rounds see each
    sample once, and a device with fewer than K samples trains in as many rounds of the K as it has samples,
    replying 0 samples (its values unchanged, not averaged in) in the others; ``config["lr-scale"]`` multiplies the device's learning rate for the round, the server's
    schedule); ``evaluate(params, config)`` returns
    ``(loss, samples, {"accuracy": ...})`` of the global values on the local data. Needs only the
    plan and the data, as a device does.

    SCAFFOLD: ``fit(params, config, control=c)`` with the server's control variate ``c`` trains
    with the correction ``c - c_i`` on every step (`Trainer.correction`), then sets its own
    ``control`` ``c_i`` to its mean gradient over the round's ``K`` steps at rate ``lr``
    (``c_i - c + (global - local) / (K lr)``, LSB units) and adds ``lr`` and ``steps`` to the
    metrics, which the server's `SparseFedAvg` needs to update ``c``."""

    def __init__(self, plan: Plan, x, y, lr: Optional[float] = None, seed: int = 0) -> None:
        self.plan = plan
        self.x = np.asarray(x, dtype=np.float32) if np.asarray(x).dtype != np.int8 else np.asarray(x)
        self.y = np.asarray(y)
        if len(self.x) != len(self.y):
            raise ValueError(f"{len(self.x)} samples but {len(self.y)} labels")
        if not len(self.x):
            raise ValueError("a fleet client needs at least one local sample")
        self.seed = int(seed)
        self.trainer = Trainer(plan, lr=lr)
        self.lr = self.trainer.lr  # the base rate the server's per-round "lr-scale" multiplies
        self.control: Optional[Dict[str, np.ndarray]] = None  # SCAFFOLD's c_i (None: zeros)

    def get_parameters(self) -> Dict[str, np.ndarray]:
        return read_update(self.trainer.export_update(0), self.plan).params

    def set_parameters(self, params: Mapping[str, np.ndarray]) -> None:
        try:
            self.trainer.apply_update(Update(self.plan, params, 0))
        except UpdateError as exc:
            raise ValueError(f"global parameters do not fit the plan: {exc}") from None

    def fit(self, params: Mapping[str, np.ndarray], config: Optional[Mapping[str, object]] = None,
            control: Optional[Mapping[str, np.ndarray]] = None):
        config = dict(config or {})
        self.set_parameters(params)
        rnd = int(config.get("server-round", 0))
        x, y = self.x, self.y
        k = int(config.get("rounds-per-epoch", 1))
        if k < 1:
            raise ValueError(f"rounds-per-epoch must be >= 1, got {k}")
        scale = float(config.get("lr-scale", 1.0))
        if not (math.isfinite(scale) and scale >= 0):
            raise ValueError(f"lr-scale must be a finite number >= 0, got {scale!r}")
        self.trainer.lr = self.lr * scale
        if k > 1:
            # more, shorter rounds over the same data: each average follows a shorter local run.
            # Dealt afresh every epoch, as centralized SGD reshuffles: with one fixed deal the
            # fleet's combined batch of round r would be the same samples in every epoch
            epoch, turn = divmod(max(rnd, 1) - 1, k)
            order = np.random.default_rng([self.seed, epoch]).permutation(len(x))
            part = np.sort(np.array_split(order, k)[turn])
            if not len(part):
                # fewer samples than rounds per epoch: training on some again would see them more
                # often than the fleet's epochs say; a reply of 0 samples is not averaged in
                idle = {"skipped-steps": int(self.trainer.skipped_steps)}
                if control is not None:
                    idle.update({"lr": float(self.trainer.lr), "steps": 0})
                return self.get_parameters(), 0, idle
            x, y = x[part], y[part]
        own = None
        if control is not None:
            own = self.control or {k: np.zeros(np.shape(v)) for k, v in params.items()}
            self.trainer.correction = {k: np.asarray(control[k], dtype=np.float64) - own[k] for k in params}
        steps_before = self.trainer.steps_done - self.trainer.skipped_steps
        # a client is rebuilt for every round (Flower runs each message in a fresh client): without
        # this its updates would round with the same draws every round, and a step that repeats
        # round after round (SCAFFOLD's correction) with the same bias
        self.trainer.reseed(self.seed * 100_003 + rnd)
        try:
            hist = self.trainer.fit(x, y, epochs=int(config.get("epochs", 1)),
                                    batch_size=int(config.get("batch-size", 1)), seed=self.seed * 100_003 + rnd,
                                    verbose=False)
        finally:
            self.trainer.correction = None
        update = read_update(self.trainer.export_update(), self.plan)
        metrics = {"train-loss": float(hist["loss"][-1]), "skipped-steps": int(self.trainer.skipped_steps)}
        if own is not None:
            steps = self.trainer.steps_done - self.trainer.skipped_steps - steps_before
            lr = float(self.trainer.lr)
            if steps > 0 and lr > 0:
                # the round's mean gradient: its steps moved the values by -lr * (g + c - c_i) each
                self.control = {k: own[k] - control[k] + _mean_step(params[k], update.params[k], steps, lr)
                                for k in params}
            metrics.update({"lr": lr, "steps": int(steps)})
        if hist.get("accuracy") and np.isfinite(hist["accuracy"][-1]):
            metrics["train-accuracy"] = float(hist["accuracy"][-1])
        return update.params, update.sample_count, metrics

    def evaluate(self, params: Mapping[str, np.ndarray], config: Optional[Mapping[str, object]] = None):
        """``(loss, samples, {"accuracy": ...})``; the loss needs the output's scale, which only a
        plan holding its model has (NaN otherwise)."""
        self.set_parameters(params)
        loss = self.trainer._loss(self.trainer._inputs(self.x), self.y) if self.plan.model is not None else float("nan")
        return float(loss), len(self.x), {"accuracy": float(self.trainer.evaluate(self.x, self.y))}


class GatewayClient:
    """The Flower client of devices it does not run itself (a gateway in front of microcontrollers):
    each round ``device_fit(global_blob, config)`` sends the global update blob to a device and
    returns the device's own update blob, which is read (`tt.read_update`: CRC, plan tag, every
    section checked) and passed on unchanged: its parameters and its sample count.
    ``device_evaluate(global_blob, config) -> (loss, samples, metrics)`` is optional."""

    def __init__(self, plan: Plan, device_fit: Callable[[bytes, Dict[str, object]], bytes],
                 device_evaluate: Optional[Callable[[bytes, Dict[str, object]], Tuple[float, int, Dict[str, float]]]] = None
                 ) -> None:
        self.plan = plan
        self.device_fit = device_fit
        self.device_evaluate = device_evaluate

    def get_parameters(self) -> Dict[str, np.ndarray]:
        return read_update(Trainer(self.plan).export_update(0), self.plan).params

    def fit(self, params: Mapping[str, np.ndarray], config: Optional[Mapping[str, object]] = None,
            control: Optional[Mapping[str, np.ndarray]] = None):
        if control is not None:
            raise ValueError("a gateway forwards update blobs only: its devices cannot apply SCAFFOLD's correction "
                             "(run the server with --method fedavg)")
        blob = self.device_fit(Update(self.plan, params, 0).to_bytes(), dict(config or {}))
        update = read_update(blob, self.plan)
        return update.params, update.sample_count, {}

    def evaluate(self, params: Mapping[str, np.ndarray], config: Optional[Mapping[str, object]] = None):
        if self.device_evaluate is None:
            raise ValueError("this gateway's devices do not evaluate: run the server with --fraction-evaluate 0")
        return self.device_evaluate(Update(self.plan, params, 0).to_bytes(), dict(config or {}))


def _reply(msg: Message, params: Optional[Mapping[str, np.ndarray]], count: int, metrics: Dict[str, float]) -> Message:
    content = RecordDict({"metrics": MetricRecord({COUNT_KEY: int(count), **metrics})})
    if params is not None:
        content["arrays"] = to_record(params)
    return Message(content=content, reply_to=msg)


def _train(client: "FleetClient | GatewayClient", msg: Message, context: Context) -> Message:
    """A train message: plain, or with SCAFFOLD's control variate, the device's own ``c_i`` kept
    between rounds in the node's Flower state."""
    params = from_record(msg.content["arrays"])
    config = dict(msg.content["config"])
    if CONTROL_KEY not in msg.content.array_records:
        return _reply(msg, *client.fit(params, config))
    control = control_from_record(msg.content.array_records[CONTROL_KEY], client.plan)
    if isinstance(client, FleetClient) and _STATE_KEY in context.state.array_records:
        client.control = from_record(context.state.array_records[_STATE_KEY])
    out = client.fit(params, config, control=control)
    if isinstance(client, FleetClient) and client.control is not None:
        context.state[_STATE_KEY] = to_record(client.control)
    return _reply(msg, *out)


def client_app(make_client: Callable[[Context], "FleetClient | GatewayClient"]) -> ClientApp:
    """A Flower `ClientApp` whose train/evaluate messages run a `FleetClient` (or a
    `GatewayClient`); ``make_client``
    builds it from the node's context (its ``node_config``: partition id, data path, ...)."""
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        return _train(make_client(context), msg, context)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        client = make_client(context)
        loss, n, metrics = client.evaluate(from_record(msg.content["arrays"]), dict(msg.content["config"]))
        return _reply(msg, None, n, {**metrics, **({"loss": loss} if math.isfinite(loss) else {})})

    return app


# ---------------------------------------------------------------------- server
def _checked_momentum(beta: float) -> float:
    if not (math.isfinite(beta) and 0 <= beta < 1):
        raise ValueError(f"server_momentum must be in [0, 1), got {beta!r}")
    return float(beta)


#: The most samples a device can report for a round: its update blob's sample count is a u32.
#: The server's default cap (`SparseFedAvg(max_samples=...)`); `simulate` derives a tighter one.
MAX_SAMPLES = 2 ** 32 - 1


def parse_aggregation(spec: str) -> Tuple[str, float]:
    """``(kind, argument)`` of how the server combines a round's valid updates
    (`SparseFedAvg(aggregation=...)`, ``--aggregation``): ``"mean"`` (FedAvg, weighted by sample count),
    ``"median"`` (coordinate-wise median), ``"trimmed:BETA"`` (coordinate-wise mean without the
    BETA largest and BETA smallest fraction of the values, 0 < BETA < 0.5) or ``"krum:F"``
    (Multi-Krum: the updates closest to their neighbours, all but F, averaged by sample count) or
    ``"clip:C"`` (a norm bound: each device's step from the current global values is scaled down to
    at most C times the round's median step norm and its sample count to at most C times the median
    count, then the weighted mean). Median, trimmed mean and Krum ignore the sample counts when they
    choose, and the norm bound caps them: one device cannot buy the round with a large count."""
    text = str(spec).strip().lower()
    kind, sep, arg = text.partition(":")
    try:
        if kind in ("mean", "median") and not sep:
            return kind, 0.0
        if kind == "trimmed":
            beta = float(arg) if sep else 0.1
            if 0 < beta < 0.5:
                return kind, beta
        if kind == "krum" and sep and int(arg) >= 0:
            return kind, float(int(arg))
        if kind == "clip" and sep and float(arg) >= 1:
            return kind, float(arg)
    except ValueError:
        pass
    raise ValueError("aggregation must be mean, median, trimmed:BETA (0 < BETA < 0.5), krum:F (F >= 0) or clip:C (C >= 1), "
                     f"got {spec!r}")


def aggregate(layout: Layout, updates: Sequence[Tuple[Mapping[str, np.ndarray], int]],
              aggregation: str = "mean", current: Optional[Mapping[str, np.ndarray]] = None) -> Dict[str, np.ndarray]:
    """The round's aggregate of ``(params, samples)`` updates in real values (dequantized with the
    plan's frozen scales; `Layout.quantize` turns it back into int8 / int32). ``aggregation``: see
    `parse_aggregation`; median, trimmed mean and Krum are Flower's own
    (``flwr.server.strategy.aggregate``). ``current``: the global values the devices started from
    (the norm bound measures steps from them; without them, from the coordinate-wise median)."""
    kind, arg = parse_aggregation(aggregation)
    if kind == "mean":
        return layout.mean(updates)
    if not updates:
        raise ValueError("nothing to aggregate")
    from flwr.server.strategy.aggregate import aggregate_krum, aggregate_median, aggregate_trimmed_avg

    keys = layout.keys
    real = [([values[k] for k in keys], int(n)) for values, n in ((layout.dequantize(p), n) for p, n in updates)]
    if kind == "median":
        out = aggregate_median(real)
    elif kind == "trimmed":
        if int(arg * len(real)) == 0:
            log.warning("trimmed:%g of %d updates trims none of them: the plain mean of their values", arg, len(real))
        out = aggregate_trimmed_avg(real, arg)
    elif kind == "krum":
        out = aggregate_krum(real, int(arg), max(1, len(real) - int(arg)))
    else:
        out = _norm_bounded_mean(real, [layout.dequantize(current)[k] for k in keys] if current is not None
                                 else aggregate_median(real), arg)
    return dict(zip(keys, (np.asarray(v, dtype=np.float64) for v in out)))


def _norm_bounded_mean(real: Sequence[Tuple[List[np.ndarray], int]], center: Sequence[np.ndarray],
                       c: float) -> List[np.ndarray]:
    """``center`` plus the mean of the devices' steps from it, each step scaled to at most ``c``
    times the median step norm and each weight (sample count) to at most ``c`` times the median."""
    steps = [[v - g for v, g in zip(values, center)] for values, _ in real]
    norms = np.array([math.sqrt(sum(float(np.sum(d * d)) for d in step)) for step in steps])
    bound = c * float(np.median(norms))
    scale = np.where(norms > bound, bound / np.maximum(norms, 1e-300), 1.0)
    counts = np.array([n for _, n in real], dtype=np.float64)
    weight = np.minimum(counts, c * float(np.median(counts)))
    weight = weight / weight.sum()
    return [g + sum(w * s * step[i] for w, s, step in zip(weight, scale, steps)) for i, g in enumerate(center)]


def check_metrics(metrics: Mapping[str, object]) -> Optional[str]:
    """Why a reply's metrics cannot be aggregated (``None`` if every value is a finite number):
    Flower's metric aggregation adds the values up, so one list among numbers would make it raise."""
    for key, value in metrics.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            text = repr(value)
            return (f"metric {key!r} is a {type(value).__name__} "
                    f"({text if len(text) <= 40 else text[:37] + '...'}), not a number")
        if not math.isfinite(value):
            return f"metric {key!r} is {value!r}, not a finite number"
    return None


def _checked_cap(max_samples: object) -> int:
    if isinstance(max_samples, bool) or not isinstance(max_samples, (int, np.integer)) or not 1 <= max_samples <= MAX_SAMPLES:
        raise ValueError(f"max samples per client must be an integer in [1, {MAX_SAMPLES}], got {max_samples!r}")
    return int(max_samples)


class SparseFedAvg(FedAvg):
    """Flower's FedAvg over a plan's sparse int8 updates.

    Every reply is checked against the plan's `Layout` (array names, dtype, shape, int8 range,
    a whole sample count >= 0); a malformed one is dropped with a logged reason (``rejected`` keeps
    ``(round, node, reason)``) and never averaged in. The others are averaged in real values
    (dequantized with the frozen scales, weighted by sample count: a device that had nothing to train
    on in the round replies 0 and is left out) and re-quantized with stochastic
    rounding; ``server_lr`` scales the server's step from the current global values toward that
    mean (1: plain FedAvg). ``server_momentum`` beta above 0 is FedAvgM (Hsu et al., 2019): the
    server keeps a velocity ``v = beta v + (mean - current)`` over the rounds and steps by
    ``server_lr * v``, so a direction the devices agree on round after round gets a step up to
    ``server_lr / (1 - beta)``, one they flip back and forth on does not. ``lr_scale(server_round)`` (optional) is the devices' learning-rate
    multiplier of each round, sent in the train config as ``"lr-scale"``. Error replies (a client that crashed or went offline) are counted in ``failed``. The
    FedAvg arguments (``fraction_train``, ``min_train_nodes``,
    ``min_available_nodes``, ...) work as in Flower; a round with too few valid updates keeps the
    global model unchanged.

    ``method="scaffold"``: every train message also carries the control variate ``c``
    (`control_to_record`, int8 with one scale per parameter: the download grows by the update's
    size, the upload does not); after a round ``c`` moves by the sum of the round's ``c_i`` changes
    over the ``N`` connected devices, which the server computes from what each sends anyway (its parameters
    against the global ones, and its ``lr`` and ``steps``; an update without them is rejected),
    so ``c`` stays the devices' mean ``c_i`` without their sending it.

    Every reply is validated in full before anything is aggregated: besides the arrays, each metric
    must be a finite number (a list-valued metric would make Flower's metric aggregation raise) and
    the sample count at most ``max_samples`` (default `MAX_SAMPLES`, the most a device's update blob
    can carry); a round whose valid updates with samples are fewer than ``min_valid_updates`` is
    kept in ``rounds_without_update``. ``aggregation`` (`parse_aggregation`) replaces the
    sample-weighted mean by a robust one (``"median"``, ``"trimmed:0.1"``, ``"krum:1"``) on the
    dequantized values; the server step, momentum and re-quantization follow as for the mean."""

    def __init__(self, layout: Layout, seed: int = 0, min_valid_updates: int = 1, server_lr: float = 1.0,
                 lr_scale: Optional[Callable[[int], float]] = None, method: str = "fedavg",
                 server_momentum: float = 0.0, aggregation: str = "mean", max_samples: int = MAX_SAMPLES,
                 **fedavg) -> None:
        super().__init__(**fedavg)
        parse_aggregation(aggregation)
        self.aggregation = str(aggregation)
        self.max_samples = _checked_cap(max_samples)
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        self.method = method
        self.control: Dict[str, np.ndarray] = {e.key: np.zeros(e.shape) for e in layout.entries}
        self.fleet_size = 0  # devices connected when the current round was sent
        if not (math.isfinite(server_lr) and server_lr > 0):
            raise ValueError(f"server_lr must be a finite number > 0, got {server_lr!r}")
        self.server_momentum = _checked_momentum(server_momentum)
        self.velocity: Dict[str, np.ndarray] = {e.key: np.zeros(e.shape) for e in layout.entries}
        self.layout = layout
        self.rng = np.random.default_rng(seed)
        self.min_valid_updates = int(min_valid_updates)
        self.server_lr = float(server_lr)
        self.lr_scale = lr_scale
        self.current: Optional[Dict[str, np.ndarray]] = None  # the global values sent this round
        self.rejected: List[Tuple[int, int, str]] = []
        self.failed: List[Tuple[int, int, str]] = []  # error replies: a client crashed or went offline
        self.accepted: Dict[int, int] = {}
        self.rounds_without_update: List[int] = []  # rounds that left the global model unchanged
        self.rejected_evaluations: List[Tuple[int, int, str]] = []

    def _reject(self, server_round: int, node: int, reason: str) -> None:
        self.rejected.append((server_round, node, reason))
        log.warning("round %d: rejected the update of node %d: %s", server_round, node, reason)
        logging.getLogger("flwr").warning("tinytrain: round %d: rejected the update of node %d: %s",
                                          server_round, node, reason)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid):
        self.current = from_record(arrays)
        if self.lr_scale is not None:
            config = ConfigRecord({**dict(config), "lr-scale": float(self.lr_scale(server_round))})
        messages = list(super().configure_train(server_round, arrays, config, grid))
        self.fleet_size = len(list(grid.get_node_ids()))
        if self.method == "scaffold":
            record = control_to_record(self.control)
            # the devices get c on the int8 grid: the server keeps exactly that value
            self.control = control_from_record(record, self.layout.plan)
            for m in messages:
                m.content[CONTROL_KEY] = record
        return messages

    def aggregate_train(self, server_round: int, replies) -> Tuple[Optional[ArrayRecord], Optional[MetricRecord]]:
        good: List[Tuple[Dict[str, np.ndarray], int]] = []
        moves: List[Dict[str, np.ndarray]] = []  # SCAFFOLD: each device's change of c_i
        contents = []
        for msg in replies:
            node = int(msg.metadata.src_node_id)
            if msg.has_error():
                self.failed.append((server_round, node, str(msg.error.reason)))
                log.warning("round %d: node %d sent no update: %s", server_round, node, msg.error.reason)
                continue
            reason, params, count = self._read(msg.content)
            move = None
            if not reason and self.method == "scaffold":
                reason, move = self._control_move(msg.content, params)
            if reason:
                self._reject(server_round, node, reason)
                continue
            if move is not None:
                moves.append(move)
            good.append((params, int(count)))
            contents.append(msg.content)
        self.accepted[server_round] = len(good)
        # a device with nothing to train on this round (0 samples) is well formed but has no weight
        trained = [(params, n) for params, n in good if n > 0]
        contents = [c for c, (_, n) in zip(contents, good) if n > 0]
        if len(trained) < max(1, self.min_valid_updates):
            log.warning("round %d: %d valid update(s) with samples, fewer than %d: the global model stays as it was",
                        server_round, len(trained), self.min_valid_updates)
            self.rounds_without_update.append(server_round)
            return None, None
        arrays = to_record(self._step(trained))
        for move in moves:  # c += (1/N) sum of the c_i changes: c stays the mean c_i of all N devices
            for k, v in move.items():
                self.control[k] = self.control[k] + v / max(self.fleet_size, len(good))
        return arrays, aggregate_metricrecords(contents, self.weighted_by_key)

    def _step(self, trained: Sequence[Tuple[Dict[str, np.ndarray], int]]) -> Dict[str, np.ndarray]:
        """The next global values from the round's valid updates."""
        target = aggregate(self.layout, trained, self.aggregation, self.current)
        if self.current is None or (self.server_momentum == 0 and self.server_lr == 1.0):
            return self.layout.quantize(target, self.rng)
        start = self.layout.dequantize(self.current)
        if self.server_momentum == 0:
            return self.layout.quantize({k: g + self.server_lr * (target[k] - g) for k, g in start.items()}, self.rng)
        for k, g in start.items():
            self.velocity[k] = self.server_momentum * self.velocity[k] + (target[k] - g)
        return self.layout.quantize({k: g + self.server_lr * self.velocity[k] for k, g in start.items()}, self.rng)

    def _control_move(self, content: RecordDict, params: Mapping[str, np.ndarray]):
        """``(reason, move)``: the change of a device's ``c_i`` in this round (None when it made no
        step), or why its reply cannot be used."""
        metrics = next(iter(content.metric_records.values()))
        lr, steps = metrics.get("lr"), metrics.get("steps")
        if not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr < 0:
            return f"no learning rate 'lr' >= 0 in the metrics (SCAFFOLD needs it), got {lr!r}", None
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            return f"no step count 'steps' >= 0 in the metrics (SCAFFOLD needs it), got {steps!r}", None
        if steps == 0 or lr == 0:
            return None, None
        return None, {k: _mean_step(self.current[k], params[k], steps, lr) - self.control[k] for k in self.control}

    def _read_metrics(self, content: RecordDict, arrays: int):
        """``(reason, metrics, count)``: the reply's one MetricRecord, every value a finite number,
        and its sample count, a whole number in [0, max_samples]."""
        if len(content.array_records) != arrays or len(content.metric_records) != 1:
            return (f"expected {arrays} ArrayRecord(s) and one MetricRecord, got {len(content.array_records)} and "
                    f"{len(content.metric_records)}"), None, None
        metrics = next(iter(content.metric_records.values()))
        if self.weighted_by_key not in metrics:
            return f"no sample count ({self.weighted_by_key!r}) in the metrics", None, None
        count = metrics[self.weighted_by_key]
        if check_metrics({"count": count}) or float(count) != int(count) or int(count) < 0:
            return f"sample count {count!r} is not a whole number >= 0", None, None
        reason = check_metrics(metrics)
        if reason:
            return reason, None, None
        if int(count) > self.max_samples:
            return (f"sample count {int(count)} is above the {self.max_samples} samples a device can have trained on "
                    "in a round (max_samples)"), None, None
        return None, metrics, count

    def _read(self, content: RecordDict):
        reason, _, count = self._read_metrics(content, arrays=1)
        if reason:
            return reason, None, None
        try:
            params = from_record(next(iter(content.array_records.values())))
        except ValueError as exc:
            return str(exc), None, None
        return self.layout.check(params, count), params, count

    def aggregate_evaluate(self, server_round: int, replies) -> Optional[MetricRecord]:
        """The sample-weighted mean of the devices' own evaluations; a reply whose metrics are not
        finite numbers or whose count is 0 or beyond ``max_samples`` is left out and logged."""
        ok = []
        for msg in replies:
            if msg.has_error():
                continue
            reason, _, count = self._read_metrics(msg.content, arrays=0)
            if not reason and int(count) == 0:
                reason = "evaluated on 0 samples"
            if reason:
                node = int(msg.metadata.src_node_id)
                self.rejected_evaluations.append((server_round, node, reason))
                log.warning("round %d: left out the evaluation of node %d: %s", server_round, node, reason)
                continue
            ok.append(msg.content)
        return aggregate_metricrecords(ok, self.weighted_by_key) if ok else None


def evaluator(layout: Layout, x, y) -> Callable[[int, ArrayRecord], MetricRecord]:
    """Centralized evaluation of the global parameters on ``(x, y)`` (int8 inference)."""
    x = np.asarray(x, dtype=np.float32)
    y = np.asarray(y).reshape(-1)

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        q = layout.apply(layout.model, from_record(arrays))
        return MetricRecord({"accuracy": float((q.predict(x) == y).mean())})

    return evaluate


@dataclass
class RunConfig:
    """How the server runs a federation."""

    rounds: int = 10
    epochs: int = 1  # local epochs per round
    rounds_per_epoch: int = 1  # above 1: a round trains on 1/K of each device's data (FleetClient.fit)
    batch_size: int = 1
    fraction_train: float = 1.0
    min_train_nodes: int = 2
    min_available_nodes: int = 2
    min_valid_updates: int = 1
    fraction_evaluate: float = 0.0  # federated evaluation on the clients' own data (0: none)
    round_timeout: float = 3600.0
    seed: int = 0
    server_lr: float = 1.0  # 1: plain FedAvg; see SparseFedAvg
    server_momentum: float = 0.0  # FedAvgM's beta (0: none); see SparseFedAvg
    lr_decay: str = "none"  # the devices' learning-rate schedule over the run's epochs of data (lr_scale)
    method: str = "fedavg"  # or "scaffold" (see SparseFedAvg)
    aggregation: str = "mean"  # or a robust one: median, trimmed:BETA, krum:F (parse_aggregation)
    # the largest sample count a device's reply may report for a round; None: MAX_SAMPLES for a
    # deployment, the largest device's samples times the local epochs in `simulate`
    max_samples_per_client: Optional[int] = None

    def __post_init__(self) -> None:
        if self.rounds_per_epoch < 1:
            raise ValueError(f"rounds-per-epoch must be >= 1, got {self.rounds_per_epoch}")
        _checked_momentum(self.server_momentum)
        parse_aggregation(self.aggregation)
        if self.max_samples_per_client is not None:
            _checked_cap(self.max_samples_per_client)

    def lr_scale(self, server_round: int) -> float:
        """The devices' learning-rate multiplier in round ``server_round`` (1-based): `lr_scale` of
        the epoch of data the round belongs to (``rounds_per_epoch`` rounds make one epoch)."""
        k = self.rounds_per_epoch
        return lr_scale(self.lr_decay, (max(server_round, 1) - 1) // k, -(-self.rounds // k))


def run_server(grid: Grid, layout: Layout, cfg: RunConfig, test=None,
               on_round: Optional[Callable[[int, Dict[str, float]], None]] = None,
               extra_config: Optional[Dict[str, int]] = None) -> Dict[str, object]:
    """Runs ``cfg.rounds`` rounds of `SparseFedAvg` on ``grid``; returns the history: centralized
    ``accuracy`` per round (index 0: before training) when ``test=(x, y)``, client metrics, the
    accepted update counts, rejected updates and failed devices with their reasons, the rounds that had
    no valid update (``rounds_without_update``: the global model stayed as it was), and the final
    parameters."""
    cfg.lr_scale(1)  # an unknown schedule fails here, before any round
    cap = MAX_SAMPLES if cfg.max_samples_per_client is None else cfg.max_samples_per_client
    strategy = SparseFedAvg(layout, seed=cfg.seed, min_valid_updates=cfg.min_valid_updates, server_lr=cfg.server_lr,
                            lr_scale=cfg.lr_scale if cfg.lr_decay != "none" else None, method=cfg.method,
                            server_momentum=cfg.server_momentum, aggregation=cfg.aggregation, max_samples=cap,
                            fraction_train=cfg.fraction_train, fraction_evaluate=cfg.fraction_evaluate,
                            min_train_nodes=cfg.min_train_nodes, min_available_nodes=cfg.min_available_nodes,
                            min_evaluate_nodes=cfg.min_train_nodes if cfg.fraction_evaluate > 0 else 0)
    central = evaluator(layout, *test) if test is not None else None

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> Optional[MetricRecord]:
        m = central(server_round, arrays) if central else None
        if on_round is not None:
            on_round(server_round, dict(m or {}))
        return m

    init = layout.extract(layout.model)
    result = strategy.start(grid=grid, initial_arrays=to_record(init), num_rounds=cfg.rounds,
                            timeout=cfg.round_timeout,
                            train_config=ConfigRecord({"epochs": cfg.epochs, "batch-size": cfg.batch_size,
                                                       "rounds-per-epoch": cfg.rounds_per_epoch,
                                                       **(extra_config or {})}),
                            evaluate_config=ConfigRecord(dict(extra_config or {})), evaluate_fn=evaluate_fn)
    final = from_record(result.arrays) if len(result.arrays) else init
    return {
        "accuracy": [float(result.evaluate_metrics_serverapp[r]["accuracy"])
                     for r in sorted(result.evaluate_metrics_serverapp)],
        "train_metrics": {r: dict(m) for r, m in result.train_metrics_clientapp.items()},
        "client_evaluate": {r: dict(m) for r, m in result.evaluate_metrics_clientapp.items()},
        "accepted": dict(strategy.accepted),
        "rejected": [{"round": r, "node": n, "reason": s} for r, n, s in strategy.rejected],
        "failed": [{"round": r, "node": n, "reason": s} for r, n, s in strategy.failed],
        "rejected_evaluations": [{"round": r, "node": n, "reason": s} for r, n, s in strategy.rejected_evaluations],
        "rounds_without_update": list(strategy.rounds_without_update),
        "aggregation": cfg.aggregation, "max_samples_per_client": cap,
        "params": final,
    }


def server_app(layout: Layout, cfg: RunConfig, test=None, sink: Optional[Callable[[Dict[str, object]], None]] = None,
               on_round: Optional[Callable[[int, Dict[str, float]], None]] = None) -> ServerApp:
    """A Flower `ServerApp` running `run_server`; ``sink`` receives the history at the end."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        hist = run_server(grid, layout, cfg, test, on_round)
        if sink is not None:
            sink(hist)

    return app


# ---------------------------------------------------------------------- data
def partition(y, clients: int, spec: str = "dirichlet:0.3", seed: int = 0, min_size: int = 2) -> List[np.ndarray]:
    """Split sample indices over ``clients``: ``"iid"`` (shuffled, equal shares) or
    ``"dirichlet:ALPHA"`` (label skew: each class is shared out by proportions drawn from a
    symmetric Dirichlet(ALPHA); small ALPHA = each client sees few classes). Every client gets at
    least ``min_size`` samples (the draw is repeated until it does)."""
    y = np.asarray(y).reshape(-1)
    if not isinstance(clients, int) or clients < 1:
        raise ValueError(f"clients must be an int >= 1, got {clients!r}")
    if clients * min_size > len(y):
        raise ValueError(f"{len(y)} samples cannot give {clients} clients {min_size} each")
    rng = np.random.default_rng(seed)
    if spec == "iid":
        return [np.sort(p) for p in np.array_split(rng.permutation(len(y)), clients)]
    kind, _, arg = spec.partition(":")
    try:
        alpha = float(arg)
    except ValueError:
        alpha = float("nan")
    if kind != "dirichlet" or not (math.isfinite(alpha) and alpha > 0):
        raise ValueError(f"partition must be 'iid' or 'dirichlet:ALPHA' with ALPHA > 0, got {spec!r}")
    for _ in range(1000):
        parts: List[List[int]] = [[] for _ in range(clients)]
        for c in np.unique(y):
            idx = rng.permutation(np.flatnonzero(y == c))
            cuts = (np.cumsum(rng.dirichlet(np.full(clients, alpha))) * len(idx)).astype(int)[:-1]
            for i, chunk in enumerate(np.split(idx, cuts)):
                parts[i].extend(chunk.tolist())
        if min(len(p) for p in parts) >= min_size:
            return [np.sort(np.array(p, dtype=np.int64)) for p in parts]
    raise ValueError(f"no Dirichlet({alpha}) split gives every one of {clients} clients {min_size} samples; "
                     "use fewer clients or a larger alpha")


# ---------------------------------------------------------------------- simulation
def simulate(plan: Plan, x, y, parts: Sequence[np.ndarray], cfg: RunConfig, test=None, lr: Optional[float] = None,
             on_round: Optional[Callable[[int, Dict[str, float]], None]] = None, verbose: bool = False,
             cpus_per_client: float = 1.0,
             client_factory: Optional[Callable[[int, Plan, np.ndarray, np.ndarray], "FleetClient | GatewayClient"]] = None
             ) -> Dict[str, object]:
    """A federation of ``len(parts)`` simulated devices (client ``i`` holds ``x[parts[i]]``) run
    by Flower's simulation engine on this machine; returns `run_server`'s history.

    Without ``cfg.max_samples_per_client`` the server refuses a reply reporting more samples than
    the largest device holds times the local epochs. ``client_factory(i, plan, x_i, y_i)`` builds
    device ``i`` instead of a `FleetClient` (e.g. a faulty or hostile device in a benchmark)."""
    from flwr.simulation import run_simulation

    layout = Layout(plan)
    x = np.asarray(x, dtype=np.float32)
    y = np.asarray(y)
    shards = [(x[p], y[p]) for p in parts]
    plan_bytes, params = plan.plan_bytes, plan.params  # a device holds the plan, not the model
    if cfg.max_samples_per_client is None:
        cfg = dataclasses.replace(cfg, max_samples_per_client=max(1, max(len(p) for p in parts) * cfg.epochs))

    def make_client(context: Context) -> "FleetClient | GatewayClient":
        i = int(context.node_config["partition-id"])
        if client_factory is not None:
            return client_factory(i, Plan(plan_bytes, params), *shards[i])
        return FleetClient(Plan(plan_bytes, params), *shards[i], lr=lr, seed=cfg.seed * 1009 + i)

    out: Dict[str, object] = {}
    sapp = server_app(layout, cfg, test, sink=out.update, on_round=on_round)
    flwr_logger = logging.getLogger("flwr")
    level = flwr_logger.level
    if not verbose:  # rejected updates are still reported, by the tinytrain.fleet logger
        flwr_logger.setLevel(logging.ERROR)
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")  # no GPUs involved: silence Ray's notice
    try:
        run_simulation(server_app=sapp, client_app=client_app(make_client), num_supernodes=len(parts),
                       backend_config={"client_resources": {"num_cpus": cpus_per_client, "num_gpus": 0.0},
                                       "init_args": {"logging_level": "ERROR", "log_to_driver": verbose}},
                       verbose_logging=verbose)
    finally:
        flwr_logger.setLevel(level)
    if "params" not in out:
        raise RuntimeError("the Flower simulation ended without a result (see its log above)")
    return out


# ---------------------------------------------------------------------- the demo fleet
def update_limit(value, model_bytes: int) -> Optional[int]:
    """An update-size limit in bytes: ``None`` or ``"none"`` (no limit), a size (``"800B"``,
    ``816``) or ``"<N>x"``, N times fewer bytes than the whole int8 model (``model_bytes // N``)."""
    if value is None:
        return None
    text = str(value).strip().lower()
    if text == "none":
        return None
    if text.endswith("x"):
        n = float(text[:-1])
        if not n >= 1.0:
            raise ValueError(f"update budget {value!r}: the factor must be >= 1")
        return int(model_bytes // n)
    from .units import parse_bytes

    return parse_bytes(value)


#: The update budget of the fleet's searched scheme unless asked otherwise: an update 20 times
#: smaller than the whole int8 model (without it the search, bounded by SRAM only, picks a scheme
#: whose update is almost the whole model).
DEFAULT_UPDATE_BUDGET = "20x"


def demo_setup(scheme: str = "searched", budget: str = "256KB", seed: int = 0, workers: Optional[int] = None,
               update_budget=DEFAULT_UPDATE_BUDGET):
    """The demo's task as a fleet: `tt.models.demo()` (pretrained on digits 0-4) quantized as in
    `tinytrain demo`, its sparse scheme, and the data of digits 5-9 the devices learn. ``scheme``:
    ``"searched"`` (`tt.search` under ``budget``, as the demo does, and under ``update_budget``
    bytes per update, see `update_limit`: by default 20 times fewer than the whole int8 model,
    ``None`` for no limit), ``full``, ``bias``, ``last:K``, ``paper`` or a scheme JSON file.
    Returns ``(plan, (x, y), (x_test, y_test))``."""
    import tinytrain as tt

    from .engine import scheme_from_arg

    q = tt.quantize(tt.load_onnx(tt.models.demo()), tt.datasets.digits("source", "train")[0][:256])
    x, y = tt.datasets.digits("target", "train")
    test = tt.datasets.digits("target", "test")
    if scheme == "searched":
        s = tt.search(q, x[:320], y[:320], budget=budget, population=24, generations=12, seed=seed, workers=workers,
                      epochs=1, max_update_bytes=update_limit(update_budget, q.weight_bytes())).scheme
    else:
        s = scheme_from_arg(q, scheme)
    # the devices' rate (the plan's, what the firmware uses): chosen on their data, not guessed
    lr = tt.choose_lr(tt.compile(q, s, budget=budget), x, y, seed=seed).lr
    return tt.compile(q, s, budget=budget, lr=lr), (x, y), test


def plan_tag(plan: Plan) -> int:
    """CRC-32 of the plan's header (which holds the CRCs of its body and frozen parameters): the
    identity a device's update must match."""
    return int(_core.plan_tag(plan.plan_bytes))


# ---------------------------------------------------------------------- deployed apps
# `tinytrain fleet server` / `client` run these two through a Flower SuperLink and SuperNodes. The
# server's run config names the plan, model and options; a node's config names its plan and data.
def _load_plan(plan_path: str, model_path: str) -> Plan:
    from .fileio import load_model

    return Plan.load(plan_path, model=load_model(model_path))


def _deployed_client(context: Context) -> FleetClient:
    nc = context.node_config
    missing = [k for k in ("plan", "data") if not nc.get(k)]
    if missing:
        raise ValueError(f"the node config lacks {missing}: start it with tinytrain fleet client")
    from .fileio import load_data

    x, y = load_data(str(nc["data"]))
    lr = float(nc["lr"]) if nc.get("lr") not in (None, "") else None
    return FleetClient(Plan.load(str(nc["plan"])), x, y, lr=lr, seed=int(nc.get("seed", 0)))


def _checked_client(context: Context, msg: Message) -> FleetClient:
    client = _deployed_client(context)
    want = int(msg.content["config"].get("plan-tag", -1))
    if want != plan_tag(client.plan):
        raise ValueError(f"this device's plan (tag {plan_tag(client.plan):08x}) is not the server's "
                         f"({want & 0xFFFFFFFF:08x}): every device must run the plan the server averages")
    return client


CLIENT_APP = ClientApp()


@CLIENT_APP.train()
def _deployed_train(msg: Message, context: Context) -> Message:
    return _train(_checked_client(context, msg), msg, context)


@CLIENT_APP.evaluate()
def _deployed_evaluate(msg: Message, context: Context) -> Message:
    client = _checked_client(context, msg)
    loss, n, metrics = client.evaluate(from_record(msg.content["arrays"]), dict(msg.content["config"]))
    return _reply(msg, None, n, {**metrics, **({"loss": loss} if math.isfinite(loss) else {})})


SERVER_APP = ServerApp()


@SERVER_APP.main()
def _deployed_main(grid: Grid, context: Context) -> None:
    from .fileio import load_data, write_atomic

    rc = context.run_config
    out = str(rc["out"])
    try:
        plan = _load_plan(str(rc["plan"]), str(rc["model"]))
        layout = Layout(plan)
        test = load_data(str(rc["test-data"])) if rc.get("test-data") else None
        cfg = RunConfig(rounds=int(rc["rounds"]), epochs=int(rc["epochs"]), batch_size=int(rc["batch-size"]),
                        fraction_train=float(rc["fraction-train"]), min_train_nodes=int(rc["min-clients"]),
                        min_available_nodes=int(rc["min-clients"]), min_valid_updates=int(rc["min-valid"]),
                        fraction_evaluate=float(rc["fraction-evaluate"]), round_timeout=float(rc["round-timeout"]),
                        seed=int(rc["seed"]), server_lr=float(rc["server-lr"]),
                        server_momentum=float(rc.get("server-momentum", 0.0)),
                        lr_decay=str(rc.get("lr-decay", "none")), method=str(rc.get("method", "fedavg")),
                        rounds_per_epoch=int(rc.get("rounds-per-epoch", 1)),
                        aggregation=str(rc.get("aggregation", "mean")),
                        max_samples_per_client=int(rc["max-samples"]) if rc.get("max-samples") else None)
        progress = str(rc.get("progress", ""))

        def on_round(r: int, m: Dict[str, float]) -> None:
            if progress:
                with open(progress, "a", encoding="utf-8") as f:
                    f.write(json.dumps({"round": r, **m}) + "\n")

        _wait_for_nodes(grid, int(rc["wait-clients"]))
        # the plan tag rides in every config: a device on another plan refuses the round
        hist = run_server(grid, layout, cfg, test, on_round, extra_config={"plan-tag": plan_tag(plan)})
        final = hist.pop("params")
        if rc.get("output"):
            layout.apply(layout.model, final).to_onnx(str(rc["output"]))
        write_atomic(out, json.dumps(hist, default=float))
    except Exception as exc:  # the CLI waiting for `out` reports it instead of hanging
        write_atomic(out, json.dumps({"error": f"{type(exc).__name__}: {exc}"}))
        raise


def _wait_for_nodes(grid: Grid, n: int) -> None:
    """Round 1 starts once ``n`` clients are connected (later rounds need Flower's minimum only)."""
    import time

    while len(list(grid.get_node_ids())) < n:
        time.sleep(0.5)


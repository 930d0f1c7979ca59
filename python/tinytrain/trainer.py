"""`Trainer`: trains a `Plan` on the host with tt-core's executor (the code the MCU runs).

Batch semantics depend on how the plan was compiled:

- ``tt.compile(..., accumulate=False)`` (default): the engine updates weights in place right after
  each sample's gradient (the paper's batch-1 on-device training; that is what makes reordering
  save memory). ``step(X, Y)`` with a batch runs ``len(X)`` consecutive single-sample SGD steps and
  returns their mean loss; in ``fit`` the batch size only groups samples for the progress bar.
  ``lr`` is per sample.
- ``accumulate=True``: real gradient accumulation. ``step(X, Y)`` adds the gradients of all samples
  of the batch (weights fixed meanwhile) and applies one update with their mean; ``fit(...,
  batch_size=B)`` makes one update per batch of ``B``. ``lr`` applies to the mean gradient. A batch
  whose accumulated gradient is not finite changes nothing and counts one ``skipped_steps``.
"""
from __future__ import annotations

import copy
import json
import warnings
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

import numpy as np

from . import _core, datacheck
from .plan import Plan
from .progress import progress_bar
from .update import Update, _check_count

__all__ = ["Trainer"]

AUTO = "auto"


def _window(n_samples: int) -> int:
    return max(8, min(256, n_samples // 4))


def _diverged(losses: List[float], start: float, n_samples: int) -> bool:
    """The training loss over the last window of samples is more than 1.5x the model's loss before
    training: SGD with a sane learning rate does not end far above where it started."""
    w = _window(n_samples)
    return len(losses) >= w and float(np.mean(losses[-w:])) > 1.5 * start + 1e-6


#: The collapse reason of a constant prediction (inputs still move the int8 outputs).
CONSTANT_CLASS = "every sample is predicted as the same class"
#: A sample's int8 output is saturated when at least this share of its values sit at -128 or 127.
SATURATED_SHARE = 0.5
#: Training has saturated the output when more than this share of the samples are saturated.
SATURATED_SAMPLES = 0.5


@dataclass(frozen=True)
class Probe:
    """What the current weights do on a fixed set of samples (forward only)."""

    loss: float
    accuracy: float  # NaN for an mse plan
    classes: int  # distinct predicted classes (0 for an mse plan)
    saturated: float  # share of samples whose int8 output is mostly at -128 / 127
    constant_output: bool  # the same int8 output for every sample
    labels: int  # distinct labels among the samples (0 for an mse plan)


def health(before: Probe, after: Probe, losses: Sequence[float], start: float, n_samples: int,
           skipped: int, steps: int, judge_prediction: bool = True) -> Optional[str]:
    """Why training collapsed, or None: the same checks for `Trainer.fit` and the range test of
    `tt.choose_lr`. ``before`` / ``after``: the probe samples before training and now; ``losses``:
    the finite per-sample training losses in order; ``start``: the loss before training. A
    property the model already had before training (a constant prediction, say) is not blamed on
    the rate. ``judge_prediction=False`` leaves out "every sample predicted as one class": early in
    training (a range test's short run) that is a normal passing phase (the class prior is learnt
    first), which the held-out loss judges instead."""
    why = []
    if steps and skipped > steps // 2:
        why.append(f"{skipped} of {steps} steps had a non-finite loss or gradient")
    if _diverged(list(losses), start, n_samples):
        w = _window(n_samples)
        why.append(f"the loss grew from {start:.4g} before training to {np.mean(list(losses)[-w:]):.4g}")
    if after.constant_output and not before.constant_output:
        why.append("the int8 output is the same for every sample (it no longer depends on the input)")
    elif judge_prediction and after.classes == 1 and before.classes > 1 and after.labels > 1:
        why.append(CONSTANT_CLASS)
    if after.saturated > SATURATED_SAMPLES >= before.saturated:
        why.append(f"the int8 outputs of {100 * after.saturated:.0f} % of the samples are saturated at -128/127 "
                   f"({100 * before.saturated:.0f} % before training)")
    tail = list(losses)[-_window(n_samples):]
    if len(tail) >= 8 and float(np.ptp(tail)) <= 1e-6 * max(1.0, abs(float(np.mean(tail)))):
        why.append(f"the loss is frozen at {tail[-1]:.4g} on every sample")
    return "; ".join(why) if why else None


def collapse_fix(lr: float) -> str:
    """The fix a collapse report names."""
    return (f"The likely cause is a learning rate too high: lower it (e.g. lr={lr / 10:g}) or let tinytrain "
            "choose it (lr='auto')")


class Trainer:
    """Trains ``plan`` on the host. ``lr``: ``"auto"`` (default) uses the rate the plan was compiled
    with when one was given to `tt.compile`, else chooses one by a short range test
    (`tt.choose_lr`) on the data of the first `fit` (``lr_choice`` then holds the test;
    `step` before any `fit` uses the plan's stored rate); ``None``: the plan's stored rate; a
    number: that rate."""

    def __init__(self, plan: Plan, lr: Union[float, str, None] = AUTO, momentum: Optional[float] = None,
                 qas: bool = True) -> None:
        from .lr import parse_lr

        if not isinstance(plan, Plan):
            raise TypeError(f"Trainer expects a tt.Plan (tt.compile / tt.Plan.load), got {type(plan).__name__}")
        self.plan = plan
        self._s = _core.Session(plan.plan_bytes, plan.params)
        lr = plan.lr if lr is None else parse_lr(lr)
        #: waiting for the first fit's range test (the plan's rate was not given to tt.compile)
        self._choose_lr = lr == AUTO and plan.meta.get("lr_source", AUTO) == AUTO
        lr = plan.lr if lr == AUTO else lr
        #: the range test of `tt.choose_lr` that set ``lr`` (None: the rate was given or not chosen yet)
        self.lr_choice = None
        momentum = plan.momentum if momentum is None else momentum
        lr = datacheck.check_lr(lr, allow_zero=True)
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum!r}")
        if momentum > 0 and not plan.momentum_buffers:
            raise ValueError("momentum > 0 needs momentum buffers in SRAM: compile the plan with tt.compile(..., momentum=m)")
        self._s.lr = float(lr)
        self._s.momentum = float(momentum)
        self._s.qas = bool(qas)
        self._correction: Optional[Dict[str, np.ndarray]] = None
        self.skipped_steps = 0
        self.steps_done = 0  # updates attempted: one per sample, or one per batch with accumulation
        self._samples_since_sync = 0  # samples whose update was applied, for export_update
        inp = plan.meta.get("input", {})
        self._in_shape = tuple(inp.get("shape", ()))
        self._in_scale = float(inp.get("scale", 1.0))
        self._in_zp = int(inp.get("zero_point", 0))
        datacheck.register_trainer(self)

    # ------------------------------------------------------------------ hyper-parameters
    @property
    def lr(self) -> float:
        return self._s.lr

    @lr.setter
    def lr(self, v: float) -> None:
        from .lr import parse_lr

        v = parse_lr(v)
        if v == AUTO:
            self._choose_lr, self.lr_choice = True, None
        else:
            self._s.lr = datacheck.check_lr(v, allow_zero=True)
            self._choose_lr = False

    @property
    def lr_pending(self) -> bool:
        """True while ``lr="auto"`` waits for the first `fit`'s data to choose the rate."""
        return self._choose_lr

    @property
    def momentum(self) -> float:
        return self._s.momentum

    @property
    def correction(self) -> Optional[Dict[str, np.ndarray]]:
        """A drift correction (None: none): per trained parameter (the names and shapes of
        `tt.read_update(...).params`), a float per value in that value's own LSB units (int8
        weight LSBs, int32 bias LSBs); every update then also moves each trained value by
        ``-lr`` times its correction, rounded as the plan's updates are (tt-core's
        ``update::shift``, the same code on the MCU): SGD on ``g + correction`` for each step's
        gradient ``g``, apart from rounding. A fleet sets SCAFFOLD's ``c - c_i`` here."""
        return None if self._correction is None else {k: v.copy() for k, v in self._correction.items()}

    @correction.setter
    def correction(self, values: Optional[Mapping[str, np.ndarray]]) -> None:
        if values is None:
            self._s.set_correction(None)
            self._correction = None
            return
        from .update import _layout

        layout, _ = _layout(self.plan)
        names = [p.name for p in layout]
        if not isinstance(values, Mapping) or set(values) != set(names):
            got = sorted(values) if isinstance(values, Mapping) else type(values).__name__
            raise ValueError(f"a correction needs exactly the trained parameters {names}, got {got}")
        flat, kept = [], {}
        for p in layout:
            a = np.asarray(values[p.name], dtype=np.float32)
            if a.shape != p.shape:
                raise ValueError(f"correction {p.name}: shape {a.shape}, the plan trains {p.shape}")
            if not np.isfinite(a).all():
                raise ValueError(f"correction {p.name}: values must be finite")
            kept[p.name] = a.copy()
            flat.append(p.blob_order(a))
        self._s.set_correction(np.ascontiguousarray(np.concatenate(flat), dtype=np.float32))
        self._correction = kept

    @property
    def high_water_bytes(self) -> int:
        """Highest arena byte the executor touched so far (equals ``plan.memory.peak_bytes``)."""
        return int(self._s.high_water)

    # ------------------------------------------------------------------ data
    def _inputs(self, x) -> np.ndarray:
        """float32 (or int8, already quantized) NCHW / CHW -> int8 (N, H*W*C)."""
        x = datacheck.check_inputs(np.asarray(x), self._in_scale, self._in_zp, sample_ndim=len(self._in_shape))
        if x.ndim in (1, 2) and len(self._in_shape) == 3 and self._in_shape[1:] == (1, 1):
            x = x.reshape((-1,) + self._in_shape)  # (N, F) features for a (F, 1, 1) input
        if x.ndim == len(self._in_shape):
            x = x[None]
        if x.shape[1:] != self._in_shape:
            raise ValueError(f"input must be (N, {', '.join(map(str, self._in_shape))}) or one sample, got {x.shape}")
        if x.dtype != np.int8:
            v = x.astype(np.float32) / np.float32(self._in_scale)
            r = np.sign(v) * np.floor(np.abs(v) + 0.5)
            x = np.clip(r + self._in_zp, -128, 127).astype(np.int8)
        return np.ascontiguousarray(x.transpose(0, 2, 3, 1).reshape(len(x), -1))

    def _run(self, xq: np.ndarray, y) -> np.ndarray:
        if self.plan.loss == "mse":
            t = np.asarray(y, dtype=np.float32).reshape(len(xq), -1)
            losses = self._s.run_rows(xq, np.ascontiguousarray(t), "step")
        else:
            labels = self._labels(y, len(xq))
            losses = self._s.run_rows(xq, np.ascontiguousarray(labels, dtype=np.int64), "step")
        bad = ~np.isfinite(losses)
        self.skipped_steps += int(bad.sum())
        self.steps_done += len(losses)
        return losses

    def _accumulate(self, xq: np.ndarray, y) -> np.ndarray:
        """One update for the whole batch; every loss NaN when the update was skipped."""
        if self.plan.loss == "mse":
            t = np.asarray(y, dtype=np.float32).reshape(len(xq), -1)
            losses = self._s.run_rows(xq, np.ascontiguousarray(t), "accumulate")
        else:
            labels = self._labels(y, len(xq))
            losses = self._s.run_rows(xq, np.ascontiguousarray(labels, dtype=np.int64), "accumulate")
        if not len(losses):
            return losses
        self.steps_done += 1
        if not self._s.apply_accumulated(len(losses)):
            self.skipped_steps += 1
            return np.full(len(losses), np.nan, dtype=np.float32)
        return losses

    def _labels(self, y, n: int) -> np.ndarray:
        labels = np.asarray(y).reshape(-1)
        if labels.shape[0] != n:
            raise ValueError(f"{n} samples but {labels.shape[0]} labels")
        if not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(f"labels must be integers, got dtype {labels.dtype}")
        n_out = int(np.prod(self.plan.meta.get("output", {}).get("shape", [0])))
        if n_out and (labels.min() < 0 or labels.max() >= n_out):
            raise ValueError(f"labels must be in [0, {n_out}), got {labels.min()}..{labels.max()}")
        return labels

    def _train(self, xq: np.ndarray, y) -> np.ndarray:
        losses = self._accumulate(xq, y) if self.plan.accumulate else self._run(xq, y)
        self._samples_since_sync += int(np.isfinite(losses).sum())
        return losses

    # ------------------------------------------------------------------ training
    def step(self, x, y) -> float:
        """One sample (C, H, W) or a batch (N, C, H, W). A plain plan: per-sample in-place
        updates, mean loss over the samples whose step was applied (NaN if none). An
        ``accumulate=True`` plan: one update with the batch's mean gradient, mean loss of the batch
        (NaN if the update was skipped)."""
        xq = self._inputs(x)
        losses = self._train(xq, datacheck.plan_labels(self.plan, y, len(xq)))
        ok = losses[np.isfinite(losses)]
        return float(ok.mean()) if len(ok) else float("nan")

    def fit(self, X, Y, epochs: int = 1, batch_size: int = 32, shuffle: bool = True, seed: int = 0,
            validation=None, verbose: bool = True) -> Dict[str, Any]:
        """Train for ``epochs``; returns the history: per epoch mean ``loss``, training ``accuracy``
        (cross-entropy plans; measured on the fly, before each batch's updates) and, with
        ``validation=(Xv, Yv)``, ``val_accuracy``; ``lr``, the rate trained with, and
        ``lr_choice`` (the range test's `LrChoice.to_dict`, when ``lr="auto"`` chose it here,
        seeded by ``seed``; else None).

        ``collapsed`` turns True (with ``collapse``, the reason, and a RuntimeWarning naming the
        fix) once training has broken the model: on the first samples of ``X`` (the probe) every
        prediction is the same class, or the int8 output no longer depends on the input, or most
        outputs are saturated at -128/127, none of which was so before training; or the loss over
        the last samples is frozen or more than 1.5x the loss before training (then ``diverged``
        is True too). The likely cause is a learning rate too high. ``batch_size``: on an
        ``accumulate=True`` plan one update per batch (mean gradient); on a plain plan one
        in-place update per sample, the batch only grouping samples for the progress bar."""
        if epochs < 1 or batch_size < 1:
            raise ValueError("epochs and batch_size must be >= 1")
        xq = self._inputs(X)
        Y = datacheck.plan_labels(self.plan, Y, len(xq))
        if len(Y) != len(xq):
            raise ValueError(f"{len(xq)} samples but {len(Y)} targets")
        hist: Dict[str, object] = {"loss": [], "accuracy": []}
        if self._choose_lr and self.plan.model is None:
            warnings.warn(f"lr='auto' cannot choose a rate for a plan loaded without its model (no output scale): "
                          f"training at the plan's lr={self.lr:g}; load it with tt.Plan.load(path, model=q) or give lr=",
                          RuntimeWarning, stacklevel=2)
            self._choose_lr = False
        if self._choose_lr:
            from .lr import choose_lr

            self.lr_choice = choose_lr(self.plan, X, Y, seed=seed)
            self._s.lr = self.lr_choice.lr
            self._choose_lr = False
            if verbose:
                print(self.lr_choice.summary(), flush=True)
            hist["lr_choice"] = self.lr_choice.to_dict()
        else:
            hist["lr_choice"] = None
        hist["lr"] = self.lr
        rng = np.random.default_rng(seed)
        if validation is not None:
            hist["val_accuracy"] = []
        seen: List[float] = []  # finite per-sample losses in training order, for collapse
        hist["diverged"] = False
        hist["collapsed"] = False
        hist["collapse"] = None
        w = _window(len(xq))
        probe_x, probe_y = xq[:w], Y[:w]
        before = self._probe(probe_x, probe_y)
        start = before.loss
        skipped0, steps0 = self.skipped_steps, self.steps_done
        ce = self.plan.loss == "cross_entropy"
        with progress_bar("training", epochs * len(xq), enabled=verbose) as advance:
            for ep in range(epochs):
                order = rng.permutation(len(xq)) if shuffle else np.arange(len(xq))
                tot, n, correct = 0.0, 0, 0
                for s in range(0, len(order), batch_size):
                    idx = order[s: s + batch_size]
                    if ce:
                        correct += int((self._predict_q(xq[idx]) == Y[idx]).sum())
                    losses = self._train(xq[idx], Y[idx])
                    ok = losses[np.isfinite(losses)]
                    tot += float(ok.sum())
                    n += len(ok)
                    seen.extend(ok.tolist())
                    advance(len(idx), epoch=ep + 1, loss=tot / max(n, 1))
                hist["loss"].append(tot / max(n, 1))
                if not hist["collapsed"]:
                    why = health(before, self._probe(probe_x, probe_y), seen, start, len(xq),
                                 self.skipped_steps - skipped0, self.steps_done - steps0)
                    if why is not None:
                        hist["collapsed"], hist["collapse"] = True, why
                        hist["diverged"] = _diverged(seen, start, len(xq))
                        warnings.warn(f"training collapsed in epoch {ep + 1} (lr={self.lr:g}): {why}. "
                                      f"{collapse_fix(self.lr)}", RuntimeWarning, stacklevel=2)
                hist["accuracy"].append(correct / len(xq) if ce else float("nan"))
                if validation is not None:
                    hist["val_accuracy"].append(self.evaluate(*validation))
        return hist

    def _probe(self, xq: np.ndarray, Y) -> Probe:
        """The current model on quantized samples, forward only; the loss is infinite (growth not
        judged) for a plan loaded without its model: no output scale."""
        raw = self._s.forward(xq) if len(xq) else np.zeros((0, 1), np.int8)
        raw2 = raw.reshape(len(raw), -1)
        at_limit = (raw2 == -128) | (raw2 == 127)
        saturated = float((at_limit.mean(axis=1) >= SATURATED_SHARE).mean()) if len(raw2) else 0.0
        constant = len(raw2) > 1 and bool((raw2 == raw2[:1]).all())
        ce = self.plan.loss == "cross_entropy"
        labels = self._labels(Y, len(raw2)) if ce else None
        pred = raw2.argmax(axis=1)
        return Probe(loss=self._loss_of(raw2, Y), accuracy=float((pred == labels).mean()) if ce and len(pred) else float("nan"),
                     classes=len(np.unique(pred)) if ce else 0, saturated=saturated, constant_output=constant,
                     labels=len(np.unique(labels)) if ce else 0)

    def _loss(self, xq: np.ndarray, Y) -> float:
        """Mean loss of the current model on quantized samples, without training (forward only)."""
        return self._loss_of(self._s.forward(xq) if len(xq) else None, Y)

    def _loss_of(self, raw, Y) -> float:
        if self.plan.model is None or raw is None or not len(raw):
            return float("inf")
        t = self.plan.model.tensors[self.plan.model.output]
        out = (np.asarray(raw).reshape(len(raw), -1).astype(np.float64) - int(t.zero_point)) * float(t.scale)
        if self.plan.loss == "mse":
            return float(np.mean((out - np.asarray(Y, dtype=np.float64).reshape(out.shape)) ** 2))
        labels = self._labels(Y, len(out))
        m = out.max(axis=1, keepdims=True)
        lse = (m + np.log(np.exp(out - m).sum(axis=1, keepdims=True)))[:, 0]
        return float(np.mean(lse - out[np.arange(len(out)), labels.astype(np.int64)]))

    # ------------------------------------------------------------------ inference
    def _predict_q(self, xq: np.ndarray) -> np.ndarray:
        return self._s.forward(xq).argmax(axis=1)

    def predict(self, X) -> np.ndarray:
        return self._predict_q(self._inputs(X))

    def evaluate(self, X, Y) -> float:
        """Accuracy of the current weights (int8 forward by the executor); for an ``mse`` plan, the
        mean squared error between the dequantized output and the float targets ``Y``."""
        if self.plan.loss == "mse":
            xq = self._inputs(X)
            if self.plan.model is None:
                raise ValueError("this plan was loaded without its model: use tt.Plan.load(path, model=q)")
            t = self.plan.model.tensors[self.plan.model.output]
            y = (self._s.forward(xq).astype(np.float32) - t.zero_point) * np.float32(t.scale)
            Y = np.asarray(Y, dtype=np.float32).reshape(len(xq), -1)
            if Y.shape != y.shape:
                raise ValueError(f"targets must have {y.shape[1]} values per sample, got {Y.shape[1]}")
            return float(np.mean((y - Y) ** 2)) if len(Y) else float("nan")
        pred = self.predict(X)
        Y = datacheck.plan_labels(self.plan, Y, len(pred))
        if len(Y) != len(pred):
            raise ValueError(f"{len(pred)} samples but {len(Y)} labels")
        return float((pred == Y).mean()) if len(Y) else float("nan")

    # ------------------------------------------------------------------ state
    def state(self) -> bytes:
        """The learned state (trained int8 weights, biases, precision and optimizer state)."""
        return bytes(self._s.state())

    def load_state(self, state: bytes) -> None:
        self._s.set_state(bytes(state))

    def reseed(self, seed: int) -> None:
        """Restarts the stochastic-rounding generator of the updates from ``seed`` (a new Trainer
        starts from the plan's seed). Nothing else changes."""
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= int(seed) < 2 ** 64:
            raise ValueError(f"seed must be an integer in [0, 2**64), got {seed!r}")
        self._s.reseed(int(seed))

    def reset(self) -> None:
        """Back to the plan's frozen parameters."""
        self._s.init()
        self.skipped_steps = 0
        self.steps_done = 0
        self._samples_since_sync = 0

    # ------------------------------------------------------------------ fleet updates
    def export_update(self, sample_count: Optional[int] = None) -> bytes:
        """The update blob of the current trained parameters (docs/fleet-update-format.md), the
        bytes a device running this plan sends; `tt.read_update` reads it. ``sample_count``
        defaults to the samples trained on (steps applied) since the trainer was created, reset or
        last given an update."""
        n = self._samples_since_sync if sample_count is None else sample_count
        return bytes(_core.session_export_update(self._s, _check_count(n)))

    def apply_update(self, update) -> None:
        """Loads trained parameters from a `tt.Update` or an update blob of this plan (e.g. a
        fleet's global update). The whole blob is checked before anything changes: a corrupted
        one or one of another plan raises `tt.UpdateError`. Where a weight changes, its extra
        update precision (residual / fp32 master) restarts from the new value; momentum is kept."""
        blob = update.to_bytes() if isinstance(update, Update) else update
        if not isinstance(blob, (bytes, bytearray, memoryview)):
            raise TypeError(f"apply_update expects a tt.Update or bytes, got {type(update).__name__}")
        _core.session_apply_update(self._s, bytes(blob))
        self._samples_since_sync = 0

    @property
    def model(self):
        """The trained `QuantizedModel`: a copy of the compiled model with the current weights."""
        if self.plan.model is None:
            raise ValueError("this plan was loaded without its model: use tt.Plan.load(path, model=q)")
        q = copy.deepcopy(self.plan.model)
        for li, name in enumerate(self.plan.layers):
            n = q.node(name)
            wq = np.asarray(n.params["weight_q"])
            if n.op == "conv":
                o, i, kh, kw = wq.shape
                w, b = self._s.read_layer(li, wq.size, o)
                n.params["weight_q"] = w.reshape(o, kh, kw, i).transpose(0, 3, 1, 2).copy()
            else:
                w, b = self._s.read_layer(li, wq.size, wq.shape[0])
                n.params["weight_q"] = w.reshape(wq.shape).copy()
            n.params["bias_q"] = b.astype(np.int32)
        return q

    # ------------------------------------------------------------------ export what was trained
    def trained_plan(self) -> Plan:
        """The plan with the current trained weights as its parameters: the same plan compiled
        again from `model` with the plan's settings and this trainer's rate, checked to have the
        plan's ops, buffers and layout (only the weights differ). Raises ValueError saying how
        otherwise (a plan loaded without its model, or a layout compile cannot reproduce)."""
        from .engine import compile as compile_plan
        from .schemes import Scheme

        r, nodes = self.plan._report, self.plan.meta.get("nodes", [])
        momentum = self.momentum if self.plan.momentum_buffers and self.momentum > 0 else self.plan.momentum
        base = dict(reorder=self.plan.reorder, update_precision=self.plan.update_precision, loss=self.plan.loss,
                    lr=self.lr if self.lr > 0 else self.plan.lr, momentum=momentum, seed=int(r["seed"]),
                    accumulate=self.plan.accumulate, stream_input=bool(r["stream_input"]))
        patch = None if r["patch"] is None else (nodes[r["patch"][0]], int(r["patch"][1]))
        layouts = [{}] + [dict(patch=patch, in_place=p) for p in (True, "all", False)]
        if self.plan.memory.budget_bytes is not None:
            layouts.append(dict(optimize="compute", budget=self.plan.memory.budget_bytes))
        def settings(report: Dict[str, object]) -> Dict[str, object]:
            # the rate, momentum and where the rate came from are this trainer's, not the layout's
            out = {k: v for k, v in report.items() if k not in ("lr", "momentum", "meta")}
            meta = json.loads(report.get("meta") or b"{}")
            meta.pop("lr_source", None)
            out["meta"] = meta
            return out

        same = lambda a, b: settings(a) == settings(b)  # noqa: E731
        q, scheme = self.model, Scheme.from_dict(self.plan.meta["scheme"])
        for layout in layouts:
            try:
                p = compile_plan(q, scheme, **base, **layout)
            except ValueError:
                continue
            if same(p._report, r):
                p.memory.budget_bytes = self.plan.memory.budget_bytes
                return p
        raise ValueError("cannot rebuild this plan with the trained weights (its layout was fixed in a way compile "
                         "does not reproduce): compile tr.model with the settings you used and export that plan")

    def export_mcu(self, out_dir: str, x=None, y=None, x_test=None, y_test=None) -> Dict[str, object]:
        """`Plan.export_mcu` of the trained weights (`trained_plan`): the firmware starts from what
        this trainer learned."""
        from .mcu import export_mcu

        return export_mcu(self.trained_plan(), out_dir, x, y, x_test, y_test, lr=self.lr)

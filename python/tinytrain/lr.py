"""The learning rate, chosen from the user's data instead of guessed: a short, seeded range test.

Int8 training has a narrow band of good rates that moves with the model's scales and the scheme:
a rate fine for one network (0.05) makes another's int8 logits saturate and its output constant
within a few hundred steps. `choose_lr` therefore measures, through the same compiled plan and
the same int8 training the device runs:

1. a held-out part of the data (seeded split) is set aside; a few hundred of the other samples
   are the range test's training steps;
2. for each log-spaced candidate rate, from small to large, the trainer restarts from the plan's
   frozen parameters (same seed), trains on those samples, and is scored on the held-out part:
   mean loss, accuracy, and whether training collapsed (int8 logits saturated, output
   independent of the input, loss frozen or above where it started; a run that predicts one
   class for every sample is judged by its held-out loss, as that is a normal early phase);
3. the search stops at the first collapse (larger rates only collapse faster) or once the
   held-out loss has worsened twice in a row;
4. the best rate is the one with the lowest held-out loss among those that did not collapse; the
   choice is half a step below it (the geometric mean with the next smaller candidate, also
   measured stable): the test's short run favours large rates, and real training runs longer,
   where a rate at the edge of the stable band can still tip over (the digits CNN learns best at
   0.03 in the test and collapses at 0.05 over three epochs).

`Trainer(plan)` (``lr="auto"``) runs this on the data of its first ``fit``; `tt.search` runs it
once on its training split; ``tinytrain train/search/compile --lr auto`` too.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

import numpy as np

__all__ = ["choose_lr", "LrChoice", "LrCandidate", "CANDIDATES", "FALLBACK_LR", "parse_lr"]

#: Rates the range test tries, smallest first (half-decade steps).
CANDIDATES = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.2)
#: The rate a plan compiled with ``lr="auto"`` stores when no data was there to choose one
#: (``tt.compile`` has none): low in the stable band of the models measured (the digits CNN trains
#: well at 0.003-0.01 and collapsed at 0.05 from one of two starts; ResNet-8's last layers learn
#: best near 0.05). A `Trainer` chooses from its data anyway; the device's rate can be set at run
#: time (``tt_set_lr``).
FALLBACK_LR = 0.005
#: Samples of the range test's short training run per candidate, and held-out samples scoring it.
#: 192 was too short for MLPerf's ResNet-8 (last 2 layers, new labels): every rate looked alike and
#: the test chose 0.00055 (32 % after 3 epochs); over 512 it chooses 0.055 (83 %).
TRAIN_SAMPLES = 512
VAL_SAMPLES = 256


@dataclass(frozen=True)
class LrCandidate:
    """One rate of the range test: held-out loss and accuracy (NaN for an ``mse`` plan) after the
    short run, and why it collapsed (None: it did not)."""

    lr: float
    val_loss: float
    val_accuracy: float
    collapse: Optional[str] = None

    def to_dict(self) -> dict:
        return {"lr": self.lr, "val_loss": self.val_loss, "val_accuracy": self.val_accuracy, "collapse": self.collapse}


@dataclass(frozen=True)
class LrChoice:
    """The outcome of `choose_lr`: the chosen ``lr``, every candidate tried (smallest first), the
    held-out loss before any training, the sample counts and the seconds the test took."""

    lr: float
    candidates: Tuple[LrCandidate, ...]
    start_loss: float
    train_samples: int
    val_samples: int
    seconds: float
    reason: str = field(default="")

    def summary(self) -> str:
        tried = ", ".join(f"{c.lr:g}" + (" collapsed" if c.collapse else "") for c in self.candidates)
        return (f"lr={self.lr:.3g} chosen by a range test ({self.reason}; tried {tried}; "
                f"{self.train_samples} training / {self.val_samples} held-out samples, {self.seconds:.1f} s)")

    def to_dict(self) -> dict:
        return {"lr": self.lr, "candidates": [c.to_dict() for c in self.candidates], "start_loss": self.start_loss,
                "train_samples": self.train_samples, "val_samples": self.val_samples, "seconds": self.seconds,
                "reason": self.reason}


def parse_lr(value) -> object:
    """``"auto"`` or a finite rate >= 0 (float or numeric string): what ``lr=`` and ``--lr`` take."""
    if isinstance(value, str):
        if value.strip().lower() == "auto":
            return "auto"
        try:
            value = float(value)
        except ValueError:
            raise ValueError(f"lr must be 'auto' or a number, got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"lr must be 'auto' or a finite number >= 0, got {value!r}")
    from .datacheck import check_lr

    return check_lr(value, allow_zero=True)  # checked in the float32 the core trains in


def _split(n: int, seed: int, val_samples: int, train_samples: int) -> Tuple[np.ndarray, np.ndarray]:
    if n < 4:
        raise ValueError(f"choosing the learning rate needs at least 4 samples, got {n}: give lr= explicitly")
    order = np.random.default_rng(seed).permutation(n)
    n_val = min(val_samples, max(2, n // 4))
    return order[n_val:n_val + train_samples], order[:n_val]


def choose_lr(plan, X, Y, *, seed: int = 0, candidates: Sequence[float] = CANDIDATES,
              train_samples: int = TRAIN_SAMPLES, val_samples: int = VAL_SAMPLES) -> LrChoice:
    """The learning rate for training ``plan`` on data like ``(X, Y)``, by a short seeded range
    test through the plan itself (see the module's text). Deterministic for a given seed.
    Raises ValueError when every candidate collapses (with what each did)."""
    from .trainer import Trainer, health

    t0 = time.perf_counter()
    if plan.model is None:
        raise ValueError("choosing the learning rate needs the plan's model (its output scale): "
                         "load the plan with tt.Plan.load(path, model=q), or give lr= explicitly")
    rates = sorted(float(parse_lr(c)) for c in candidates)
    if not rates or rates[0] <= 0:
        raise ValueError(f"candidates must be rates > 0, got {list(candidates)}")
    tr = Trainer(plan, lr=rates[0])
    xq = tr._inputs(X)
    Y = np.asarray(Y)
    if len(Y) != len(xq):
        raise ValueError(f"{len(xq)} samples but {len(Y)} targets")
    tr_idx, va_idx = _split(len(xq), seed, val_samples, train_samples)
    x_tr, y_tr, x_va, y_va = xq[tr_idx], Y[tr_idx], xq[va_idx], Y[va_idx]
    before = tr._probe(x_va, y_va)
    start = before.loss
    tried: List[LrCandidate] = []
    worse_in_a_row, best_loss = 0, math.inf
    batch = 8 if plan.accumulate else 1
    for lr in rates:
        tr.reset()
        tr.reseed(seed)
        tr.lr = lr
        losses: List[float] = []
        for s in range(0, len(x_tr), batch):
            got = tr._train(x_tr[s:s + batch], y_tr[s:s + batch])
            losses.extend(got[np.isfinite(got)].tolist())
        after = tr._probe(x_va, y_va)
        why = health(before, after, losses, start, len(x_tr), tr.skipped_steps, tr.steps_done, judge_prediction=False)
        if why is None and not after.loss < start:
            why = f"held-out loss {after.loss:.4g} not below {start:.4g} before training"
            bad_but_alive = True
        else:
            bad_but_alive = False
        tried.append(LrCandidate(lr, after.loss, after.accuracy, why))
        if why is not None and not bad_but_alive:
            break  # larger rates only collapse faster
        worse_in_a_row = worse_in_a_row + 1 if after.loss > best_loss else 0
        best_loss = min(best_loss, after.loss)
        if worse_in_a_row >= 2:
            break
    healthy = [c for c in tried if c.collapse is None]
    if not healthy:
        raise ValueError("no learning rate trains this plan on this data: "
                         + "; ".join(f"lr={c.lr:g}: {c.collapse}" for c in tried)
                         + ". Check the data and the model's output quantization, or give lr= explicitly")
    best = min(healthy, key=lambda c: (c.val_loss, c.lr))
    i = tried.index(best)
    reason = f"lowest held-out loss {best.val_loss:.3g} (from {start:.3g})"
    chosen = best.lr
    below = tried[i - 1] if i > 0 else None
    if below is not None and below.collapse is None:
        chosen = math.sqrt(best.lr * below.lr)
        reason += f" at {best.lr:g}; half a step below it, as a longer run than the test's favours a smaller rate"
    # the device and the plan hold the rate as a float32: report exactly what they will use
    return LrChoice(float(np.float32(chosen)), tuple(tried), float(start), int(len(x_tr)), int(len(x_va)),
                    time.perf_counter() - t0, reason)

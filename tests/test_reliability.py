"""Numeric faults: a non-finite loss or gradient skips the step (counted in ``skipped_steps``, weights
untouched, the next good sample trains normally), and a diverging learning rate is reported by
``fit`` (``history["diverged"]`` and a RuntimeWarning) instead of silently continuing."""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest

import tinytrain as tt

AUTOENCODER = Path(__file__).resolve().parent / "fixtures" / "tflite" / "autoencoder.onnx"


@pytest.fixture(scope="module")
def model():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return tt.fileio.load_model(str(AUTOENCODER))


def _data(q, n, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.random((n,) + tuple(q.tensors[q.input].shape)).astype(np.float32)
    y = rng.random((n, int(np.prod(q.tensors[q.output].shape)))).astype(np.float32)
    return x, y


@pytest.mark.parametrize("reorder", [True, False])
@pytest.mark.parametrize("precision", ["stochastic", "residual", "fp32"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_target_skips_the_step(model, reorder, precision, bad):
    plan = tt.compile(model, tt.schemes.full(model), loss="mse", reorder=reorder, update_precision=precision)
    tr = tt.Trainer(plan)
    x, y = _data(model, 3)
    assert np.isfinite(tr.step(x[:1], y[:1]))
    before = tr.state()
    y_bad = y[1:2].copy()
    y_bad[0, 5] = bad
    assert np.isnan(tr.step(x[1:2], y_bad))
    assert tr.skipped_steps == 1 and tr.steps_done == 2
    assert tr.state() == before, "a skipped step must not move any weight, bias or optimizer state"
    # The next good sample trains exactly as if the bad one had never come.
    ref = tt.Trainer(plan)
    ref.step(x[:1], y[:1])
    assert tr.step(x[2:3], y[2:3]) == ref.step(x[2:3], y[2:3])
    assert tr.state() == ref.state()
    assert tr.skipped_steps == 1


def test_non_finite_samples_inside_a_batch_are_skipped_alone(model):
    plan = tt.compile(model, tt.schemes.full(model), loss="mse")
    x, y = _data(model, 4, seed=1)
    y_bad = y.copy()
    y_bad[1, 0] = np.nan
    y_bad[3, 7] = np.inf
    tr = tt.Trainer(plan)
    loss = tr.step(x, y_bad)
    ref = tt.Trainer(plan)
    good = [ref.step(x[i:i + 1], y[i:i + 1]) for i in (0, 2)]
    assert tr.skipped_steps == 2 and tr.steps_done == 4
    assert tr.state() == ref.state()
    assert loss == pytest.approx(np.mean(good), rel=1e-6)


def test_fit_counts_skipped_steps_and_reports_a_finite_loss(model):
    plan = tt.compile(model, tt.schemes.full(model), loss="mse")
    x, y = _data(model, 16, seed=2)
    y[::4, 3] = np.nan
    tr = tt.Trainer(plan)
    hist = tr.fit(x, y, epochs=2, batch_size=4, verbose=False)
    assert tr.skipped_steps == 2 * 4 and tr.steps_done == 2 * 16
    assert all(np.isfinite(hist["loss"]))
    assert hist["diverged"] is False


def test_non_finite_learning_rate_is_refused(model):
    plan = tt.compile(model, tt.schemes.full(model), loss="mse")
    for lr in (np.nan, np.inf, -1.0):
        with pytest.raises(ValueError, match="lr must be a finite number"):
            tt.Trainer(plan, lr=lr)


def test_diverging_learning_rate_is_reported(model):
    plan = tt.compile(model, tt.schemes.full(model), loss="mse")
    x, y = _data(model, 64, seed=3)
    tr = tt.Trainer(plan, lr=1e30)
    with pytest.warns(RuntimeWarning, match=r"training collapsed in epoch 1 \(lr=1e\+30\): .*the loss grew from .* "
                                            r"lower it"):
        hist = tr.fit(x, y, epochs=2, batch_size=8, verbose=False)
    assert hist["diverged"] is True and hist["collapsed"] is True


def test_sane_learning_rate_is_not_reported(model):
    plan = tt.compile(model, tt.schemes.full(model), loss="mse")
    x, y = _data(model, 64, seed=3)
    tr = tt.Trainer(plan)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        hist = tr.fit(x, y, epochs=3, batch_size=8, verbose=False)
    assert hist["diverged"] is False
    assert hist["loss"][-1] <= hist["loss"][0]


def test_cli_train_reports_divergence(model, tmp_path, capsys):
    from tinytrain import cli

    x, y = _data(model, 64, seed=3)
    np.savez(tmp_path / "train.npz", x=x, y=y)
    args = ["train", str(AUTOENCODER), "--data", str(tmp_path / "train.npz"), "--loss", "mse",
            "--scheme", "full", "--lr", "1e30", "--epochs", "1", "-o", str(tmp_path / "t.onnx")]
    with pytest.warns(RuntimeWarning, match="training collapsed"):
        rc = cli.main(args)
    assert rc == 3 and not (tmp_path / "t.onnx").exists()
    assert "training collapsed at lr=1e+30: the loss grew" in capsys.readouterr().err
    with pytest.warns(RuntimeWarning, match="training collapsed"):
        assert cli.main(args + ["--keep-going"]) == 0
    assert "the loss diverged: lower the learning rate" in capsys.readouterr().out

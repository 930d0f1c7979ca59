"""Data checked at the door (issue 22 item 4, issue 24 item 7): what train, evaluate, search, export
and the CLI do with data the int8 cast would otherwise silently mangle, and exporting after training.

The demo model quantized on digits in [0, 1] (input scale 1/255, zero point -128) is the user's
classifier; the autoencoder and TFLite Micro-like fixtures are regressors.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest

import tinytrain as tt
from tinytrain import cli, datacheck
from tinytrain.errors import DataError, DataWarning, NonFiniteDataError

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "tflite"
AUTOENCODER = FIXTURES / "autoencoder.onnx"
RESNET8 = FIXTURES / "resnet8.onnx"


@pytest.fixture(scope="module")
def digits():
    x, y = tt.datasets.digits("target", "train")
    return x[:96], y[:96]


@pytest.fixture(scope="module")
def demo_q(digits):
    g = tt.load_onnx(tt.models.DEMO_PATH)
    return tt.quantize(g, digits[0][:64])


@pytest.fixture()
def plan(demo_q):
    return tt.compile(demo_q, tt.schemes.last_layers(demo_q, 2), lr=0.005)


# ---------------------------------------------------------------------- inputs
def test_nan_and_inf_inputs_are_refused_with_a_count(plan, digits):
    x, y = digits
    bad = x[:16].copy()
    bad[3, 0, 4, 4] = np.nan
    bad[3, 0, 5, 5] = np.inf
    bad[9, 0, 0, 0] = -np.inf
    tr = tt.Trainer(plan)
    for call in (lambda: tr.fit(bad, y[:16], verbose=False), lambda: tr.step(bad, y[:16]),
                 lambda: tr.evaluate(bad, y[:16]), lambda: tr.predict(bad),
                 lambda: plan.export_mcu("unused", bad, y[:16])):
        with pytest.raises(NonFiniteDataError, match=r"3 of 16384 values are NaN or infinite, in 2 of 16 samples "
                                                     r"\(first: sample 3\)") as e:
            call()
        assert (e.value.count, e.value.samples, e.value.first) == (3, 2, 3)
    assert tr.steps_done == 0, "nothing may train on refused data"


def test_8_bit_pixels_are_divided_by_255_with_a_note(plan, digits):
    x, y = digits
    pixels = np.round(x[:32] * 255).astype(np.uint8)
    tr, ref = tt.Trainer(plan), tt.Trainer(plan)
    with pytest.warns(DataWarning, match=r"values 0\.\.255 look like 8-bit pixels .* divided by 255"):
        h = tr.fit(pixels, y[:32], epochs=1, verbose=False)
    h_ref = ref.fit(pixels.astype(np.float32) / 255, y[:32], epochs=1, verbose=False)
    assert h["loss"] == h_ref["loss"] and tr.state() == ref.state()
    with pytest.warns(DataWarning):  # float32 0-255 data too
        assert tr.evaluate(pixels.astype(np.float32), y[:32]) == tr.evaluate(pixels / 255.0, y[:32])


def test_data_on_another_scale_is_refused_with_the_fix(plan, digits):
    x, y = digits
    standardized = (x[:16] - 0.5) * 8
    with pytest.raises(DataError, match=r"outside the model's input range \[0, 1\] \(int8 scale 0\.003922, zero "
                                        r"point -128\), where the int8 cast would clip them; scale them"):
        tt.Trainer(plan).fit(standardized, y[:16], verbose=False)


def test_data_far_below_the_input_resolution_is_warned_about(digits):
    """A model whose input covers 0..255 (as MLPerf Tiny's ResNet-8) given [0, 1] floats."""
    x, _ = digits
    g = tt.load_onnx(tt.models.DEMO_PATH)
    q255 = tt.quantize(g, x[:32] * 255)
    t = q255.tensors[q255.input]
    with pytest.warns(DataWarning, match=r"span only 1\.0 int8 levels"):
        datacheck.check_inputs(x[:8], t.scale, t.zero_point)


# ---------------------------------------------------------------------- labels
def test_column_labels_train_as_flat_labels(plan):
    """(N, 1) labels made fit report 359.7 % accuracy (a (B,) == (B, 1) broadcast); on the digits
    the demo model was pretrained on, most predictions are right and the broadcast shows."""
    x, y = tt.datasets.digits("source", "test")
    h_col = tt.Trainer(plan).fit(x[:48], y[:48, None], epochs=1, verbose=False)
    h = tt.Trainer(plan).fit(x[:48], y[:48], epochs=1, verbose=False)
    assert 0.5 < h_col["accuracy"][0] <= 1.0
    assert h_col["accuracy"] == h["accuracy"] and h_col["loss"] == h["loss"]


def test_one_hot_labels_are_class_indices(plan, digits):
    x, y = digits
    one_hot = np.eye(10, dtype=np.float32)[y[:48]]
    a, b = tt.Trainer(plan), tt.Trainer(plan)
    assert a.fit(x[:48], one_hot, epochs=1, verbose=False) == b.fit(x[:48], y[:48], epochs=1, verbose=False)
    assert a.evaluate(x[48:], np.eye(10)[y[48:]]) == b.evaluate(x[48:], y[48:])


def test_labels_outside_the_classes_are_refused(plan, digits, tmp_path):
    x, y = digits
    wrong = y[:16] + 10  # e.g. labels of a 20-class set
    tr = tt.Trainer(plan)
    with pytest.raises(DataError, match=r"16 of 16 labels lie outside the model's 10 classes \(values 15\.\.19"):
        tr.evaluate(x[:16], wrong)
    with pytest.raises(DataError, match="outside the model's 10 classes"):
        plan.export_mcu(str(tmp_path / "bundle"), x[:16], wrong)
    assert not (tmp_path / "bundle").exists()


def test_float_targets_do_not_switch_a_classifier_to_mse(plan, digits):
    x, _ = digits
    targets = np.random.default_rng(0).random((16, 10)).astype(np.float32)
    with pytest.raises(DataError, match=r"float targets \(16, 10\) but the model trains cross-entropy over 10 "
                                        r"classes .* loss='mse'"):
        tt.Trainer(plan).fit(x[:16], targets, verbose=False)


def test_the_loss_comes_from_the_model():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ae = tt.fileio.load_model(str(AUTOENCODER))
        r8 = tt.fileio.load_model(str(RESNET8))
    assert datacheck.choose_loss(ae, "auto") == ("mse", "the model is a regressor: output shaped as its input "
                                                        "(64, 1, 1): an autoencoder")
    assert datacheck.choose_loss(r8, "auto")[0] == "cross_entropy"
    assert datacheck.choose_loss(ae, "cross_entropy") == ("cross_entropy", "asked for")


# ---------------------------------------------------------------------- learning rates
@pytest.mark.parametrize("lr", [1e39, -1e39, np.nan, 1e-50, -0.1])
def test_learning_rates_are_checked_in_float32(plan, demo_q, lr):
    with pytest.raises(ValueError, match="lr must be a finite number .* in float32"):
        tt.Trainer(plan, lr=lr)
    with pytest.raises(ValueError, match="lr must be a finite number > 0 in float32"):
        tt.compile(demo_q, tt.schemes.last_layers(demo_q, 1), lr=lr)
    with pytest.raises(ValueError, match="lr must be a finite number > 0 in float32"):
        tt.search(demo_q, np.zeros((4, 1, 32, 32), np.float32), np.zeros(4, np.int64), lr=lr)
    tr = tt.Trainer(plan)
    with pytest.raises(ValueError, match="in float32"):
        tr.lr = lr
    assert tt.Trainer(plan, lr=0.0).lr == 0.0  # rate 0: the same work, weights kept (timing runs)


# ---------------------------------------------------------------------- export after training
def test_export_after_fit_ships_what_was_trained(plan, digits, tmp_path):
    x, y = digits
    tr = tt.Trainer(plan)
    tr.fit(x[:64], y[:64], epochs=1, verbose=False)
    trained_acc = tr.evaluate(x[64:], y[64:])
    with pytest.raises(DataError, match=r"plan.export_mcu would ship the initial weights. Export what was "
                                        r"trained with tr.export_mcu"):
        plan.export_mcu(str(tmp_path / "stale"))
    assert not (tmp_path / "stale").exists()
    m = tr.export_mcu(str(tmp_path / "trained"), x[:4], y[:4])
    shipped = tt.Plan((tmp_path / "trained" / "plan.bin").read_bytes(),
                      (tmp_path / "trained" / "params.bin").read_bytes(), model=plan.model)
    assert shipped.params != plan.params and m["arena_bytes"] == plan.memory.peak_bytes
    assert shipped._report["ops"] == plan._report["ops"]
    fresh = tt.Trainer(shipped)
    assert fresh.evaluate(x[64:], y[64:]) == trained_acc
    assert np.array_equal(fresh.predict(x[64:]), tr.predict(x[64:]))
    # The initial weights on purpose.
    plan.export_mcu(str(tmp_path / "initial"), initial_weights=True)
    assert (tmp_path / "initial" / "params.bin").read_bytes() == plan.params


# ---------------------------------------------------------------------- command line
def _npz(path, x, y):
    np.savez(path, X=x, Y=y)
    return str(path)


def test_cli_refuses_nan_data_naming_the_file(tmp_path, capsys, digits, demo_q):
    x, y = digits
    bad = x[:8].copy()
    bad[1, 0, 2, 2] = np.nan
    data = _npz(tmp_path / "nan.npz", bad, y[:8])
    demo_q.to_onnx(str(tmp_path / "q.onnx"))
    assert cli.main(["evaluate", str(tmp_path / "q.onnx"), "--data", data]) == 1
    err = capsys.readouterr().err
    assert f"{data}: inputs: 1 of 8192 values are NaN or infinite, in 1 of 8 samples (first: sample 1)" in err
    assert cli.main(["train", str(tmp_path / "q.onnx"), "--data", data, "--scheme", "last:1", "-o",
                     str(tmp_path / "t.onnx")]) == 1
    assert "NaN or infinite" in capsys.readouterr().err and not (tmp_path / "t.onnx").exists()


def test_cli_evaluate_scores_by_the_model_not_the_label_dtype(tmp_path, capsys, digits, demo_q):
    x, y = digits
    demo_q.to_onnx(str(tmp_path / "q.onnx"))
    assert cli.main(["evaluate", str(tmp_path / "q.onnx"), "--data", _npz(tmp_path / "a.npz", x, y), "--json"]) == 0
    acc = json.loads(capsys.readouterr().out)["accuracy"]
    one_hot = _npz(tmp_path / "b.npz", x, np.eye(10, dtype=np.float32)[y])
    assert cli.main(["evaluate", str(tmp_path / "q.onnx"), "--data", one_hot, "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"model": str(tmp_path / "q.onnx"), "samples": len(x),
                                                   "accuracy": acc}
    assert cli.main(["evaluate", str(tmp_path / "q.onnx"), "--data", _npz(tmp_path / "c.npz", x, y + 10)]) == 1
    assert "labels lie outside the model's 10 classes" in capsys.readouterr().err


def test_cli_export_refuses_labels_outside_the_classes(tmp_path, capsys, plan, digits):
    x, y = digits
    plan.save(str(tmp_path / "p.ttp"))
    data = _npz(tmp_path / "d.npz", x[:8], y[:8] + 10)
    assert cli.main(["export", str(tmp_path / "p.ttp"), "--mcu", str(tmp_path / "b"), "--data", data]) == 1
    assert "outside the model's 10 classes" in capsys.readouterr().err
    assert not (tmp_path / "b" / "train_y.bin").exists()


def test_cli_train_says_the_loss_it_chose(tmp_path, capsys):
    rng = np.random.default_rng(0)
    x = rng.random((16, 64, 1, 1)).astype(np.float32)
    data = _npz(tmp_path / "ae.npz", x, x.reshape(16, 64))
    rc = cli.main(["train", str(AUTOENCODER), "--data", data, "--scheme", "last:1", "--lr", "0.001",
                   "--epochs", "1", "-o", str(tmp_path / "t.onnx"), "--json"])
    assert rc == 0
    out = capsys.readouterr()
    assert "note: loss mse: the model is a regressor: output shaped as its input (64, 1, 1): an autoencoder" in out.err
    assert json.loads(out.out)["history"]["accuracy"] == [None] or "loss" in json.loads(out.out)["history"]


def test_cli_refuses_a_learning_rate_that_is_inf_in_float32(tmp_path, capsys, digits, demo_q):
    x, y = digits
    demo_q.to_onnx(str(tmp_path / "q.onnx"))
    with pytest.raises(SystemExit) as exit_:  # refused as the command line is read
        cli.main(["train", str(tmp_path / "q.onnx"), "--data", _npz(tmp_path / "d.npz", x[:8], y[:8]),
                  "--scheme", "last:1", "--lr", "1e39", "-o", str(tmp_path / "t.onnx")])
    assert exit_.value.code == 2
    assert "in float32, the precision training runs in; got 1e+39 (float32: inf)" in capsys.readouterr().err
    assert not (tmp_path / "t.onnx").exists()


# ---------------------------------------------------------------------- float weights
def test_non_finite_float_weights_are_refused_at_quantize(digits):
    x, _ = digits
    g = tt.load_onnx(tt.models.DEMO_PATH)
    layer = g.node(g.layers[3])
    layer.params["weight"] = layer.params["weight"].copy()
    layer.params["weight"].reshape(-1)[[0, 7]] = (np.nan, np.inf)
    with pytest.raises(tt.QuantizationError, match=rf"layer '{g.layers[3]}': 2 of {layer.params['weight'].size} "
                                                   r"float weight values are NaN or infinite"):
        tt.quantize(g, x[:8])


@pytest.mark.parametrize("settings", [dict(optimize="compute", budget="256KB"), dict(patch=None, in_place=False),
                                      dict(patch=("conv_2", 2), in_place="all"),
                                      dict(accumulate=True, update_precision="fp32"),
                                      dict(momentum=0.5, update_precision="residual", reorder=False)])
def test_the_trained_plan_keeps_the_plans_layout_and_settings(demo_q, digits, settings):
    x, y = digits
    plan = tt.compile(demo_q, tt.schemes.last_layers(demo_q, 3), lr=0.005, **settings)
    tr = tt.Trainer(plan)
    tr.fit(x[:40], y[:40], epochs=1, verbose=False)
    trained = tr.trained_plan()
    assert trained.params != plan.params
    assert {k: v for k, v in trained._report.items() if k not in ("lr", "momentum")} == \
        {k: v for k, v in plan._report.items() if k not in ("lr", "momentum")}
    assert np.array_equal(tt.Trainer(trained).predict(x[40:]), tr.predict(x[40:]))


def test_compile_takes_the_loss_from_the_model_and_search_refuses_a_regressor():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ae = tt.fileio.load_model(str(AUTOENCODER))
    assert tt.compile(ae, tt.schemes.last_layers(ae, 1)).loss == "mse"
    x = np.random.default_rng(0).random((8, 64, 1, 1)).astype(np.float32)
    with pytest.raises(DataError, match=r"tt.search ranks schemes by held-out accuracy and this model trains with "
                                        r"mse \(the model is a regressor: output shaped as its input"):
        tt.search(ae, x, x.reshape(8, 64))


def test_a_few_clipping_values_are_warned_about_not_refused(plan, digits):
    x, y = digits
    strays = x[:16].copy()
    strays[:, :, :2, :] = 1.5  # 2 of 32 rows: 6.25 % of the values beyond the [0, 1] input
    with pytest.warns(DataWarning, match=r"6\.2 % of the values \(0\.\.1\.5\) lie outside the model's input range"):
        tt.Trainer(plan).evaluate(strays, y[:16])

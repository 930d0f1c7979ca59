"""The learning rate chosen from the data (lr="auto"), collapse reported by fit / CLI / search, and
the search never below its simple baselines (issue 22)."""
import importlib.util
import os
import warnings

import numpy as np
import pytest

import tinytrain as tt
from tinytrain import cli
from tinytrain.lr import CANDIDATES, FALLBACK_LR

HERE = os.path.dirname(os.path.abspath(__file__))
_spec = importlib.util.spec_from_file_location("adapt_bench", os.path.join(HERE, "..", "benches", "adapt.py"))
adapt = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(adapt)


@pytest.fixture(scope="module")
def demo_q():
    x, _ = tt.datasets.digits("source", "train")
    return tt.quantize(tt.load_onnx(tt.models.demo()), x[:64])


@pytest.fixture(scope="module")
def target():
    x, y = tt.datasets.digits("target", "train")
    return x[:240], y[:240]


def test_choose_lr_is_seeded_and_reports_every_candidate(demo_q, target):
    x, y = target
    plan = tt.compile(demo_q, tt.schemes.last_layers(demo_q, 2))
    a = tt.choose_lr(plan, x, y, seed=0)
    b = tt.choose_lr(plan, x, y, seed=0)
    assert a.lr == b.lr and a.candidates == b.candidates
    assert isinstance(a, tt.LrChoice) and a.seconds > 0
    tried = [c.lr for c in a.candidates]
    # the rates as the core trains with them (float32)
    assert tried == sorted(tried) and set(tried) <= {float(np.float32(c)) for c in CANDIDATES}
    healthy = [c for c in a.candidates if c.collapse is None]
    best = min(healthy, key=lambda c: c.val_loss)
    # half a step below the best measured rate, never above it
    assert min(tried) <= a.lr <= best.lr
    assert best.val_loss < a.start_loss
    assert f"lr={a.lr:.3g}" in a.summary()


def test_auto_is_the_default_and_chooses_on_the_first_fit(demo_q, target):
    x, y = target
    plan = tt.compile(demo_q, tt.schemes.last_layers(demo_q, 2))
    assert plan.lr == pytest.approx(FALLBACK_LR) and plan.meta["lr_source"] == "auto"
    tr = tt.Trainer(plan)
    assert tr.lr_pending and tr.lr == pytest.approx(FALLBACK_LR)  # step() before fit: the plan's rate
    hist = tr.fit(x, y, epochs=1, batch_size=1, verbose=False)
    assert not tr.lr_pending and tr.lr_choice is not None
    assert hist["lr"] == tr.lr == pytest.approx(tr.lr_choice.lr) and hist["lr_choice"]["lr"] == hist["lr"]
    assert not hist["collapsed"] and hist["loss"][0] < 2.0
    # a rate given to compile is the plan's and is used as given; a number given to Trainer too
    given = tt.compile(demo_q, tt.schemes.last_layers(demo_q, 2), lr=0.02)
    tr = tt.Trainer(given)
    assert not tr.lr_pending and tr.lr == pytest.approx(0.02)
    assert tt.Trainer(plan, lr=0.01).lr == pytest.approx(0.01) and not tt.Trainer(plan, lr=0.01).lr_pending
    for bad in ("fast", float("nan"), -1.0):
        with pytest.raises(ValueError, match="lr must be"):
            tt.Trainer(plan, lr=bad)


def test_a_rate_made_to_collapse_is_reported_by_fit(demo_q, target):
    x, y = target
    plan = tt.compile(demo_q, tt.schemes.full(demo_q))
    tr = tt.Trainer(plan, lr=1.0)
    with pytest.warns(RuntimeWarning, match=r"training collapsed in epoch 1 \(lr=1\).*lower it"):
        hist = tr.fit(x, y, epochs=1, batch_size=1, verbose=False)
    assert hist["collapsed"] is True and hist["collapse"]
    assert any(k in hist["collapse"] for k in ("same class", "saturated", "same for every sample", "frozen", "grew"))
    # the same plan at the chosen rate is healthy, without a warning
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        hist = tt.Trainer(plan).fit(x, y, epochs=1, batch_size=1, verbose=False)
    assert hist["collapsed"] is False and hist["collapse"] is None


def _files(q, data, folder):
    """The model and the data as the command line takes them."""
    model, npz = folder / "q.onnx", folder / "d.npz"
    q.to_onnx(str(model))
    np.savez(npz, X=data[0], Y=data[1])
    return model, npz


def test_cli_train_exits_non_zero_on_collapse_unless_keep_going(demo_q, tmp_path, target, capsys):
    model, data = _files(demo_q, target, tmp_path)
    out = tmp_path / "t.onnx"
    args = ["train", str(model), "--data", str(data), "--scheme", "full", "--epochs", "1", "-o", str(out)]
    with pytest.warns(RuntimeWarning, match="collapsed"):
        rc = cli.main(args + ["--lr", "1.0"])
    assert rc == 3 and not out.exists()
    assert "training collapsed at lr=1" in capsys.readouterr().err
    with pytest.warns(RuntimeWarning, match="collapsed"):
        rc = cli.main(args + ["--lr", "1.0", "--keep-going"])
    assert rc == 0 and out.exists()
    out.unlink()
    rc = cli.main(args)  # lr auto by default
    text = capsys.readouterr().out
    assert rc == 0 and out.exists() and "chosen by a range test" in text


def test_cli_compile_takes_the_rate_the_firmware_uses(demo_q, tmp_path, target, capsys):
    x, y = target
    model, data = _files(demo_q, target, tmp_path)
    base = ["compile", str(model), "--scheme", "last:2"]
    assert cli.main(base + ["--lr", "0.0125", "-o", str(tmp_path / "a.ttp")]) == 0
    plan = tt.Plan.load(str(tmp_path / "a.ttp"))
    assert plan.lr == pytest.approx(0.0125)
    m = plan.export_mcu(str(tmp_path / "mcu"))
    assert m["lr"] == pytest.approx(0.0125)
    assert np.frombuffer((tmp_path / "mcu" / "lr.bin").read_bytes(), "<f4")[0] == pytest.approx(0.0125)
    assert cli.main(base + ["--data", str(data), "-o", str(tmp_path / "b.ttp")]) == 0
    assert "chosen by a range test" in capsys.readouterr().out
    chosen = tt.choose_lr(tt.compile(demo_q, tt.schemes.last_layers(demo_q, 2)), x, y, seed=0).lr
    assert tt.Plan.load(str(tmp_path / "b.ttp")).lr == pytest.approx(chosen)
    assert cli.main(base + ["-o", str(tmp_path / "c.ttp")]) == 0
    assert "no --data" in capsys.readouterr().out
    assert tt.Plan.load(str(tmp_path / "c.ttp")).lr == pytest.approx(FALLBACK_LR)


SMALL = dict(population=12, generations=4, epochs=1, workers=1, ratios=(0.25, 1.0))


def test_search_is_never_below_its_baselines(demo_q, target, tmp_path):
    x, y = target
    r = tt.search(demo_q, x, y, budget="256KB", seed=0, cache_dir=str(tmp_path), **SMALL)
    assert r.lr_choice is not None  # the contribution analysis's rate
    # in the final comparison each scheme trained at its own chosen rate; the winner's is returned
    rows = r.verified + r.baselines
    assert all(v["lr"] > 0 for v in rows if v["collapse"] is None)
    won = next(v for v in rows if v["scheme"] == r.scheme and v["accuracy"] == r.accuracy)
    assert r.lr == won["lr"]
    final = [c for c in r.collapsed if c["stage"] == "verification" and c["what"].startswith("searched")]
    assert not final, final  # at its own chosen rate no searched scheme of the final comparison collapses
    names = [b["name"] for b in r.baselines]
    assert names[:2] == ["classifier", "bias_only"] and "last_2" in names
    assert all(b["peak_bytes"] <= r.budget_bytes for b in r.baselines)
    assert r.accuracy >= max(np.nan_to_num(b["accuracy"]) for b in r.baselines)  # collapsed ones included
    assert r.winner == "searched" or r.winner in names
    if r.winner != "searched":
        assert r.scheme == next(b["scheme"] for b in r.baselines if b["name"] == r.winner)
    assert r.margin_points >= 0
    assert "<- winner" in r.baseline_table()
    # a tighter budget keeps only the baselines that fit it
    tight = tt.search(demo_q, x, y, budget=r.baselines[2]["peak_bytes"], seed=0, cache_dir=str(tmp_path), **SMALL)
    assert all(b["peak_bytes"] <= tight.budget_bytes for b in tight.baselines)
    assert tight.accuracy >= max(np.nan_to_num(b["accuracy"]) for b in tight.baselines)


def test_search_made_to_collapse_says_so(demo_q, target, tmp_path):
    x, y = target
    with pytest.warns(RuntimeWarning, match="final comparison collapsed"):
        try:
            r = tt.search(demo_q, x, y, budget="256KB", seed=0, cache_dir=str(tmp_path), lr=1.0, **SMALL)
        except ValueError as exc:  # every scheme collapsed: nothing is returned
            assert "collapsed" in str(exc)
            return
    # what is returned did not collapse; what collapsed is listed and was left out
    final = [c for c in r.collapsed if c["stage"] == "verification"]
    assert final and all(c["lr"] == 1.0 for c in final)
    rows = r.verified + r.baselines
    assert next(v for v in rows if v["scheme"] == r.scheme and v["accuracy"] == r.accuracy)["collapse"] is None


def test_cli_search_reports_collapse(demo_q, target, tmp_path, capsys):
    model, data = _files(demo_q, target, tmp_path)
    out = tmp_path / "s.json"
    with pytest.warns(RuntimeWarning, match="collapsed"):
        rc = cli.main(["search", str(model), "--data", str(data), "-o", str(out), "--lr", "1.0", "--population", "8",
                       "--generations", "2", "--epochs", "1", "--workers", "1", "--ratios", "1"])
    assert rc != 0 and not out.exists()
    assert "collapsed" in capsys.readouterr().err


@pytest.fixture(scope="module")
def user_cnn():
    return adapt.pretrained(seed=0)


def test_user_cnn_adapts_to_rotated_digits_with_no_rate_given(user_cnn):
    """The user's scenario: their own float CNN pretrained on upright digits, exported to ONNX,
    quantized, adapted to digits rotated 90 degrees with no learning rate anywhere: within 3 points
    of float SGD at its best rate (the same epochs, every parameter trained)."""
    model, upright = user_cnn
    assert upright > 0.9
    run = adapt.int8_adapt(model, epochs=3)
    ref = adapt.float_sgd_best(model, epochs=3)
    assert run["accuracy_before"] < 0.5 and not run["collapsed"]
    assert run["accuracy"] >= ref["accuracy"] - 0.03, (run, ref)
    assert run["range_test_seconds"] < 0.5 * run["fit_seconds"]

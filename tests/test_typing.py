"""The package is typed for its users: ``py.typed`` and ``_core.pyi`` ship with it, and a short
user session type-checks under ``mypy --strict`` against the installed package, while a wrong call
in the same session is caught."""
import os
import subprocess
import sys
import textwrap

import pytest

import tinytrain

pytest.importorskip("mypy", reason="the typing checks need mypy (pip install -e '.[test]')")

SESSION = textwrap.dedent("""\
    import numpy as np
    import tinytrain as tt

    x, y = tt.datasets.digits("target", "train")
    g = tt.load_onnx(tt.models.demo())
    q = tt.quantize(g, x[:64])
    plan: tt.Plan = tt.compile(q, tt.Scheme(bias_layers=["fc_0"], weight_ratios={"fc_0": 0.25}), budget="256KB")
    tr = tt.Trainer(plan, lr=0.05)
    history = tr.fit(x[:64], y[:64], epochs=1, batch_size=1, verbose=False)
    accuracy: float = tr.evaluate(x[64:128], y[64:128])
    logits: np.ndarray = q.forward(x[:4])
    print(plan.memory.peak_bytes, history["loss"][-1], accuracy, logits.shape)
    """)


def _mypy(tmp_path, source: str) -> subprocess.CompletedProcess:
    script = tmp_path / "session.py"
    script.write_text(source)
    # run from an empty folder: mypy must find tinytrain where it is installed, not in a checkout
    return subprocess.run([sys.executable, "-m", "mypy", "--strict", "--no-incremental", str(script)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600)


def test_the_package_ships_its_type_information():
    here = os.path.dirname(tinytrain.__file__)
    assert os.path.exists(os.path.join(here, "py.typed"))
    assert os.path.exists(os.path.join(here, "_core.pyi"))


def test_a_user_session_passes_mypy_strict(tmp_path):
    r = _mypy(tmp_path, SESSION)
    assert r.returncode == 0, r.stdout + r.stderr


def test_mypy_strict_catches_a_wrong_call(tmp_path):
    wrong = SESSION.replace("tt.Trainer(plan, lr=0.05)", "tt.Trainer(plan, lr=[0.05])")
    r = _mypy(tmp_path, wrong)
    assert r.returncode == 1 and 'incompatible type "list[float]"' in r.stdout, r.stdout + r.stderr

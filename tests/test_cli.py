import json
import subprocess
import sys

import tinytrain


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "tinytrain.cli", *args], capture_output=True, text=True)


def test_version_comes_from_the_rust_core():
    assert tinytrain.__version__ == tinytrain._core.__version__
    assert tinytrain.__version__.count(".") == 2


def test_demo_learns_new_digits_within_budget(tmp_path):
    res = run_cli("demo", "--json", "--no-peers", "--epochs", "2", "--out", str(tmp_path))
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)
    assert report["accuracy_before"] < 0.05  # the pretrained model has never seen digits 5-9
    assert report["accuracy_after"] > 0.75
    assert report["fits"] and report["peak_bytes"] <= report["budget_bytes"] == 256 * 1024
    assert report["measured_high_water_bytes"] == report["peak_bytes"]
    for name in ("loss", "memory", "search"):
        assert (tmp_path / f"{name}.png").stat().st_size > 10_000
    assert (tmp_path / "demo.ttp").exists() and (tmp_path / "trained_int8.onnx").exists()


def test_unknown_command_is_a_usage_error():
    res = run_cli("no-such-command")
    assert res.returncode == 2
    assert "invalid choice" in res.stderr

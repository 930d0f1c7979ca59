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


def test_cli_pipeline_quantize_train_evaluate_search(tmp_path):
    import numpy as np
    import onnx

    src_x, src_y = tinytrain.datasets.digits("source", "train")
    tr_x, tr_y = tinytrain.datasets.digits("target", "train")
    te_x, te_y = tinytrain.datasets.digits("target", "test")
    np.savez(tmp_path / "calib.npz", X=src_x[:128], Y=src_y[:128])
    np.savez(tmp_path / "train.npz", X=tr_x[:300], Y=tr_y[:300])
    np.savez(tmp_path / "test.npz", X=te_x, Y=te_y)
    onnx.save(tinytrain.models.demo(), str(tmp_path / "demo.onnx"))
    q_path, trained = str(tmp_path / "q.onnx"), str(tmp_path / "trained.onnx")

    res = run_cli("quantize", str(tmp_path / "demo.onnx"), "--calib", str(tmp_path / "calib.npz"), "-o", q_path)
    assert res.returncode == 0, res.stderr
    res = run_cli("evaluate", q_path, "--data", str(tmp_path / "test.npz"), "--json")
    assert res.returncode == 0, res.stderr
    before = json.loads(res.stdout)["accuracy"]

    res = run_cli("train", q_path, "--data", str(tmp_path / "train.npz"), "--scheme", "last:4", "--budget", "256KB",
                  "--epochs", "2", "-o", trained, "--json")
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)
    assert report["measured_high_water_bytes"] == report["peak_bytes"] <= 256 * 1024
    res = run_cli("evaluate", trained, "--data", str(tmp_path / "test.npz"), "--json")
    after = json.loads(res.stdout)["accuracy"]
    assert before < 0.05 and after > 0.7

    scheme = str(tmp_path / "scheme.json")
    np.savez(tmp_path / "search.npz", X=tr_x[:80], Y=tr_y[:80])
    res = run_cli("search", q_path, "--data", str(tmp_path / "search.npz"), "--budget", "48KB", "-o", scheme, "--ratios", "1",
                  "--population", "8", "--generations", "2", "--epochs", "1", "--workers", "1", "--json")
    assert res.returncode == 0, res.stderr
    found = json.loads(res.stdout)
    assert found["peak_bytes"] <= 48 * 1024
    res = run_cli("memory", q_path, "--scheme", scheme, "--json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["peak_bytes"] == found["peak_bytes"]


def test_cli_errors_are_one_line_with_nonzero_exit(tmp_path):
    import onnx

    onnx.save(tinytrain.models.demo(), str(tmp_path / "demo.onnx"))
    res = run_cli("compile", str(tmp_path / "demo.onnx"), "--scheme", "full", "--budget", "8KB", "-o", str(tmp_path / "p.ttp"))
    assert res.returncode != 0
    assert "Traceback" not in res.stderr
    assert "bytes" in res.stderr and "8192" in res.stderr
    assert not (tmp_path / "p.ttp").exists()

    (tmp_path / "broken.onnx").write_bytes(b"\x08\x07garbage")
    res = run_cli("inspect", str(tmp_path / "broken.onnx"))
    assert res.returncode != 0 and "Traceback" not in res.stderr
    assert "broken.onnx" in res.stdout + res.stderr


def test_cli_export_onnx_of_a_tflite_or_onnx_model(tmp_path):
    import numpy as np
    import onnxruntime as ort

    x, _ = tinytrain.datasets.digits("target", "test")
    np.save(tmp_path / "calib.npy", x[:64])
    import onnx

    onnx.save(tinytrain.models.demo(), str(tmp_path / "demo.onnx"))
    out = str(tmp_path / "demo_int8.onnx")
    res = run_cli("export", str(tmp_path / "demo.onnx"), "--onnx", out, "--calib", str(tmp_path / "calib.npy"))
    assert res.returncode == 0, res.stderr
    q = tinytrain.quantize(tinytrain.load_onnx(str(tmp_path / "demo.onnx")), x[:64])
    sess = ort.InferenceSession(out, providers=["CPUExecutionProvider"])
    logits = sess.run(["logits"], {sess.get_inputs()[0].name: x[:32]})[0]
    assert (logits.argmax(1) == q.forward(x[:32]).argmax(1)).mean() >= 0.97

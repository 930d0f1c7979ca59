import json
import subprocess
import sys

import tinytrain


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "tinytrain.cli", *args], capture_output=True, text=True)


def test_version_comes_from_the_rust_core():
    assert tinytrain.__version__ == tinytrain._core.__version__
    assert tinytrain.__version__.count(".") == 2


def test_demo_json_is_one_object():
    res = run_cli("demo", "--json")
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)
    assert report["version"] == tinytrain.__version__


def test_unknown_command_is_a_usage_error():
    res = run_cli("no-such-command")
    assert res.returncode == 2
    assert "invalid choice" in res.stderr

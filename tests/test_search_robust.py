"""The contribution analysis under faults: a worker process killed mid-run is reported and the
unfinished jobs rerun once, with a result identical to a serial run of the same seed; a cache
file from another model/data/settings, or one that is not JSON, is not trusted but recomputed
with a warning."""
import json
import multiprocessing
import os
import shutil
import signal
import threading
import time

import pytest

import tinytrain as tt
from tinytrain import sparse_search as search_mod
from test_search import demo_q  # noqa: F401  (the quantized demo model, a module fixture)

SETTINGS = search_mod.FineTuneSettings(epochs=1)
RATIOS = (1.0,)


@pytest.fixture(scope="module")
def target_data():
    x, y = tt.datasets.digits("target", "train")
    return x[:30], y[:30]


def _analysis(q, data, workers, cache_dir, seed=5):
    x, y = data
    return search_mod.contribution_analysis(q, x, y, RATIOS, SETTINGS, seed, workers, str(cache_dir))


def _gains(c):
    return c.baseline_accuracy, c.bias_gain, c.weight_gain


def _kill_first_worker(stop: threading.Event, killed: list) -> None:
    """SIGKILLs the first pool worker as soon as one exists (its jobs are then still pending)."""
    while not stop.is_set():
        children = multiprocessing.active_children()
        if children:
            os.kill(children[0].pid, signal.SIGKILL)
            killed.append(children[0].pid)
            return
        time.sleep(0.001)


def test_a_killed_worker_is_reported_and_the_result_equals_a_serial_run(demo_q, target_data, tmp_path):
    serial = _analysis(demo_q, target_data, 1, tmp_path / "serial")
    stop, killed = threading.Event(), []
    killer = threading.Thread(target=_kill_first_worker, args=(stop, killed))
    killer.start()
    try:
        with pytest.warns(RuntimeWarning, match="a worker process died during contribution analysis; retrying"):
            parallel = _analysis(demo_q, target_data, 2, tmp_path / "parallel")
    finally:
        stop.set()
        killer.join()
    assert killed, "no worker was killed"
    assert _gains(parallel) == _gains(serial)


def test_a_foreign_or_unreadable_cache_file_is_recomputed_with_a_warning(demo_q, target_data, tmp_path):
    x, y = target_data
    a = _analysis(demo_q, (x[:20], y[:20]), 1, tmp_path, seed=1)
    b = _analysis(demo_q, (x[:20], y[:20]), 1, tmp_path, seed=2)
    paths = sorted(tmp_path.glob("contrib-*.json"))
    assert len(paths) == 2  # one file per key (model, data, settings, ratios, seed)
    by_seed = {json.loads(p.read_text())["key"].rsplit("|", 1)[1]: p for p in paths}
    # Seed 2's file copied over seed 1's: valid JSON, valid checksum, another key.
    shutil.copyfile(by_seed["2"], by_seed["1"])
    with pytest.warns(RuntimeWarning, match="ignoring contribution cache .*key or checksum"):
        again = _analysis(demo_q, (x[:20], y[:20]), 1, tmp_path, seed=1)
    assert _gains(again) == _gains(a)
    assert json.loads(by_seed["1"].read_text())["key"].endswith("|1")
    # A truncated file (as a crash during a non-atomic write would leave) is not JSON.
    text = by_seed["2"].read_text()
    by_seed["2"].write_text(text[: len(text) // 2])
    with pytest.warns(RuntimeWarning, match="ignoring contribution cache"):
        again = _analysis(demo_q, (x[:20], y[:20]), 1, tmp_path, seed=2)
    assert _gains(again) == _gains(b)
    assert json.loads(by_seed["2"].read_text())["sha256"]

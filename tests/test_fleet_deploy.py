"""A real deployment on 127.0.0.1: `tinytrain fleet server` (a Flower SuperLink running the
ServerApp) and five `tinytrain fleet client` processes (SuperNodes), each its own process group.
Four honest devices and one whose updates are malformed; one honest device is killed mid-run."""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

pytest.importorskip("flwr", reason="the fleet needs pip install 'tinytrain-mcu[fleet]'")

import tinytrain as tt  # noqa: E402
from tinytrain import fleet  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
PKG_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(tt.__file__)))


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(args, log_path, env):
    with open(log_path, "wb") as log:
        return subprocess.Popen([sys.executable, "-m", "tinytrain.cli", "fleet", *args], stdout=log,
                                stderr=subprocess.STDOUT, env=env, start_new_session=True)


def _kill(proc, sig=signal.SIGKILL):
    try:
        os.killpg(proc.pid, sig)  # the CLI, its SuperLink / SuperNode and their app processes
    except ProcessLookupError:
        pass


def _wait_line(path, want_round, timeout, procs):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if os.path.exists(path):
            with open(path) as f:
                if any(json.loads(line)["round"] >= want_round for line in f if line.strip()):
                    return
        if procs[0].poll() is not None:
            raise AssertionError(f"the server exited early ({procs[0].returncode})")
        time.sleep(0.2)
    raise AssertionError(f"round {want_round} did not finish within {timeout} s")


def test_server_and_clients_over_loopback_tolerate_a_dead_and_a_malformed_client(tmp_path):
    plan, (x, y), (xt, yt) = fleet.demo_setup("last:2")
    plan.save(str(tmp_path / "plan.ttp"))
    plan.model.to_onnx(str(tmp_path / "model.onnx"))
    np.savez(tmp_path / "test.npz", X=xt, Y=yt)
    parts = fleet.partition(y, 4, "dirichlet:0.3", seed=0)
    for i, p in enumerate(parts):
        np.savez(tmp_path / f"client_{i}.npz", X=x[p], Y=y[p])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([PKG_ROOT, HERE]), TINYTRAIN_PROGRESS="0")
    port = _free_port()
    progress, result = tmp_path / "progress.jsonl", tmp_path / "result.json"
    procs = []
    try:
        procs.append(_start(["server", "--plan", str(tmp_path / "plan.ttp"), "--model", str(tmp_path / "model.onnx"),
                             "--test-data", str(tmp_path / "test.npz"), "--rounds", "3", "--min-clients", "3",
                             "--wait-clients", "5", "--round-timeout", "45", "--host", "127.0.0.1",
                             "--port", str(port), "--client-app", "_fleet_bad_client:APP", "--progress", str(progress),
                             "--result", str(result), "-o", str(tmp_path / "global.onnx"), "--json"],
                            tmp_path / "server.log", env))
        for i in range(4):
            procs.append(_start(["client", "--server", f"127.0.0.1:{port}", "--plan", str(tmp_path / "plan.ttp"),
                                 "--data", str(tmp_path / f"client_{i}.npz"), "--seed", str(i)],
                                tmp_path / f"client_{i}.log", env))
        procs.append(_start(["client", "--server", f"127.0.0.1:{port}", "--plan", str(tmp_path / "plan.ttp"),
                             "--data", str(tmp_path / "client_0.npz"), "--node-config", "corrupt=1"],
                            tmp_path / "bad_client.log", env))
        _wait_line(progress, 1, 240, procs)
        _kill(procs[4])  # an honest device dies: round 2 starts without its reply ever coming
        procs[0].wait(timeout=480)
    finally:
        for p in procs:
            _kill(p, signal.SIGTERM)
        time.sleep(1)
        for p in procs:
            _kill(p)
            p.wait(timeout=30)
    server_log = (tmp_path / "server.log").read_text(errors="replace")
    assert procs[0].returncode == 0, server_log[-4000:]
    rep = json.loads(server_log.strip().splitlines()[-1])
    acc = rep["accuracy"]
    assert len(acc) == 4 and acc[0] < 0.05  # digits 5-9 were never seen before the fleet
    assert acc[3] > acc[0] + 0.3 and max(acc[1:]) > 0.5  # the global model learned
    assert rep["accepted"] == {"1": 4, "2": 3, "3": 3}  # 4 honest updates, then 3 after the kill
    bad = {r["node"] for r in rep["rejected"]}
    assert len(bad) == 1 and [r["round"] for r in rep["rejected"]] == [1, 2, 3]
    assert all("shape" in r["reason"] for r in rep["rejected"])
    # the dead device may be reported by Flower as unavailable once its heartbeat expires
    assert all("unavailable" in r["reason"].lower() and r["round"] >= 2 for r in rep["failed"])
    run_log = open(rep["log"], errors="replace").read()
    assert f"rejected the update of node {bad.pop()}" in run_log  # logged by the ServerApp, with its reason
    g = tt.load_onnx(str(tmp_path / "global.onnx"))
    assert float((g.predict(xt) == yt).mean()) == pytest.approx(acc[3])

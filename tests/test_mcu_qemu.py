"""The demo plan exported for the microcontroller (`Plan.export_mcu`), trained by the tt-mcu
firmware on a Cortex-M4F under QEMU (scripts/mcu-qemu.sh), gives the Python Trainer's loss
trajectory bit for bit and the same accuracy before and after, and the fleet update blob the
device writes reads on the host (`tt.read_update`, the Flower gateway client) as the Python
Trainer's parameters. Needs Debian's Rust toolchain with rust-src, arm-none-eabi-ld and
qemu-system-arm (scripts/install-arm-toolchain.sh)."""
import os
import re
import shutil
import struct
import subprocess
import zlib
from types import SimpleNamespace

import numpy as np
import pytest

import tinytrain as tt
from tinytrain.mcu import export_mcu

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOLS = (os.path.exists("/usr/bin/cargo") and os.path.isdir("/usr/lib/rustlib/src/rust/library")
         and shutil.which("qemu-system-arm") and shutil.which("arm-none-eabi-ld"))

EPOCHS = 2
N = 32


@pytest.fixture(scope="module")
def device(tmp_path_factory):
    """The demo plan trained by the Python Trainer and by the firmware under QEMU on the same
    samples: the plan, the trainer, the firmware's console output and its update blob."""
    if not TOOLS:
        pytest.skip("Cortex-M toolchain or QEMU not installed")
    tmp = tmp_path_factory.mktemp("mcu")
    x, y = tt.datasets.digits("target", "train")
    xt, yt = tt.datasets.digits("target", "test")
    q = tt.load_onnx(tt.models.demo())
    if not isinstance(q, tt.QuantizedModel):
        q = tt.quantize(q, x[:64])
    plan = tt.compile(q, tt.schemes.last_layers(q, 2))
    # the rate chosen on the host (not the plan's stored one): the firmware sets it from lr.bin
    lr = tt.choose_lr(plan, x, y).lr
    assert lr != plan.lr
    bundle = tmp / "bundle"
    m = export_mcu(plan, str(bundle), x[:N], y[:N], xt[:N], yt[:N], lr=lr)
    assert m["train_samples"] == N and m["arena_bytes"] == plan.memory.peak_bytes and m["lr"] == lr
    assert sorted(os.listdir(bundle)) == sorted(["manifest.json", "params.bin", "plan.bin", "test_x.bin",
                                                 "test_y.bin", "train_x.bin", "train_y.bin", "lr.bin"])

    tr = tt.Trainer(plan, lr=lr)
    before = int((tr.predict(xt[:N]) == yt[:N]).sum())
    losses = [tr.step(x[i], y[i]) for _ in range(EPOCHS) for i in range(N)]
    after = int((tr.predict(xt[:N]) == yt[:N]).sum())

    update = tmp / "device.ttu"
    env = dict(os.environ, TT_MCU_BUNDLE=str(bundle), TT_MCU_EPOCHS=str(EPOCHS), TT_MCU_UPDATE_OUT=str(update))
    r = subprocess.run(["bash", "scripts/mcu-qemu.sh"], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr
    return SimpleNamespace(plan=plan, tr=tr, xt=xt[:N], before=before, after=after, losses=losses, out=r.stdout,
                           blob=update.read_bytes())


def test_firmware_reproduces_the_python_trainer(device):
    d = device
    out = d.out
    crc = zlib.crc32(b"".join(struct.pack("<f", v) for v in d.losses))
    assert d.after > d.before
    got = re.search(r"loss trajectory crc32 ([0-9a-f]{8}) over (\d+) steps", out)
    assert got and int(got.group(2)) == EPOCHS * N, out
    assert int(got.group(1), 16) == crc, "firmware and Python Trainer losses differ"
    assert re.search(rf"accuracy before: {d.before}/{N} ", out), out
    assert re.search(rf"accuracy after: {d.after}/{N} ", out), out
    sram = int(re.search(r"memory: SRAM (\d+) B", out).group(1))
    assert d.plan.memory.peak_bytes < sram <= 256 * 1024
    assert np.isfinite(d.losses).all()


def test_device_update_blob_reads_as_the_python_trainers_parameters(device):
    """The blob the firmware writes after training, read on the host, holds the Python Trainer's
    int8 weights and int32 biases bit for bit (the same bytes); the firmware applied the host's blob
    and reached the trained accuracy."""
    d = device
    assert "equal to the host run's: yes" in d.out, d.out
    assert re.search(rf"host update blob applied to a fresh trainer .*accuracy {d.after}/{N}", d.out), d.out
    dev = tt.read_update(d.blob, d.plan)
    host = tt.read_update(d.tr.export_update(), d.plan)
    assert dev.sample_count == host.sample_count == EPOCHS * N
    assert list(dev.params) == list(host.params) == ["conv_9.weight", "conv_9.bias", "fc_0.weight", "fc_0.bias"]
    for name, v in host.params.items():
        assert dev.params[name].dtype == v.dtype
        np.testing.assert_array_equal(dev.params[name], v, err_msg=name)
    assert d.blob == d.tr.export_update()
    fresh = tt.Trainer(d.plan)
    fresh.apply_update(d.blob)
    np.testing.assert_array_equal(fresh.predict(d.xt), d.tr.predict(d.xt))


def test_device_update_reaches_the_flower_client(device):
    """A gateway forwards the device's blob unchanged to the Flower client (`GatewayClient`): what
    the client hands to Flower equals the host trainer's parameters and sample count."""
    pytest.importorskip("flwr")
    from tinytrain.fleet import GatewayClient

    d = device
    sent = []

    def device_fit(global_blob, config):
        sent.append(tt.read_update(global_blob, d.plan))
        return d.blob

    gw = GatewayClient(d.plan, device_fit)
    start = gw.get_parameters()
    params, count, _ = gw.fit(start, {})
    assert count == EPOCHS * N and len(sent) == 1
    for name, v in start.items():
        np.testing.assert_array_equal(sent[0].params[name], v)
    host = tt.read_update(d.tr.export_update(), d.plan)
    assert list(params) == list(host.params)
    for name, v in host.params.items():
        np.testing.assert_array_equal(params[name], v, err_msg=name)

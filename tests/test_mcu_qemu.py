"""The demo plan exported for the microcontroller (`Plan.export_mcu`), trained by the tt-mcu
firmware on a Cortex-M4F under QEMU (scripts/mcu-qemu.sh), gives the Python Trainer's loss
trajectory bit for bit and the same accuracy before and after, and the fleet update blob the
device writes reads on the host (`tt.read_update`) as the Python Trainer's parameters. Needs Debian's Rust toolchain
with rust-src, arm-none-eabi-ld and qemu-system-arm (scripts/install-arm-toolchain.sh)."""
import os
import re
import shutil
import struct
import subprocess
import zlib

import numpy as np
import pytest

import tinytrain as tt

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOLS = (os.path.exists("/usr/bin/cargo") and os.path.isdir("/usr/lib/rustlib/src/rust/library")
         and shutil.which("qemu-system-arm") and shutil.which("arm-none-eabi-ld"))

EPOCHS = 2
N = 32


@pytest.mark.skipif(not TOOLS, reason="Cortex-M toolchain or QEMU not installed")
def test_firmware_reproduces_the_python_trainer(tmp_path):
    x, y = tt.datasets.digits("target", "train")
    xt, yt = tt.datasets.digits("target", "test")
    q = tt.load_onnx(tt.models.demo())
    if not isinstance(q, tt.QuantizedModel):
        q = tt.quantize(q, x[:64])
    plan = tt.compile(q, tt.schemes.last_layers(q, 2))
    bundle = tmp_path / "bundle"
    m = plan.export_mcu(str(bundle), x[:N], y[:N], xt[:N], yt[:N])
    assert m["train_samples"] == N and m["arena_bytes"] == plan.memory.peak_bytes
    assert sorted(os.listdir(bundle)) == sorted(["manifest.json", "params.bin", "plan.bin", "test_x.bin",
                                                 "test_y.bin", "train_x.bin", "train_y.bin"])

    tr = tt.Trainer(plan)
    before = int((tr.predict(xt[:N]) == yt[:N]).sum())
    losses = [tr.step(x[i], y[i]) for _ in range(EPOCHS) for i in range(N)]
    after = int((tr.predict(xt[:N]) == yt[:N]).sum())
    crc = zlib.crc32(b"".join(struct.pack("<f", v) for v in losses))
    assert after > before

    update = tmp_path / "device.ttu"
    env = dict(os.environ, TT_MCU_BUNDLE=str(bundle), TT_MCU_EPOCHS=str(EPOCHS), TT_MCU_UPDATE_OUT=str(update))
    r = subprocess.run(["bash", "scripts/mcu-qemu.sh"], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=900)
    out = r.stdout
    assert r.returncode == 0, out + r.stderr
    got = re.search(r"loss trajectory crc32 ([0-9a-f]{8}) over (\d+) steps", out)
    assert got and int(got.group(2)) == EPOCHS * N, out
    assert int(got.group(1), 16) == crc, "firmware and Python Trainer losses differ"
    assert re.search(rf"accuracy before: {before}/{N} ", out), out
    assert re.search(rf"accuracy after: {after}/{N} ", out), out
    sram = int(re.search(r"memory: SRAM (\d+) B", out).group(1))
    assert plan.memory.peak_bytes < sram <= 256 * 1024
    assert np.isfinite(losses).all()

    # The device's update blob, as a gateway would forward it, read on the host.
    assert "equal to the host run's: yes" in out, out
    assert re.search(rf"host update blob applied to a fresh trainer .*accuracy {after}/{N}", out), out
    blob = update.read_bytes()
    dev = tt.read_update(blob, plan)
    host = tt.read_update(tr.export_update(), plan)
    assert dev.sample_count == host.sample_count == EPOCHS * N
    assert list(dev.params) == list(host.params) == ["conv_9.weight", "conv_9.bias", "fc_0.weight", "fc_0.bias"]
    for name, v in host.params.items():
        assert dev.params[name].dtype == v.dtype
        np.testing.assert_array_equal(dev.params[name], v, err_msg=name)
    assert blob == tr.export_update()
    fresh = tt.Trainer(plan)
    fresh.apply_update(blob)
    np.testing.assert_array_equal(fresh.predict(xt[:N]), tr.predict(xt[:N]))

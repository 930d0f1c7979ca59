"""The C ABI (include/tinytrain.h, libtinytrain from crates/tt-mcu/ffi) called through cffi, as C
firmware calls it: the header is the cdef, so a declaration that does not match the library fails
here. Training through the C ABI gives the Python Trainer's losses bit for bit; checkpoints go
through Python flash callbacks with NOR semantics and survive a failure at every write."""
import os
import re
import subprocess
import sys

import numpy as np
import pytest

cffi = pytest.importorskip("cffi")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEADER = os.path.join(ROOT, "include", "tinytrain.h")


def _cdef_source() -> str:
    """The header as cffi reads it: declarations and integer #defines; no other preprocessor
    lines, and not the C++ guard's `extern "C" {` ... `}` (the only lines that are just that)."""
    text = re.sub(r"/\*.*?\*/", "", open(HEADER).read(), flags=re.S)
    keep = []
    for line in text.splitlines():
        s = line.strip()
        if s.startswith("#") and not re.fullmatch(r"#define\s+TT_\w+\s+-?\d+", s):
            continue
        if s in ('extern "C" {', "}"):
            continue
        keep.append(line)
    return "\n".join(keep) + "\n"


@pytest.fixture(scope="module")
def lib():
    target = os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target"))
    subprocess.run(["cargo", "build", "--release", "-q", "-p", "tt-mcu-ffi"], cwd=ROOT, check=True)
    name = {"darwin": "libtinytrain.dylib", "win32": "tinytrain.dll"}.get(sys.platform, "libtinytrain.so")
    ffi = cffi.FFI()
    ffi.cdef(_cdef_source())
    return ffi, ffi.dlopen(os.path.join(target, "release", name))


def test_every_declared_function_and_constant_resolves(lib):
    ffi, L = lib
    decls = re.findall(r"\b(tt_\w+)\s*\(", _cdef_source())
    assert len(set(decls)) == 16
    for name in set(decls):
        getattr(L, name)  # raises if the library does not export it
    assert L.TT_OK == 0 and L.TT_ERR_UPDATE_PLAN == -14 and L.TT_NO_CHECKPOINT == 1
    for code in range(-14, 2):
        assert ffi.string(L.tt_status_str(code)) != b"unknown status"
    assert ffi.sizeof("tt_trainer") == 8 * L.TT_TRAINER_WORDS


class Nor:
    """NOR flash behind the callbacks: erase to 0xFF in sectors, program only erased bytes; a
    write can be made to fail (power loss) after a number of successful writes, leaving the
    first half of its bytes programmed."""

    def __init__(self, ffi, size=4 * 4096, sector=4096):
        self.ffi, self.mem, self.sector = ffi, bytearray(b"\xff" * size), sector
        self.writes, self.fail_after = 0, None
        self._cbs = (ffi.callback("int32_t(void *, uint32_t, uint8_t *, uint32_t)", self._read),
                     ffi.callback("int32_t(void *, uint32_t, const uint8_t *, uint32_t)", self._write),
                     ffi.callback("int32_t(void *, uint32_t, uint32_t)", self._erase))
        self.c = ffi.new("tt_flash *", {"ctx": ffi.NULL, "capacity": size, "write_size": 4,
                                        "erase_size": sector, "read": self._cbs[0],
                                        "write": self._cbs[1], "erase": self._cbs[2]})

    def _read(self, ctx, off, buf, n):
        self.ffi.memmove(buf, bytes(self.mem[off:off + n]), n)
        return 0

    def _write(self, ctx, off, buf, n):
        data = self.ffi.buffer(buf, n)[:]
        if off % 4 or n % 4 or any(b != 0xFF for b in self.mem[off:off + n]):
            return 7
        if self.fail_after is not None and self.writes >= self.fail_after:
            half = n // 2
            self.mem[off:off + half] = data[:half]
            return 5
        self.writes += 1
        self.mem[off:off + n] = data
        return 0

    def _erase(self, ctx, a, b):
        if a % self.sector or b % self.sector:
            return 9
        self.mem[a:b] = b"\xff" * (b - a)
        return 0


def test_checkpoint_survives_a_failure_at_every_write(lib):
    ffi, L = lib
    old = bytes((i * 7) % 256 for i in range(700))
    new = bytes((i * 11 + 3) % 256 for i in range(700))
    seq = ffi.new("uint32_t *")
    base = Nor(ffi)
    assert L.tt_checkpoint_save(base.c, 0, 8192, 99, old, len(old), seq) == L.TT_OK
    total = Nor(ffi)
    total.mem[:] = base.mem
    assert L.tt_checkpoint_save(total.c, 0, 8192, 99, new, len(new), seq) == L.TT_OK
    assert total.writes > 3
    out = ffi.new("uint8_t[]", 700)
    for k in range(total.writes):
        f = Nor(ffi)
        f.mem[:] = base.mem
        f.fail_after = k
        assert L.tt_checkpoint_save(f.c, 0, 8192, 99, new, len(new), seq) == L.TT_ERR_FLASH
        f.fail_after = None
        assert L.tt_checkpoint_load(f.c, 0, 8192, 99, out, 700, seq) == L.TT_OK
        got = (bytes(ffi.buffer(out)), seq[0])
        if k < total.writes - 1:
            assert got == (old, 1), f"failure at write {k}, before the commit record"
        else:
            # The commit record itself: torn after its words landed, the new checkpoint is whole.
            assert got in ((old, 1), (new, 2)), "failure at the commit record"
    assert L.tt_checkpoint_load(total.c, 0, 8192, 99, out, 700, seq) == L.TT_OK
    assert bytes(ffi.buffer(out)) == new and seq[0] == 2
    assert L.tt_checkpoint_load(total.c, 0, 8192, 98, out, 700, seq) == L.TT_NO_CHECKPOINT
    assert L.tt_checkpoint_load(ffi.NULL, 0, 8192, 99, out, 700, seq) == L.TT_ERR_NULL
    assert L.tt_checkpoint_load(total.c, 0, 5000, 99, out, 700, seq) == L.TT_ERR_LAYOUT


def test_c_abi_trains_like_the_python_trainer(lib):
    ffi, L = lib
    tt = pytest.importorskip("tinytrain")
    x, y = tt.datasets.digits("target", "train")
    q = tt.load_onnx(tt.models.demo())
    if not isinstance(q, tt.QuantizedModel):
        q = tt.quantize(q, x[:64])
    plan = tt.compile(q, tt.schemes.last_layers(q, 2))
    tr = tt.Trainer(plan)
    xq = tr._inputs(x[:12])
    want = [tr.step(x[i], y[i]) for i in range(12)]
    # after 6 steps both switch to a rate chosen elsewhere: the device through tt_set_lr
    rate = 0.0123
    other = tt.Trainer(plan)
    want_set = [other.step(x[i], y[i]) for i in range(6)]
    other.lr = rate
    want_set += [other.step(x[i], y[i]) for i in range(6, 12)]

    need = ffi.new("size_t *")
    assert L.tt_arena_bytes(plan.plan_bytes, len(plan.plan_bytes), need) == L.TT_OK
    assert need[0] == plan.memory.peak_bytes
    params = ffi.new("uint32_t[]", (len(plan.params) + 3) // 4)
    ffi.memmove(params, plan.params, len(plan.params))
    arena = ffi.new("uint32_t[]", (need[0] + 3) // 4)
    t = ffi.new("tt_trainer *")
    pp, ap = ffi.cast("uint8_t *", params), ffi.cast("uint8_t *", arena)
    assert L.tt_init(t, plan.plan_bytes, len(plan.plan_bytes), pp, len(plan.params), ap, need[0] - 4) \
        == L.TT_ERR_OUT_OF_MEMORY
    assert L.tt_init(t, plan.plan_bytes, len(plan.plan_bytes), pp + 1, len(plan.params), ap, need[0]) \
        == L.TT_ERR_ALIGN
    assert L.tt_init(t, plan.plan_bytes, len(plan.plan_bytes), pp, len(plan.params), ap, need[0]) == L.TT_OK
    n = ffi.new("size_t *")
    assert L.tt_input_len(t, n) == L.TT_OK and n[0] == xq.shape[1]
    loss = ffi.new("float *")
    got = []
    for i in range(12):
        assert L.tt_step(t, ffi.from_buffer("int8_t[]", xq[i]), n[0], int(y[i]), loss) == L.TT_OK
        got.append(loss[0])
    assert np.array_equal(np.float32(got), np.float32(want)), "C ABI and Python Trainer differ"
    t2 = ffi.new("tt_trainer *")
    arena2 = ffi.new("uint32_t[]", (need[0] + 3) // 4)
    assert L.tt_init(t2, plan.plan_bytes, len(plan.plan_bytes), pp, len(plan.params),
                     ffi.cast("uint8_t *", arena2), need[0]) == L.TT_OK
    rate_now = ffi.new("float *")
    assert L.tt_lr(t2, rate_now) == L.TT_OK and rate_now[0] == np.float32(plan.lr)
    got = []
    for i in range(12):
        if i == 6:
            assert L.tt_set_lr(t2, float("nan")) == L.TT_ERR_NON_FINITE
            assert L.tt_set_lr(t2, rate) == L.TT_OK
            assert L.tt_lr(t2, rate_now) == L.TT_OK and rate_now[0] == np.float32(rate)
        assert L.tt_step(t2, ffi.from_buffer("int8_t[]", xq[i]), n[0], int(y[i]), loss) == L.TT_OK
        got.append(loss[0])
    assert np.array_equal(np.float32(got), np.float32(want_set)), "tt_set_lr and Trainer.lr differ"
    assert got[6:] != want[6:], "the rate set at run time changed nothing"
    c = ffi.new("uint32_t *")
    assert L.tt_skipped_steps(t, c) == L.TT_OK and c[0] == tr.skipped_steps == 0
    for i in range(4):
        assert L.tt_predict(t, ffi.from_buffer("int8_t[]", xq[i]), n[0], c) == L.TT_OK
        assert c[0] == tr.predict(x[i:i + 1])[0]
    assert L.tt_predict(t, ffi.from_buffer("int8_t[]", xq[0]), n[0] - 1, c) == L.TT_ERR_SIZE
    assert L.tt_step(ffi.NULL, ffi.from_buffer("int8_t[]", xq[0]), n[0], 0, loss) == L.TT_ERR_NULL

    flash = Nor(ffi, size=4 * 16384, sector=16384)
    seq = ffi.new("uint32_t *")
    assert L.tt_save(t, flash.c, 0, 32768, seq) == L.TT_OK and seq[0] == 1
    t2 = ffi.new("tt_trainer *")
    arena2 = ffi.new("uint32_t[]", (need[0] + 3) // 4)
    assert L.tt_init(t2, plan.plan_bytes, len(plan.plan_bytes), pp, len(plan.params),
                     ffi.cast("uint8_t *", arena2), need[0]) == L.TT_OK
    assert L.tt_restore(t2, flash.c, 0, 32768, seq) == L.TT_OK and seq[0] == 1
    for i in range(4):
        assert L.tt_predict(t2, ffi.from_buffer("int8_t[]", xq[i]), n[0], c) == L.TT_OK
        assert c[0] == tr.predict(x[i:i + 1])[0]


def test_update_blob_through_the_c_abi(lib):
    """A device's update blob (tt_write_update) is byte for byte the Python Trainer's after the
    same steps; tt_apply_update loads a blob into a fresh trainer; damaged blobs, blobs of another
    plan, short buffers and NULLs are error codes that change nothing."""
    ffi, L = lib
    tt = pytest.importorskip("tinytrain")
    x, y = tt.datasets.digits("target", "train")
    q = tt.load_onnx(tt.models.demo())
    if not isinstance(q, tt.QuantizedModel):
        q = tt.quantize(q, x[:64])
    plan = tt.compile(q, tt.schemes.last_layers(q, 2))
    tr = tt.Trainer(plan)
    xq = tr._inputs(x[:10])
    tr.step(x[:10], y[:10])

    need = ffi.new("size_t *")
    assert L.tt_arena_bytes(plan.plan_bytes, len(plan.plan_bytes), need) == L.TT_OK
    params = ffi.new("uint32_t[]", (len(plan.params) + 3) // 4)
    ffi.memmove(params, plan.params, len(plan.params))
    pp = ffi.cast("uint8_t *", params)

    def trainer():
        t, arena = ffi.new("tt_trainer *"), ffi.new("uint32_t[]", (need[0] + 3) // 4)
        assert L.tt_init(t, plan.plan_bytes, len(plan.plan_bytes), pp, len(plan.params),
                         ffi.cast("uint8_t *", arena), need[0]) == L.TT_OK
        return t, arena

    t, keep = trainer()
    loss = ffi.new("float *")
    for i in range(10):
        assert L.tt_step(t, ffi.from_buffer("int8_t[]", xq[i]), xq.shape[1], int(y[i]), loss) == L.TT_OK
    size = ffi.new("size_t *")
    assert L.tt_update_len(t, size) == L.TT_OK
    want = tr.export_update()
    assert size[0] == len(want)
    buf, written = ffi.new("uint8_t[]", size[0]), ffi.new("size_t *")
    assert L.tt_write_update(t, 10, buf, size[0] - 1, written) == L.TT_ERR_SIZE
    assert L.tt_write_update(t, 10, ffi.NULL, size[0], written) == L.TT_ERR_NULL
    assert L.tt_write_update(t, 10, buf, size[0], written) == L.TT_OK and written[0] == size[0]
    blob = bytes(ffi.buffer(buf, written[0]))
    assert blob == want, "device and host update blobs differ"
    assert tt.read_update(blob, plan).sample_count == 10

    t2, keep2 = trainer()
    count = ffi.new("uint32_t *")
    bad = bytearray(blob)
    bad[len(bad) // 2] ^= 0x10
    assert L.tt_apply_update(t2, bytes(bad), len(bad), count) == L.TT_ERR_CORRUPT_UPDATE
    assert L.tt_apply_update(t2, blob, len(blob) - 1, count) == L.TT_ERR_CORRUPT_UPDATE
    other = tt.Trainer(tt.compile(q, tt.schemes.last_layers(q, 1))).export_update()
    assert L.tt_apply_update(t2, other, len(other), count) == L.TT_ERR_UPDATE_PLAN
    assert L.tt_apply_update(t2, blob, len(blob), ffi.NULL) == L.TT_ERR_NULL
    c = ffi.new("uint32_t *")
    fresh = tt.Trainer(plan)
    for i in range(10):
        assert L.tt_predict(t2, ffi.from_buffer("int8_t[]", xq[i]), xq.shape[1], c) == L.TT_OK
        assert c[0] == fresh.predict(x[i:i + 1])[0]
    assert L.tt_apply_update(t2, blob, len(blob), count) == L.TT_OK and count[0] == 10
    assert L.tt_write_update(t2, 10, buf, size[0], written) == L.TT_OK
    assert bytes(ffi.buffer(buf, written[0])) == blob
    for i in range(10):
        assert L.tt_predict(t2, ffi.from_buffer("int8_t[]", xq[i]), xq.shape[1], c) == L.TT_OK
        assert c[0] == tr.predict(x[i:i + 1])[0]
    assert ffi.string(L.tt_status_str(L.TT_ERR_UPDATE_PLAN)) == b"update blob written for another plan"

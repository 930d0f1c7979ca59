"""Byte fuzzing of every Python reader of untrusted files: ONNX, .tflite, .ttp plans, .npz/.npy data
(``tinytrain.fileio.load_data``) and scheme JSON (``tt.Scheme.load``).

Each reader gets mutated real files (the project's fixtures, a compiled plan, real data and scheme
files). The contract: it returns a result or raises one of its typed errors — never another
exception (IndexError, KeyError, struct.error, ...), never a hang.

CI runs a short hypothesis campaign of each. The long run is libFuzzer through atheris:
``python3 tests/test_fuzz_importers.py TARGET -runs=100000`` (``bash scripts/fuzz-python.sh``).
"""
from __future__ import annotations

import io
import json
import os
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pytest

import tinytrain as tt
from tinytrain.fileio import load_data

HERE = Path(__file__).resolve().parent
FIXTURES = HERE / "fixtures" / "tflite"
TYPED = (tt.TinytrainError,)


def _npz(**arrays) -> bytes:
    b = io.BytesIO()
    np.savez(b, **arrays)
    return b.getvalue()


def _npy(a) -> bytes:
    b = io.BytesIO()
    np.save(b, a)
    return b.getvalue()


def _seeds(target: str):
    if target == "onnx":
        return sorted(FIXTURES.glob("*.onnx"), key=lambda p: p.stat().st_size)[:4]
    if target == "tflite":
        return sorted(FIXTURES.glob("*.tflite"), key=lambda p: p.stat().st_size)[:4]
    if target == "npz":
        rng = np.random.default_rng(0)
        return [_npz(x=rng.integers(-128, 127, (4, 1, 6, 6), dtype=np.int8), y=np.arange(4, dtype=np.int64)),
                _npz(X=rng.random((3, 2, 4, 4), dtype=np.float32), Y=np.arange(3, dtype=np.uint8)),
                _npy(rng.random((2, 1, 3, 3)).astype(np.float32))]
    if target == "scheme":
        return [json.dumps(tt.Scheme(["conv_1"], {"conv_1": 0.5, 2: 1.0}, {"conv_1": "input"}, name="s").to_dict())
                .encode()]
    if target == "plan":
        return [_plan_bytes()]
    raise ValueError(target)


_PLAN = None


def _plan_bytes() -> bytes:
    global _PLAN
    if _PLAN is None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            q = tt.fileio.load_model(str(sorted(FIXTURES.glob("*.onnx"), key=lambda p: p.stat().st_size)[0]))
        plan = tt.compile(q, tt.schemes.bias_only(q))
        with tempfile.TemporaryDirectory() as d:
            plan.save(os.path.join(d, "p.ttp"))
            _PLAN = Path(d, "p.ttp").read_bytes()
    return _PLAN


def _with_file(data: bytes, suffix: str, read):
    fd, path = tempfile.mkstemp(prefix="tt-fuzz-", suffix=suffix)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return read(path)
    finally:
        os.unlink(path)


LAYERS = ["conv_0", "conv_1", "conv_2", "fc"]


def check(target: str, data: bytes) -> None:
    """Runs one reader on ``data``; raises only when the reader broke its contract."""
    try:
        if target == "onnx":
            tt.load_onnx(data)
        elif target == "tflite":
            tt.load_tflite(data)
        elif target == "plan":
            tt.Plan.from_bytes(data)
        elif target == "npz":
            _with_file(data, ".npz", lambda p: load_data(p, need_labels=False))
        elif target == "npy":
            _with_file(data, ".npy", lambda p: load_data(p, need_labels=False))
        elif target == "scheme":
            s = _with_file(data, ".json", tt.Scheme.load)
            s.resolved(LAYERS)
        else:
            raise ValueError(target)
    except TYPED:
        pass
    except (ValueError, TypeError) as e:
        # Scheme JSON is user-written settings: its contract is ValueError/TypeError naming the field.
        if target != "scheme":
            raise AssertionError(f"{target}: untyped {type(e).__name__}: {e}") from e


def _mutate(seed: bytes, edits, cut: int) -> bytes:
    b = bytearray(seed)
    for pos, val in edits:
        if b:
            b[pos % len(b)] = val
    return bytes(b[: max(0, len(b) - cut)])


def _seed_bytes(target: str):
    return [s if isinstance(s, bytes) else s.read_bytes() for s in _seeds("npz" if target == "npy" else target)]


TARGETS = ["onnx", "tflite", "plan", "npz", "npy", "scheme"]


@pytest.mark.parametrize("target", TARGETS)
def test_seeds_are_accepted(target):
    """The unmutated seeds read without error: the campaign starts from valid files."""
    for s in _seed_bytes(target):
        if target == "npy":
            continue
        check(target, s)


@pytest.mark.parametrize("target", TARGETS)
def test_mutated_files_give_typed_errors(target):
    hypothesis = pytest.importorskip("hypothesis")
    st = hypothesis.strategies
    seeds = _seed_bytes(target)
    if target == "npy":
        seeds = [_npy(np.arange(12, dtype=np.float32).reshape(3, 4))]

    @hypothesis.settings(max_examples=60, deadline=None, derandomize=True,
                         suppress_health_check=list(hypothesis.HealthCheck))
    @hypothesis.given(st.integers(0, len(seeds) - 1),
                      st.lists(st.tuples(st.integers(0, 1 << 20), st.integers(0, 255)), max_size=8),
                      st.integers(0, 64))
    def run(i, edits, cut):
        check(target, _mutate(seeds[i], edits, cut))

    run()


def main(argv) -> None:
    import atheris

    target = argv[1]
    corpus = tempfile.mkdtemp(prefix=f"tt-fuzz-{target}-")
    for i, s in enumerate(_seed_bytes(target)):
        Path(corpus, f"seed{i}").write_bytes(s)

    def one(data: bytes) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            check(target, data)

    # Coverage feedback from the Python readers themselves (already imported): without it libFuzzer
    # shrinks the corpus to one empty input and fuzzes blind.
    atheris.instrument_all()
    atheris.Setup([argv[0], corpus] + argv[2:], one)
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)


def test_found_by_fuzzing_npz_holding_one_array(tmp_path):
    """An .npz that is really an .npy used to escape as a raw TypeError from numpy."""
    p = tmp_path / "data.npz"
    p.write_bytes(_npy(np.zeros((2, 3), np.float32)))
    with pytest.raises(tt.ModelFormatError, match=r"data\.npz: holds a single array"):
        load_data(str(p))


def test_found_by_fuzzing_npy_with_broken_header(tmp_path):
    """A damaged .npy header used to escape as tokenize.TokenError."""
    b = bytearray(_npy(np.arange(12, dtype=np.float32).reshape(3, 4)))
    b[b.index(b"(") + 1] = 0
    p = tmp_path / "x.npy"
    p.write_bytes(bytes(b.replace(b")", b" ")))
    with pytest.raises(tt.ModelFormatError, match=r"x\.npy: not a readable \.npz/\.npy file"):
        load_data(str(p), need_labels=False)


def test_found_by_fuzzing_npy_holding_an_archive(tmp_path):
    """An .npy that is really an .npz used to escape as AttributeError."""
    p = tmp_path / "x.npy"
    p.write_bytes(_npz(x=np.zeros((2, 3), np.float32)))
    with pytest.raises(tt.ModelFormatError, match=r"x\.npy: holds an \.npz archive"):
        load_data(str(p), need_labels=False)


def test_found_by_fuzzing_npz_member_that_is_not_an_array(tmp_path):
    """An .npz member that is not an .npy came back as bytes and escaped as AttributeError."""
    import zipfile

    p = tmp_path / "d.npz"
    with zipfile.ZipFile(p, "w") as z:
        z.writestr("x", b"not an array")
    with pytest.raises(tt.ModelFormatError, match=r"d\.npz: inputs are not a numeric array of samples \(got bytes\)"):
        load_data(str(p), need_labels=False)

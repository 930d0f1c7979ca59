"""tt-core's int8 kernels against the ONNX package's own backend node test data for QLinearConv,
QLinearMatMul, ConvInteger and MatMulInteger, compared exactly.

The data is read from the `onnx` wheel: the serialized `.pb` tensors under
`onnx/backend/test/data/node/<case>/test_data_set_*` when the wheel ships them, otherwise the
very same arrays from the test-case generators the `.pb` files are produced from
(`onnx.backend.test.case.node`, some wheels omit the data folder).

Mapping onto the kernels' conventions (exact, nothing is approximated):
- uint8 tensors become int8 by subtracting 128 from values and zero points alike
  (`q - zp` is unchanged); uint8 outputs come back by adding 128, the clamp [0, 255] being the
  int8 clamp [-128, 127];
- ONNX weights with a non-zero zero point go through the accumulate kernels, which take a
  weight zero point (per tensor or per output channel); the training kernels keep symmetric
  weights;
- NCHW / OIHW are transposed to NHWC / OHWI, MatMul's B [K, N] to the FC weight [N, K];
- requantization uses tt-core's fixed-point multiplier of `s_x * s_w / s_y` (round half away
  from zero); ONNX's reference rounds a float product half to even. The test counts elements
  that differ and requires zero.
"""
import glob
import os

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from tinytrain import _core
from _int8_oracle import requires_kernels

pytestmark = requires_kernels

OPS = ("QLinearConv", "QLinearMatMul", "ConvInteger", "MatMulInteger")
NODE_DATA = os.path.join(os.path.dirname(onnx.__file__), "backend", "test", "data", "node")


def _from_pb_files():
    cases = []
    for op_prefix in ("test_qlinearconv", "test_qlinearmatmul", "test_convinteger",
                      "test_matmulinteger"):
        for case_dir in sorted(glob.glob(os.path.join(NODE_DATA, op_prefix + "*"))):
            model = onnx.load(os.path.join(case_dir, "model.onnx"))
            for ds in sorted(glob.glob(os.path.join(case_dir, "test_data_set_*"))):
                def load(kind):
                    files = sorted(glob.glob(os.path.join(ds, f"{kind}_*.pb")),
                                   key=lambda p: int(p.rsplit("_", 1)[1][:-3]))
                    out = []
                    for f in files:
                        t = onnx.TensorProto()
                        with open(f, "rb") as fh:
                            t.ParseFromString(fh.read())
                        out.append(numpy_helper.to_array(t))
                    return out
                cases.append((os.path.basename(case_dir), model, load("input"), load("output")))
    return cases


def _from_generators():
    from onnx.backend.test.case.node import collect_testcases

    cases, seen = [], set()
    for tc in collect_testcases():
        if tc.model.graph.node[0].op_type not in OPS or tc.name in seen:
            continue
        seen.add(tc.name)
        for inputs, outputs in tc.data_sets:
            cases.append((tc.name, tc.model, [np.asarray(i) for i in inputs],
                          [np.asarray(o) for o in outputs]))
    return cases


def _cases():
    return _from_pb_files() if os.path.isdir(NODE_DATA) else _from_generators()


CASES = _cases()


def to_i8(q, zp=None):
    """(values, zero point) as int8 / int32, shifting uint8 by 128 (an absent zero point is 0)."""
    q = np.asarray(q)
    shift = 128 if q.dtype == np.uint8 else 0
    v = (q.astype(np.int32) - shift).astype(np.int8)
    z = np.zeros(1, np.int32) if zp is None else np.asarray(zp).astype(np.int32).reshape(-1)
    return v, z - shift, shift


def node_attrs(model):
    node = model.graph.node[0]
    return node, {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def conv_params(attrs, kh, kw):
    assert attrs.get("auto_pad", b"NOTSET") in (b"NOTSET", "NOTSET")
    assert all(d == 1 for d in attrs.get("dilations", [1, 1]))
    p = attrs.get("pads", [0, 0, 0, 0])
    s = attrs.get("strides", [1, 1])
    # ONNX pads are (top, left, bottom, right) for 2-D.
    return tuple(s), (p[0], p[1], p[2], p[3]), attrs.get("group", 1)


def run_conv_accumulate(x, x_zp, w, w_zp, attrs, bias=None):
    xi, xz, _ = to_i8(x, x_zp)
    wi, wz, _ = to_i8(w, w_zp)
    stride, pads, groups = conv_params(attrs, w.shape[2], w.shape[3])
    acc = _core.conv2d_accumulate(
        np.ascontiguousarray(xi.transpose(0, 2, 3, 1)),
        np.ascontiguousarray(wi.transpose(0, 2, 3, 1)),
        int(xz[0]),
        wz.astype(np.int32),
        None if bias is None else bias.astype(np.int32),
        stride, pads, groups)
    return acc.transpose(0, 3, 1, 2)


def run_matmul_accumulate(a, a_zp, b, b_zp):
    ai, az, _ = to_i8(a, a_zp)
    bi, bz, _ = to_i8(b, b_zp)
    lead = ai.shape[:-2]
    a2 = ai.reshape((-1,) + ai.shape[-2:])
    b2 = np.broadcast_to(bi, lead + bi.shape[-2:]).reshape((-1,) + bi.shape[-2:])
    out = [
        _core.fc_accumulate(np.ascontiguousarray(a2[k]), np.ascontiguousarray(b2[k].T),
                            int(az[0]), bz.astype(np.int32))
        for k in range(a2.shape[0])
    ]
    return np.stack(out).reshape(lead + (ai.shape[-2], bi.shape[-1]))


def requant_to(acc, channels_axis, scale, y_zp, y_dtype):
    """int32 accumulators -> quantized y with tt-core's requantization (per-channel scales)."""
    scale = np.asarray(scale, dtype=np.float64).reshape(-1)
    zp = int(np.asarray(y_zp).astype(np.int32).reshape(-1)[0])
    shift = 128 if y_dtype == np.uint8 else 0
    moved = np.moveaxis(acc, channels_axis, -1)
    c = moved.shape[-1]
    rs = scale if scale.size == c else np.full(1, scale[0])
    y = _core.requantize(np.ascontiguousarray(moved.astype(np.int32)), rs, zp - shift)
    return (np.moveaxis(y, -1, channels_axis).astype(np.int32) + shift).astype(y_dtype)


def run_case(name, model, inputs):
    node, attrs = node_attrs(model)
    op = node.op_type
    if op == "ConvInteger":
        x, w = inputs[0], inputs[1]
        x_zp = inputs[2] if len(inputs) > 2 else None
        w_zp = inputs[3] if len(inputs) > 3 else None
        return run_conv_accumulate(x, x_zp, w, w_zp, attrs)
    if op == "MatMulInteger":
        a, b = inputs[0], inputs[1]
        a_zp = inputs[2] if len(inputs) > 2 else None
        b_zp = inputs[3] if len(inputs) > 3 else None
        return run_matmul_accumulate(a, a_zp, b, b_zp)
    if op == "QLinearConv":
        x, xs, xz, w, ws, wz, ys, yz = inputs[:8]
        bias = inputs[8] if len(inputs) > 8 else None
        acc = run_conv_accumulate(x, xz, w, wz, attrs, bias)
        real = (np.float64(np.float32(xs)) * np.asarray(ws, np.float32).astype(np.float64)
                / np.float64(np.float32(ys)))
        return requant_to(acc, 1, real, yz, inputs[7].dtype)
    if op == "QLinearMatMul":
        a, a_s, a_z, b, b_s, b_z, y_s, y_z = inputs
        acc = run_matmul_accumulate(a, a_z, b, b_z)
        # Scales may be float16 in the data; the real multiplier is computed from their values.
        real = (np.asarray(a_s).astype(np.float64).reshape(-1)[0]
                * np.asarray(b_s).astype(np.float64).reshape(-1)
                / np.asarray(y_s).astype(np.float64).reshape(-1)[0])
        return requant_to(acc, -1, real, y_z, y_z.dtype)
    raise AssertionError(op)


def test_every_case_is_found():
    names = {c[0] for c in CASES}
    for prefix in ("test_qlinearconv", "test_qlinearmatmul", "test_convinteger",
                   "test_matmulinteger"):
        assert any(n.startswith(prefix) for n in names), prefix
    assert len(CASES) >= 12


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_onnx_backend_node_case_exact(case):
    name, model, inputs, outputs = case
    got = run_case(name, model, inputs)
    want = outputs[0]
    assert got.shape == want.shape and got.dtype == want.dtype
    diff = np.argwhere(got.astype(np.int64) != want.astype(np.int64))
    assert diff.size == 0, (
        f"{name}: {len(diff)} of {want.size} elements differ, first at {diff[:5].tolist()}: "
        f"got {got[tuple(diff[0])]}, want {want[tuple(diff[0])]}")

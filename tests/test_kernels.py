"""The kernel bindings (tinytrain._core) against numpy references: forward int8 ops bit-exact vs
an integer reference, backward ops through adjoint identities of the float reference
(<r, f(x)> = <f^T r, x> for the linear maps; relative tolerance 1e-5), PyTorch autograd when
PyTorch is installed, the QAS/SGD bindings, and errors as ValueError with tt-core's message.
The exhaustive randomized checks of the math live in crates/tt-core/tests; these check the
bindings' layouts, batching and argument plumbing on the same definitions."""
import numpy as np
import pytest

from tinytrain import _core
from _int8_oracle import requires_kernels

pytestmark = requires_kernels

RNG = np.random.default_rng(1234)


def rand_i8(shape, lo=-128, hi=127):
    return RNG.integers(lo, hi + 1, size=shape).astype(np.int8)


def conv_ref(x, w, stride, pads, groups, zp=0.0, bias=None):
    """Straightforward NHWC / OHWI convolution in the dtype of `x` (int64 or float64)."""
    n, h, wd, c = x.shape
    o, kh, kw, ipg = w.shape
    t, l, b, r = pads
    sh, sw = stride
    xp = np.pad(x - zp, ((0, 0), (t, b), (l, r), (0, 0)))
    oh, ow = (h + t + b - kh) // sh + 1, (wd + l + r - kw) // sw + 1
    acc = np.zeros((n, oh, ow, o), dtype=x.dtype)
    if bias is not None:
        acc += bias
    opg = o // groups
    for ky in range(kh):
        for kx in range(kw):
            patch = xp[:, ky:ky + sh * (oh - 1) + 1:sh, kx:kx + sw * (ow - 1) + 1:sw, :]
            for g in range(groups):
                acc[..., g * opg:(g + 1) * opg] += np.einsum(
                    "nhwi,oi->nhwo", patch[..., g * ipg:(g + 1) * ipg],
                    w[g * opg:(g + 1) * opg, ky, kx, :].astype(x.dtype))
    return acc


def requant_ref(acc, scales):
    """Exact round-half-away of acc * M * 2^(shift - 31), per channel (last axis)."""
    enc = [_core.requant_from_scale(float(s)) for s in np.broadcast_to(scales, acc.shape[-1:])]
    m = np.array([e[0] for e in enc], dtype=np.int64)
    nsh = 31 - np.array([e[1] for e in enc], dtype=np.int64)
    for (mm, sh), s in zip(enc, np.broadcast_to(scales, acc.shape[-1:])):
        assert abs(mm * 2.0 ** (sh - 31) - s) <= 1e-9 * s
    p = acc.astype(np.int64) * m
    r = (np.abs(p) + (np.int64(1) << (nsh - 1))) >> nsh
    return np.sign(p) * r


CONV_CASES = [
    # (H, W, C, O, kh, kw, stride, pads, groups)
    (7, 6, 8, 12, 1, 1, (1, 1), (0, 0, 0, 0), 1),    # pointwise
    (9, 9, 24, 24, 3, 3, (1, 1), (1, 1, 1, 1), 24),  # depthwise, fast path (24 = 16 + 8)
    (9, 8, 5, 5, 3, 3, (2, 2), (1, 0, 1, 1), 5),     # depthwise, stride 2, asymmetric pads
    (6, 7, 6, 9, 3, 2, (2, 1), (0, 1, 2, 0), 3),     # grouped
    (8, 8, 3, 4, 3, 3, (2, 2), (1, 1, 0, 0), 1),     # stem-like
    (5, 5, 4, 4, 9, 9, (1, 1), (4, 4, 4, 4), 4),     # depthwise 9x9 (general path)
    (4, 4, 3, 2, 1, 1, (1, 1), (1, 1, 1, 1), 1),     # 1x1 with padding (border = bias)
]


@pytest.mark.parametrize("case", CONV_CASES)
def test_conv2d_forward_bit_exact(case):
    h, w_, c, o, kh, kw, stride, pads, groups = case
    x = rand_i8((3, h, w_, c))
    w = rand_i8((o, kh, kw, c // groups), -127, 127)
    bias = RNG.integers(-2000, 2000, size=o).astype(np.int32)
    scales = RNG.uniform(1e-4, 0.03, size=o)
    in_zp, out_zp, lo, hi = -7, 11, 11, 120
    y = _core.conv2d_forward(x, w, bias, stride, pads, groups, in_zp, out_zp, scales, lo, hi)
    acc = conv_ref(x.astype(np.int64), w, stride, pads, groups, in_zp, bias.astype(np.int64))
    want = np.clip(requant_ref(acc, scales) + out_zp, lo, hi).astype(np.int8)
    assert y.dtype == np.int8 and y.shape == want.shape
    np.testing.assert_array_equal(y, want)
    # Within one LSB of the real-valued requantization.
    real = np.clip(acc * scales + out_zp, lo, hi)
    assert np.abs(y - real).max() <= 0.5 + 1e-6
    # The batch loop equals sample-by-sample calls.
    y1 = _core.conv2d_forward(x[1:2], w, bias, stride, pads, groups, in_zp, out_zp, scales, lo, hi)
    np.testing.assert_array_equal(y1, y[1:2])
    # The int32 accumulation path agrees (symmetric weights: w_zp = 0).
    acc_core = _core.conv2d_accumulate(x, w, in_zp, None, bias, stride, pads, groups)
    np.testing.assert_array_equal(acc_core, acc)


def test_fc_add_and_pools_bit_exact():
    x = rand_i8((4, 37))
    w = rand_i8((10, 37), -127, 127)
    bias = RNG.integers(-5000, 5000, size=10).astype(np.int32)
    scales = RNG.uniform(1e-4, 0.01, size=10)
    y = _core.fc_forward(x, w, bias, 3, -4, scales)
    acc = (x.astype(np.int64) - 3) @ w.T.astype(np.int64) + bias
    np.testing.assert_array_equal(y, np.clip(requant_ref(acc, scales) - 4, -128, 127))
    wzp = RNG.integers(-5, 5, size=10).astype(np.int32)
    acc2 = _core.fc_accumulate(x, w, 3, wzp)
    np.testing.assert_array_equal(acc2, (x.astype(np.int64) - 3) @ (w.astype(np.int64) - wzp[:, None]).T)

    a, b = rand_i8((2, 5, 5, 8)), rand_i8((2, 5, 5, 8))
    s = _core.add_forward(a, 0.05, 3, b, 0.11, -9, 0.13, -2, -2, 127)
    real = 0.05 * (a.astype(np.float64) - 3) + 0.11 * (b.astype(np.float64) + 9)
    assert s.shape == a.shape
    assert np.abs(s - np.clip(real / 0.13 - 2, -2, 127)).max() <= 1.0

    xg = rand_i8((2, 6, 5, 7))
    g = _core.global_avgpool_forward(xg, 0.07, -5, 0.02, 4)
    sums = (xg.astype(np.int64) + 5).sum(axis=(1, 2))
    np.testing.assert_array_equal(g, np.clip(requant_ref(sums, np.full(7, 0.07 / (0.02 * 30))) + 4, -128, 127))

    xp = rand_i8((2, 7, 6, 3))
    for kernel, stride, pads in [((3, 3), (2, 2), (1, 1, 1, 1)), ((2, 2), None, (0, 0, 0, 0)),
                                 ((3, 2), (1, 2), (0, 1, 2, 1))]:
        avg = _core.avgpool_forward(xp, kernel, stride, pads)
        mx = _core.maxpool_forward(xp, kernel, stride, pads)
        st = stride or kernel
        t, l, b_, r = pads
        oh, ow = (7 + t + b_ - kernel[0]) // st[0] + 1, (6 + l + r - kernel[1]) // st[1] + 1
        assert avg.shape == mx.shape == (2, oh, ow, 3)
        for oy in range(oh):
            for ox in range(ow):
                y0, x0 = oy * st[0] - t, ox * st[1] - l
                win = xp[:, max(y0, 0):y0 + kernel[0], max(x0, 0):x0 + kernel[1], :].astype(np.int64)
                cnt = win.shape[1] * win.shape[2]  # pads excluded from the count
                ssum = win.sum(axis=(1, 2))
                want = np.sign(ssum) * ((2 * np.abs(ssum) + cnt) // (2 * cnt))
                np.testing.assert_array_equal(avg[:, oy, ox], want)
                np.testing.assert_array_equal(mx[:, oy, ox], win.max(axis=(1, 2)))


@pytest.mark.parametrize("case", CONV_CASES)
def test_conv2d_backward_adjoint_identities(case):
    h, w_, c, o, kh, kw, stride, pads, groups = case
    w = rand_i8((o, kh, kw, c // groups), -127, 127)
    ws = RNG.uniform(0.002, 0.05, size=o).astype(np.float32)
    w_real = w.astype(np.float64) * ws[:, None, None, None]
    x_real = RNG.normal(size=(2, h, w_, c))
    y = conv_ref(x_real, w_real, stride, pads, groups)
    r = RNG.normal(size=y.shape).astype(np.float32)
    gi = _core.conv2d_backward_input(r, w, ws, (h, w_), stride, pads, groups)
    assert gi.shape == x_real.shape and gi.dtype == np.float32
    lhs, rhs = np.sum(r * y), np.sum(gi * x_real)
    assert abs(lhs - rhs) <= 1e-5 * (abs(lhs) + np.abs(r).sum() * 1e-3)

    q_scale, q_zp = 0.04, 5
    x = rand_i8((2, h, w_, c))
    xr = q_scale * (x.astype(np.float64) - q_zp)
    wr = RNG.normal(size=w.shape)
    axes = [("output", o // 2 + 1)] + ([("input", c // 2 + 1)] if groups == 1 else [])
    for axis, count in axes:
        saved = x if axis == "output" else np.ascontiguousarray(x[..., :count])
        gw = _core.conv2d_backward_weight(saved, q_scale, q_zp, r, w.shape, stride, pads, groups,
                                          axis, count)
        mask = np.zeros(w.shape, bool)
        if axis == "output":
            mask[:count] = True
            assert gw.shape == (count,) + w.shape[1:]
        else:
            mask[..., :count] = True
            assert gw.shape == w.shape[:3] + (count,)
        wm = np.where(mask, wr, 0.0)
        lhs = np.sum(r * conv_ref(xr, wm, stride, pads, groups))
        rhs = np.sum(gw * wm[mask].reshape(gw.shape))
        assert abs(lhs - rhs) <= 1e-5 * max(1.0, abs(lhs)), (axis, lhs, rhs)
    gb = _core.conv2d_backward_bias(r)
    np.testing.assert_allclose(gb, r.sum(axis=(0, 1, 2)), rtol=1e-5, atol=1e-5)


def test_fc_pool_loss_backward():
    w = rand_i8((6, 11), -127, 127)
    ws = RNG.uniform(0.01, 0.1, size=6).astype(np.float32)
    r = RNG.normal(size=(3, 6)).astype(np.float32)
    gi = _core.fc_backward_input(r, w, ws)
    np.testing.assert_allclose(gi, r @ (w * ws[:, None]), rtol=1e-5, atol=1e-5)
    x = rand_i8((3, 11))
    gw = _core.fc_backward_weight(x, 0.05, -3, r, (6, 11), "output", 4)
    np.testing.assert_allclose(gw, (r.T @ (0.05 * (x.astype(np.float64) + 3)))[:4], rtol=1e-5, atol=1e-5)
    gw_in = _core.fc_backward_weight(np.ascontiguousarray(x[:, :2]), 0.05, -3, r, (6, 11), "input", 2)
    np.testing.assert_allclose(gw_in, (r.T @ (0.05 * (x.astype(np.float64) + 3)))[:, :2], rtol=1e-5, atol=1e-5)

    out = np.array([[-5, 0, 127, 3]], np.int8)
    masked = _core.clamp_mask_backward(out, -5, 127, np.ones((1, 4), np.float32))
    np.testing.assert_array_equal(masked, [[0, 1, 0, 1]])
    ga, gb = _core.add_backward(out, np.arange(4, dtype=np.float32)[None], -5, 127)
    np.testing.assert_array_equal(ga, [[0, 1, 0, 3]])
    np.testing.assert_array_equal(ga, gb)

    gp = _core.global_avgpool_backward(np.array([[6.0, 3.0]], np.float32), (2, 3))
    np.testing.assert_allclose(gp, np.broadcast_to([1.0, 0.5], (1, 2, 3, 2)))
    go = RNG.normal(size=(1, 3, 3, 2)).astype(np.float32)
    ga = _core.avgpool_backward(go, (6, 6), (2, 2))
    np.testing.assert_allclose(ga, np.repeat(np.repeat(go, 2, 1), 2, 2) / 4, rtol=1e-6)
    xm = rand_i8((1, 6, 6, 2))
    gm = _core.maxpool_backward(xm, go, (2, 2))
    assert np.isclose(gm.sum(), go.sum()) and np.count_nonzero(gm) <= go.size

    logits = rand_i8((4, 10))
    labels = [0, 3, 9, 3]
    loss, grad = _core.softmax_cross_entropy(logits, 0.1, 2, labels)
    z = 0.1 * (logits.astype(np.float64) - 2)
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    np.testing.assert_allclose(loss, -np.log(p[np.arange(4), labels]), rtol=1e-5)
    onehot = np.eye(10)[labels]
    np.testing.assert_allclose(grad, p - onehot, atol=1e-6)
    t = RNG.normal(size=(4, 10)).astype(np.float32)
    l2, g2 = _core.mse(logits, 0.1, 2, t)
    np.testing.assert_allclose(l2, ((z - t) ** 2).mean(1), rtol=1e-5)
    np.testing.assert_allclose(g2, 2 * (z - t) / 10, rtol=1e-5, atol=1e-6)


def test_backward_matches_torch_autograd():
    torch = pytest.importorskip("torch")
    for h, w_, c, o, kh, kw, stride, pads, groups in CONV_CASES:
        t, l, b, r = pads
        w = rand_i8((o, kh, kw, c // groups), -127, 127)
        ws = RNG.uniform(0.002, 0.05, size=o).astype(np.float32)
        x = rand_i8((2, h, w_, c))
        xs, xz = 0.03, -4
        xt = torch.tensor(xs * (x.astype(np.float32) - xz)).permute(0, 3, 1, 2).requires_grad_()
        wt = torch.tensor(w.astype(np.float32) * ws[:, None, None, None]).permute(0, 3, 1, 2)
        wt = wt.contiguous().requires_grad_()
        xpad = torch.nn.functional.pad(xt, (l, r, t, b))
        y = torch.nn.functional.conv2d(xpad, wt, stride=stride, groups=groups)
        go = torch.randn_like(y)
        y.backward(go)
        go_np = go.permute(0, 2, 3, 1).contiguous().numpy()
        gi = _core.conv2d_backward_input(go_np, w, ws, (h, w_), stride, pads, groups)
        np.testing.assert_allclose(gi, xt.grad.permute(0, 2, 3, 1).numpy(), rtol=1e-4, atol=1e-4)
        gw = _core.conv2d_backward_weight(x, xs, xz, go_np, w.shape, stride, pads, groups)
        np.testing.assert_allclose(gw, wt.grad.permute(0, 2, 3, 1).numpy(), rtol=1e-4, atol=1e-3)


def test_sgd_bindings_update_in_place():
    w = np.zeros((4, 3), np.int8)
    ws = np.full(4, 0.5, np.float32)
    g = np.full((2, 3), -0.15, np.float32)  # QAS step: lr * g / s = -0.3 LSB -> +0.3
    state = _core.sgd_update_weights(w, ws, g, 1.0, "stochastic", True, rng_state=7, count=2)
    assert set(np.unique(w[:2])) <= {0, 1} and not w[2:].any()
    w2 = np.zeros((4, 3), np.int8)
    assert _core.sgd_update_weights(w2, ws, g, 1.0, "stochastic", True, rng_state=7, count=2) == state
    np.testing.assert_array_equal(w, w2)
    wr = np.zeros((4, 3), np.int8)
    res = np.zeros((2, 3), np.int8)
    for _ in range(4):
        _core.sgd_update_weights(wr, ws, g, 1.0, "residual", True, residual=res, count=2)
    np.testing.assert_array_equal(wr[:2], 1)  # 4 x 0.3 LSB kept by the residual
    wm = np.zeros((4, 3), np.int8)
    master = np.zeros((4, 3), np.float32)
    _core.sgd_update_weights(wm, ws, np.full((4, 3), -0.3, np.float32), 1.0, "fp32", True, master=master)
    np.testing.assert_allclose(master, 0.6)
    np.testing.assert_array_equal(wm, 1)
    with pytest.raises(ValueError, match="non-finite"):
        _core.sgd_update_weights(wm, ws, np.full((4, 3), np.nan, np.float32), 1.0, "fp32", True, master=master)
    np.testing.assert_array_equal(wm, 1)
    b = np.array([100, -100], np.int32)
    _core.sgd_update_bias(b, np.array([0.1, 0.1], np.float32), 0.5, np.array([0.05, -0.05], np.float32), 1.0)
    np.testing.assert_array_equal(b, [99, -99])
    assert [_core.bytes_per_weight(p) for p in ("stochastic", "residual", "fp32")] == [1, 2, 5]
    assert _core.bytes_per_weight("fp32", True) == 9


def test_errors_are_value_errors_with_the_core_message():
    x = rand_i8((1, 5, 5, 4))
    w = rand_i8((6, 3, 3, 4))
    ok = dict(stride=(1, 1), pads=(0, 0, 0, 0), groups=1, in_zp=0, out_zp=0,
              requant_scale=np.full(6, 0.01))
    with pytest.raises(ValueError, match="bias: expected 6 elements, got 5"):
        _core.conv2d_forward(x, w, np.zeros(5, np.int32), **ok)
    with pytest.raises(ValueError, match="groups must divide"):
        _core.conv2d_forward(x, w, np.zeros(6, np.int32), **{**ok, "groups": 3})
    with pytest.raises(ValueError, match="kernel larger than padded input"):
        _core.conv2d_forward(x[:, :2], w, np.zeros(6, np.int32), **ok)
    with pytest.raises(ValueError, match="zero stride"):
        _core.conv2d_forward(x, w, np.zeros(6, np.int32), **{**ok, "stride": (0, 1)})
    with pytest.raises(ValueError, match="4 dimensions"):
        _core.conv2d_forward(x[0], w, np.zeros(6, np.int32), **ok)
    with pytest.raises(ValueError, match="requantization scale"):
        _core.conv2d_forward(x, w, np.zeros(6, np.int32), **{**ok, "requant_scale": np.full(6, -1.0)})
    with pytest.raises(ValueError, match="act_min > act_max"):
        _core.fc_forward(rand_i8((1, 3)), rand_i8((2, 3)), np.zeros(2, np.int32), 0, 0, np.ones(2), 5, 4)
    with pytest.raises(ValueError, match="label out of range"):
        _core.softmax_cross_entropy(rand_i8((1, 3)), 0.1, 0, [3])
    with pytest.raises(ValueError, match="input-axis selection needs groups == 1"):
        _core.conv2d_backward_weight(x, 0.1, 0, np.zeros((1, 3, 3, 4), np.float32), (4, 3, 3, 1),
                                     groups=4, axis="input", count=1)
    with pytest.raises(ValueError, match="padding must be smaller"):
        _core.avgpool_forward(x, (2, 2), (1, 1), (2, 0, 0, 0))


def test_non_contiguous_inputs_are_accepted():
    x = rand_i8((2, 6, 6, 8))
    w = rand_i8((4, 3, 3, 8), -127, 127)
    bias = np.zeros(4, np.int32)
    rs = np.full(4, 0.01)
    want = _core.conv2d_forward(x, w, bias, (1, 1), (1, 1, 1, 1), 1, 0, 0, rs)
    # The same data seen through a transposed (non C-contiguous) view.
    xt = np.ascontiguousarray(x.transpose(0, 2, 1, 3)).transpose(0, 2, 1, 3)
    assert not xt.flags.c_contiguous
    np.testing.assert_array_equal(_core.conv2d_forward(xt, w, bias, (1, 1), (1, 1, 1, 1), 1, 0, 0, rs), want)
    with pytest.raises(TypeError):
        _core.conv2d_forward(x.astype(np.int16), w, bias, (1, 1), (1, 1, 1, 1), 1, 0, 0, rs)

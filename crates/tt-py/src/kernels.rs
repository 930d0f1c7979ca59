//! Bindings of the individual tt-core kernels (used by the importers' reference checks and tests).
//!
//! Every array carries a leading batch dimension; the loop over samples runs here, the math in
//! tt-core. Activations are NHWC int8, conv weights OHWI, FC weights `[out][in]`. A tt-core error
//! becomes a `ValueError` carrying tt-core's message.
use numpy::{Element, PyArrayDyn, PyReadonlyArrayDyn, PyReadwriteArrayDyn, PyUntypedArrayMethods};
use pyo3::prelude::*;

use crate::numerics::{bad, core_err, data, qparams, requants, to_numpy, Py1};
use tt_core::ir::Precision;
use tt_core::ops::{add, conv, fc, loss, pool, ChannelSelection};
use tt_core::qas::{self, SgdConfig, UpdateState, XorShift32};
use tt_core::quant::{QParams, Requant, Rounding};

type Py2<'py> = PyResult<(Bound<'py, PyArrayDyn<f32>>, Bound<'py, PyArrayDyn<f32>>)>;

fn dims<T: Element>(
    a: &PyReadonlyArrayDyn<'_, T>,
    ndim: usize,
    name: &str,
) -> PyResult<Vec<usize>> {
    let s = a.shape();
    if s.len() != ndim {
        return Err(bad(format!(
            "{name}: expected {ndim} dimensions, got shape {s:?}"
        )));
    }
    Ok(s.to_vec())
}

#[allow(clippy::too_many_arguments)]
fn geom(
    in_hwc: (usize, usize, usize),
    out_c: usize,
    kernel: (usize, usize),
    stride: (usize, usize),
    pads: (usize, usize, usize, usize),
    groups: usize,
) -> PyResult<conv::Conv2dGeom> {
    conv::Conv2dGeom::new(
        in_hwc.0, in_hwc.1, in_hwc.2, out_c, kernel.0, kernel.1, stride.0, stride.1, pads.0,
        pads.1, pads.2, pads.3, groups,
    )
    .map_err(core_err)
}

fn selection(axis: &str, count: usize) -> PyResult<ChannelSelection> {
    match axis {
        "output" => Ok(ChannelSelection::output(count)),
        "input" => Ok(ChannelSelection::input(count)),
        _ => Err(bad(format!(
            "axis must be 'output' or 'input', got {axis:?}"
        ))),
    }
}

/// Fixed-point encoding `(multiplier, shift)` of a real requantization scale.
#[pyfunction]
fn requant_from_scale(scale: f64) -> PyResult<(i32, i32)> {
    let r = Requant::from_scale(scale).map_err(core_err)?;
    Ok((r.multiplier, r.shift as i32))
}

/// Int8 conv forward over a batch: x `[N,H,W,C]`, weight OHWI, bias int32 `[O]`,
/// requant_scale float64 `[O]` (= s_in * s_w[o] / s_out). Returns int8 `[N,OH,OW,O]`.
/// `rounding` is the model's mode (`QuantizedModel.rounding`): "single" or "double" (TFLite's).
#[pyfunction]
#[pyo3(signature = (x, weight, bias, stride=(1, 1), pads=(0, 0, 0, 0), groups=1, in_zp=0, out_zp=0, requant_scale=None, act_min=-128, act_max=127, rounding="single"))]
#[allow(clippy::too_many_arguments)]
fn conv2d_forward<'py>(
    py: Python<'py>,
    x: PyReadonlyArrayDyn<'py, i8>,
    weight: PyReadonlyArrayDyn<'py, i8>,
    bias: PyReadonlyArrayDyn<'py, i32>,
    stride: (usize, usize),
    pads: (usize, usize, usize, usize),
    groups: usize,
    in_zp: i32,
    out_zp: i32,
    requant_scale: Option<PyReadonlyArrayDyn<'py, f64>>,
    act_min: i8,
    act_max: i8,
    rounding: &str,
) -> Py1<'py, i8> {
    let xs = dims(&x, 4, "x")?;
    let ws = dims(&weight, 4, "weight")?;
    let rs =
        requant_scale.ok_or_else(|| bad("conv2d_forward: requant_scale is required".into()))?;
    let g = geom(
        (xs[1], xs[2], xs[3]),
        ws[0],
        (ws[1], ws[2]),
        stride,
        pads,
        groups,
    )?;
    let rq = requants(&data(&rs), rounding, false)?;
    let (xd, wd, bd) = (data(&x), data(&weight), data(&bias));
    let (il, ol) = (g.input_len(), g.output_len());
    let mut out = vec![0i8; xs[0] * ol];
    // The batch runs without the GIL: other Python threads keep going meanwhile.
    py.allow_threads(|| {
        for n in 0..xs[0] {
            conv::conv2d_forward(
                &g,
                &xd[n * il..(n + 1) * il],
                in_zp,
                &wd,
                &bd,
                &rq,
                out_zp,
                act_min,
                act_max,
                &mut out[n * ol..(n + 1) * ol],
            )?;
        }
        Ok(())
    })
    .map_err(core_err)?;
    to_numpy(py, &[xs[0], g.out_h(), g.out_w(), g.out_c], out)
}

/// Int32 conv accumulation with a weight zero point (imported models: ConvInteger, the first
/// half of QLinearConv): `bias[o] + sum (x - x_zp) * (w - w_zp[o])`, `[N,OH,OW,O]`.
#[pyfunction]
#[pyo3(signature = (x, weight, x_zp=0, w_zp=None, bias=None, stride=(1, 1), pads=(0, 0, 0, 0), groups=1))]
#[allow(clippy::too_many_arguments)]
fn conv2d_accumulate<'py>(
    py: Python<'py>,
    x: PyReadonlyArrayDyn<'py, i8>,
    weight: PyReadonlyArrayDyn<'py, i8>,
    x_zp: i32,
    w_zp: Option<PyReadonlyArrayDyn<'py, i32>>,
    bias: Option<PyReadonlyArrayDyn<'py, i32>>,
    stride: (usize, usize),
    pads: (usize, usize, usize, usize),
    groups: usize,
) -> Py1<'py, i32> {
    let xs = dims(&x, 4, "x")?;
    let ws = dims(&weight, 4, "weight")?;
    let g = geom(
        (xs[1], xs[2], xs[3]),
        ws[0],
        (ws[1], ws[2]),
        stride,
        pads,
        groups,
    )?;
    let wzp: Vec<i32> = w_zp
        .map(|a| data(&a).into_owned())
        .unwrap_or_else(|| vec![0]);
    let b: Vec<i32> = bias.map(|a| data(&a).into_owned()).unwrap_or_default();
    let (xd, wd) = (data(&x), data(&weight));
    let (il, ol) = (g.input_len(), g.output_len());
    let mut out = vec![0i32; xs[0] * ol];
    // The batch runs without the GIL: other Python threads keep going meanwhile.
    py.allow_threads(|| {
        for n in 0..xs[0] {
            conv::conv2d_accumulate(
                &g,
                &xd[n * il..(n + 1) * il],
                x_zp,
                &wd,
                &wzp,
                &b,
                &mut out[n * ol..(n + 1) * ol],
            )?;
        }
        Ok(())
    })
    .map_err(core_err)?;
    to_numpy(py, &[xs[0], g.out_h(), g.out_w(), g.out_c], out)
}

/// Input gradient of conv, f32 `[N,H,W,C]` from grad_out `[N,OH,OW,O]`.
#[pyfunction]
#[pyo3(signature = (grad_out, weight, weight_scale, input_hw, stride=(1, 1), pads=(0, 0, 0, 0), groups=1))]
#[allow(clippy::too_many_arguments)]
fn conv2d_backward_input<'py>(
    py: Python<'py>,
    grad_out: PyReadonlyArrayDyn<'py, f32>,
    weight: PyReadonlyArrayDyn<'py, i8>,
    weight_scale: PyReadonlyArrayDyn<'py, f32>,
    input_hw: (usize, usize),
    stride: (usize, usize),
    pads: (usize, usize, usize, usize),
    groups: usize,
) -> Py1<'py, f32> {
    let gs = dims(&grad_out, 4, "grad_out")?;
    let ws = dims(&weight, 4, "weight")?;
    let g = geom(
        (input_hw.0, input_hw.1, ws[3] * groups),
        ws[0],
        (ws[1], ws[2]),
        stride,
        pads,
        groups,
    )?;
    let (gd, wd, sd) = (data(&grad_out), data(&weight), data(&weight_scale));
    let (il, ol) = (g.input_len(), g.output_len());
    if gd.len() != gs[0] * ol {
        return Err(bad(format!(
            "grad_out: shape {gs:?} does not match the conv output {:?}",
            (g.out_h(), g.out_w(), g.out_c)
        )));
    }
    let mut out = vec![0f32; gs[0] * il];
    // The batch runs without the GIL: other Python threads keep going meanwhile.
    py.allow_threads(|| {
        for n in 0..gs[0] {
            conv::conv2d_backward_input(
                &g,
                &gd[n * ol..(n + 1) * ol],
                &wd,
                &sd,
                &mut out[n * il..(n + 1) * il],
            )?;
        }
        Ok(())
    })
    .map_err(core_err)?;
    to_numpy(py, &[gs[0], g.in_h, g.in_w, g.in_c], out)
}

/// Weight gradient (real units) summed over the batch, for the selected channels:
/// `[count,kh,kw,I/g]` (axis "output") or `[O,kh,kw,count]` (axis "input", x then holds only
/// the first `count` input channels). `weight_shape` is the full OHWI shape.
#[pyfunction]
#[pyo3(signature = (x, in_scale, in_zp, grad_out, weight_shape, stride=(1, 1), pads=(0, 0, 0, 0), groups=1, axis="output", count=None))]
#[allow(clippy::too_many_arguments)]
fn conv2d_backward_weight<'py>(
    py: Python<'py>,
    x: PyReadonlyArrayDyn<'py, i8>,
    in_scale: f32,
    in_zp: i32,
    grad_out: PyReadonlyArrayDyn<'py, f32>,
    weight_shape: (usize, usize, usize, usize),
    stride: (usize, usize),
    pads: (usize, usize, usize, usize),
    groups: usize,
    axis: &str,
    count: Option<usize>,
) -> Py1<'py, f32> {
    let xs = dims(&x, 4, "x")?;
    let gs = dims(&grad_out, 4, "grad_out")?;
    let (o, kh, kw, ipg) = weight_shape;
    let count = count.unwrap_or(if axis == "input" { ipg } else { o });
    let sel = selection(axis, count)?;
    let g = geom(
        (xs[1], xs[2], ipg * groups),
        o,
        (kh, kw),
        stride,
        pads,
        groups,
    )?;
    if gs[0] != xs[0] {
        return Err(bad(format!(
            "x and grad_out batch sizes differ: {} vs {}",
            xs[0], gs[0]
        )));
    }
    let ws = g.weight_shape();
    sel.check(&ws).map_err(core_err)?;
    let q = qparams(in_scale, in_zp)?;
    let (xd, gd) = (data(&x), data(&grad_out));
    let il = xs[1] * xs[2] * xs[3];
    let ol = g.output_len();
    let mut gw = vec![0f32; sel.selected_len(&ws)];
    if gd.len() != gs[0] * ol {
        return Err(bad(format!(
            "grad_out: shape {gs:?} does not match the conv output {:?}",
            (g.out_h(), g.out_w(), g.out_c)
        )));
    }
    // The batch runs without the GIL: other Python threads keep going meanwhile.
    py.allow_threads(|| {
        for n in 0..xs[0] {
            conv::conv2d_backward_weight(
                &g,
                &xd[n * il..(n + 1) * il],
                q,
                &gd[n * ol..(n + 1) * ol],
                sel,
                &mut gw,
            )?;
        }
        Ok(())
    })
    .map_err(core_err)?;
    let shape = match sel.axis {
        tt_core::ops::ChannelAxis::Output => [count, kh, kw, ipg],
        tt_core::ops::ChannelAxis::Input => [o, kh, kw, count],
    };
    to_numpy(py, &shape, gw)
}

/// Bias gradient (real units) summed over batch and pixels of grad_out `[N,OH,OW,O]`.
#[pyfunction]
fn conv2d_backward_bias<'py>(
    py: Python<'py>,
    grad_out: PyReadonlyArrayDyn<'py, f32>,
) -> Py1<'py, f32> {
    let gs = dims(&grad_out, 4, "grad_out")?;
    let g = geom((gs[1], gs[2], 1), gs[3], (1, 1), (1, 1), (0, 0, 0, 0), 1)?;
    let gd = data(&grad_out);
    let mut gb = vec![0f32; gs[3]];
    let ol = g.output_len();
    for n in 0..gs[0] {
        conv::conv2d_backward_bias(&g, &gd[n * ol..(n + 1) * ol], &mut gb).map_err(core_err)?;
    }
    to_numpy(py, &[gs[3]], gb)
}

/// Int8 FC forward: x `[N,I]`, weight `[O,I]` -> int8 `[N,O]`. `rounding` is the model's mode;
/// an fc layer rounds once in either (as TFLite's FULLY_CONNECTED does).
#[pyfunction]
#[pyo3(signature = (x, weight, bias, in_zp, out_zp, requant_scale, act_min=-128, act_max=127, rounding="single"))]
#[allow(clippy::too_many_arguments)]
fn fc_forward<'py>(
    py: Python<'py>,
    x: PyReadonlyArrayDyn<'py, i8>,
    weight: PyReadonlyArrayDyn<'py, i8>,
    bias: PyReadonlyArrayDyn<'py, i32>,
    in_zp: i32,
    out_zp: i32,
    requant_scale: PyReadonlyArrayDyn<'py, f64>,
    act_min: i8,
    act_max: i8,
    rounding: &str,
) -> Py1<'py, i8> {
    let xs = dims(&x, 2, "x")?;
    let ws = dims(&weight, 2, "weight")?;
    let g = fc::FcGeom::new(ws[1], ws[0]).map_err(core_err)?;
    if xs[1] != ws[1] {
        return Err(bad(format!(
            "x has {} features, weight expects {}",
            xs[1], ws[1]
        )));
    }
    let rq = requants(&data(&requant_scale), rounding, true)?;
    let (xd, wd, bd) = (data(&x), data(&weight), data(&bias));
    let (i, o) = (ws[1], ws[0]);
    let mut out = vec![0i8; xs[0] * o];
    for n in 0..xs[0] {
        fc::fc_forward(
            &g,
            &xd[n * i..(n + 1) * i],
            in_zp,
            &wd,
            &bd,
            &rq,
            out_zp,
            act_min,
            act_max,
            &mut out[n * o..(n + 1) * o],
        )
        .map_err(core_err)?;
    }
    to_numpy(py, &[xs[0], o], out)
}

/// Int32 FC accumulation with a weight zero point (MatMulInteger / QLinearMatMul):
/// `bias[o] + sum_i (x - x_zp) * (w[o][i] - w_zp[o])`, `[N,O]`.
#[pyfunction]
#[pyo3(signature = (x, weight, x_zp=0, w_zp=None, bias=None))]
fn fc_accumulate<'py>(
    py: Python<'py>,
    x: PyReadonlyArrayDyn<'py, i8>,
    weight: PyReadonlyArrayDyn<'py, i8>,
    x_zp: i32,
    w_zp: Option<PyReadonlyArrayDyn<'py, i32>>,
    bias: Option<PyReadonlyArrayDyn<'py, i32>>,
) -> Py1<'py, i32> {
    let xs = dims(&x, 2, "x")?;
    let ws = dims(&weight, 2, "weight")?;
    let g = fc::FcGeom::new(ws[1], ws[0]).map_err(core_err)?;
    if xs[1] != ws[1] {
        return Err(bad(format!(
            "x has {} features, weight expects {}",
            xs[1], ws[1]
        )));
    }
    let wzp: Vec<i32> = w_zp
        .map(|a| data(&a).into_owned())
        .unwrap_or_else(|| vec![0]);
    let b: Vec<i32> = bias.map(|a| data(&a).into_owned()).unwrap_or_default();
    let (xd, wd) = (data(&x), data(&weight));
    let (i, o) = (ws[1], ws[0]);
    let mut out = vec![0i32; xs[0] * o];
    for n in 0..xs[0] {
        fc::fc_accumulate(
            &g,
            &xd[n * i..(n + 1) * i],
            x_zp,
            &wd,
            &wzp,
            &b,
            &mut out[n * o..(n + 1) * o],
        )
        .map_err(core_err)?;
    }
    to_numpy(py, &[xs[0], o], out)
}

/// FC input gradient `[N,I]` from grad_out `[N,O]`.
#[pyfunction]
fn fc_backward_input<'py>(
    py: Python<'py>,
    grad_out: PyReadonlyArrayDyn<'py, f32>,
    weight: PyReadonlyArrayDyn<'py, i8>,
    weight_scale: PyReadonlyArrayDyn<'py, f32>,
) -> Py1<'py, f32> {
    let gs = dims(&grad_out, 2, "grad_out")?;
    let ws = dims(&weight, 2, "weight")?;
    let g = fc::FcGeom::new(ws[1], ws[0]).map_err(core_err)?;
    let (gd, wd, sd) = (data(&grad_out), data(&weight), data(&weight_scale));
    let (i, o) = (ws[1], ws[0]);
    let mut out = vec![0f32; gs[0] * i];
    for n in 0..gs[0] {
        let go = gd
            .get(n * o..(n + 1) * o)
            .ok_or_else(|| bad("grad_out: wrong width".into()))?;
        fc::fc_backward_input(&g, go, &wd, &sd, &mut out[n * i..(n + 1) * i]).map_err(core_err)?;
    }
    to_numpy(py, &[gs[0], i], out)
}

/// FC weight gradient summed over the batch: `[count,I]` (axis "output") or `[O,count]`
/// (axis "input", x then holds only the first `count` features).
#[pyfunction]
#[pyo3(signature = (x, in_scale, in_zp, grad_out, weight_shape, axis="output", count=None))]
#[allow(clippy::too_many_arguments)]
fn fc_backward_weight<'py>(
    py: Python<'py>,
    x: PyReadonlyArrayDyn<'py, i8>,
    in_scale: f32,
    in_zp: i32,
    grad_out: PyReadonlyArrayDyn<'py, f32>,
    weight_shape: (usize, usize),
    axis: &str,
    count: Option<usize>,
) -> Py1<'py, f32> {
    let xs = dims(&x, 2, "x")?;
    let gs = dims(&grad_out, 2, "grad_out")?;
    let (o, i) = weight_shape;
    let count = count.unwrap_or(if axis == "input" { i } else { o });
    let sel = selection(axis, count)?;
    let g = fc::FcGeom::new(i, o).map_err(core_err)?;
    let ws = g.weight_shape();
    sel.check(&ws).map_err(core_err)?;
    if gs[0] != xs[0] || gs[1] != o {
        return Err(bad(format!(
            "grad_out shape {gs:?} does not match x batch / out features"
        )));
    }
    let q = qparams(in_scale, in_zp)?;
    let (xd, gd) = (data(&x), data(&grad_out));
    let mut gw = vec![0f32; sel.selected_len(&ws)];
    for n in 0..xs[0] {
        fc::fc_backward_weight(
            &g,
            &xd[n * xs[1]..(n + 1) * xs[1]],
            q,
            &gd[n * o..(n + 1) * o],
            sel,
            &mut gw,
        )
        .map_err(core_err)?;
    }
    let shape = match sel.axis {
        tt_core::ops::ChannelAxis::Output => [count, i],
        tt_core::ops::ChannelAxis::Input => [o, count],
    };
    to_numpy(py, &shape, gw)
}

/// Residual add of two int8 tensors (any equal shapes) with their own quantization.
#[pyfunction]
#[pyo3(signature = (a, a_scale, a_zp, b, b_scale, b_zp, out_scale, out_zp, act_min=-128, act_max=127, rounding="single"))]
#[allow(clippy::too_many_arguments)]
fn add_forward<'py>(
    py: Python<'py>,
    a: PyReadonlyArrayDyn<'py, i8>,
    a_scale: f32,
    a_zp: i32,
    b: PyReadonlyArrayDyn<'py, i8>,
    b_scale: f32,
    b_zp: i32,
    out_scale: f32,
    out_zp: i32,
    act_min: i8,
    act_max: i8,
    rounding: &str,
) -> Py1<'py, i8> {
    if a.shape() != b.shape() {
        return Err(bad(format!(
            "add: shapes differ: {:?} vs {:?}",
            a.shape(),
            b.shape()
        )));
    }
    let p = add::AddParams::new(
        qparams(a_scale, a_zp)?,
        qparams(b_scale, b_zp)?,
        qparams(out_scale, out_zp)?,
        act_min,
        act_max,
        crate::engine::parse_name::<Rounding>(rounding)?,
    )
    .map_err(core_err)?;
    let (ad, bd) = (data(&a), data(&b));
    let mut out = vec![0i8; ad.len()];
    add::add_forward(&p, &ad, &bd, &mut out).map_err(core_err)?;
    to_numpy(py, a.shape(), out)
}

/// Gradients of both add inputs (real units, clamp-masked by the saved output).
#[pyfunction]
#[pyo3(signature = (out_q, grad_out, act_min=-128, act_max=127))]
fn add_backward<'py>(
    py: Python<'py>,
    out_q: PyReadonlyArrayDyn<'py, i8>,
    grad_out: PyReadonlyArrayDyn<'py, f32>,
    act_min: i8,
    act_max: i8,
) -> Py2<'py> {
    let (qd, gd) = (data(&out_q), data(&grad_out));
    let mut ga = vec![0f32; qd.len()];
    let mut gb = vec![0f32; qd.len()];
    add::add_backward(&qd, act_min, act_max, &gd, &mut ga, &mut gb).map_err(core_err)?;
    let shape = out_q.shape().to_vec();
    Ok((to_numpy(py, &shape, ga)?, to_numpy(py, &shape, gb)?))
}

/// Zeroes the gradient where the saved int8 output sits on a clamp bound (returns a copy).
#[pyfunction]
fn clamp_mask_backward<'py>(
    py: Python<'py>,
    out_q: PyReadonlyArrayDyn<'py, i8>,
    act_min: i8,
    act_max: i8,
    grad: PyReadonlyArrayDyn<'py, f32>,
) -> Py1<'py, f32> {
    let qd = data(&out_q);
    let mut g = data(&grad).into_owned();
    tt_core::ops::act::clamp_mask_backward(&qd, act_min, act_max, &mut g).map_err(core_err)?;
    to_numpy(py, grad.shape(), g)
}

/// Global average pool `[N,H,W,C]` -> int8 `[N,C]`, requantized to the output quantization.
#[pyfunction]
#[pyo3(signature = (x, in_scale, in_zp, out_scale, out_zp, rounding="single"))]
fn global_avgpool_forward<'py>(
    py: Python<'py>,
    x: PyReadonlyArrayDyn<'py, i8>,
    in_scale: f32,
    in_zp: i32,
    out_scale: f32,
    out_zp: i32,
    rounding: &str,
) -> Py1<'py, i8> {
    let mode = crate::engine::parse_name::<Rounding>(rounding)?;
    let xs = dims(&x, 4, "x")?;
    let (iq, oq) = (qparams(in_scale, in_zp)?, qparams(out_scale, out_zp)?);
    let xd = data(&x);
    let il = xs[1] * xs[2] * xs[3];
    let mut out = vec![0i8; xs[0] * xs[3]];
    for n in 0..xs[0] {
        pool::global_avgpool_forward(
            xs[1],
            xs[2],
            xs[3],
            &xd[n * il..(n + 1) * il],
            iq,
            oq,
            mode,
            &mut out[n * xs[3]..(n + 1) * xs[3]],
        )
        .map_err(core_err)?;
    }
    to_numpy(py, &[xs[0], xs[3]], out)
}

/// Global average pool gradient `[N,H,W,C]` from `[N,C]`.
#[pyfunction]
fn global_avgpool_backward<'py>(
    py: Python<'py>,
    grad_out: PyReadonlyArrayDyn<'py, f32>,
    input_hw: (usize, usize),
) -> Py1<'py, f32> {
    let gs = dims(&grad_out, 2, "grad_out")?;
    let gd = data(&grad_out);
    let il = input_hw.0 * input_hw.1 * gs[1];
    let mut out = vec![0f32; gs[0] * il];
    for n in 0..gs[0] {
        pool::global_avgpool_backward(
            input_hw.0,
            input_hw.1,
            gs[1],
            &gd[n * gs[1]..(n + 1) * gs[1]],
            &mut out[n * il..(n + 1) * il],
        )
        .map_err(core_err)?;
    }
    to_numpy(py, &[gs[0], input_hw.0, input_hw.1, gs[1]], out)
}

fn pool_geom(
    xs: &[usize],
    kernel: (usize, usize),
    stride: Option<(usize, usize)>,
    pads: (usize, usize, usize, usize),
) -> PyResult<pool::Pool2dGeom> {
    let stride = stride.unwrap_or(kernel);
    pool::Pool2dGeom::new(
        xs[1], xs[2], xs[3], kernel.0, kernel.1, stride.0, stride.1, pads.0, pads.1, pads.2, pads.3,
    )
    .map_err(core_err)
}

type PoolFwd = fn(&pool::Pool2dGeom, &[i8], &mut [i8]) -> tt_core::Result<()>;

fn pool_forward<'py>(
    py: Python<'py>,
    x: PyReadonlyArrayDyn<'py, i8>,
    kernel: (usize, usize),
    stride: Option<(usize, usize)>,
    pads: (usize, usize, usize, usize),
    f: PoolFwd,
) -> Py1<'py, i8> {
    let xs = dims(&x, 4, "x")?;
    let g = pool_geom(&xs, kernel, stride, pads)?;
    let xd = data(&x);
    let (il, ol) = (g.input_len(), g.output_len());
    let mut out = vec![0i8; xs[0] * ol];
    for n in 0..xs[0] {
        f(
            &g,
            &xd[n * il..(n + 1) * il],
            &mut out[n * ol..(n + 1) * ol],
        )
        .map_err(core_err)?;
    }
    to_numpy(py, &[xs[0], g.out_h(), g.out_w(), xs[3]], out)
}

/// k x k average pool (pads excluded from the count), same quantization in and out.
#[pyfunction]
#[pyo3(signature = (x, kernel, stride=None, pads=(0, 0, 0, 0)))]
fn avgpool_forward<'py>(
    py: Python<'py>,
    x: PyReadonlyArrayDyn<'py, i8>,
    kernel: (usize, usize),
    stride: Option<(usize, usize)>,
    pads: (usize, usize, usize, usize),
) -> Py1<'py, i8> {
    pool_forward(py, x, kernel, stride, pads, pool::avgpool_forward)
}

/// k x k max pool (padding never wins), same quantization in and out.
#[pyfunction]
#[pyo3(signature = (x, kernel, stride=None, pads=(0, 0, 0, 0)))]
fn maxpool_forward<'py>(
    py: Python<'py>,
    x: PyReadonlyArrayDyn<'py, i8>,
    kernel: (usize, usize),
    stride: Option<(usize, usize)>,
    pads: (usize, usize, usize, usize),
) -> Py1<'py, i8> {
    pool_forward(py, x, kernel, stride, pads, pool::maxpool_forward)
}

/// Average pool gradient `[N,H,W,C]` from grad_out `[N,OH,OW,C]`.
#[pyfunction]
#[pyo3(signature = (grad_out, input_hw, kernel, stride=None, pads=(0, 0, 0, 0)))]
fn avgpool_backward<'py>(
    py: Python<'py>,
    grad_out: PyReadonlyArrayDyn<'py, f32>,
    input_hw: (usize, usize),
    kernel: (usize, usize),
    stride: Option<(usize, usize)>,
    pads: (usize, usize, usize, usize),
) -> Py1<'py, f32> {
    let gs = dims(&grad_out, 4, "grad_out")?;
    let g = pool_geom(
        &[gs[0], input_hw.0, input_hw.1, gs[3]],
        kernel,
        stride,
        pads,
    )?;
    let gd = data(&grad_out);
    let (il, ol) = (g.input_len(), g.output_len());
    if gd.len() != gs[0] * ol {
        return Err(bad(format!(
            "grad_out: shape {gs:?} does not match the pool output"
        )));
    }
    let mut out = vec![0f32; gs[0] * il];
    for n in 0..gs[0] {
        pool::avgpool_backward(
            &g,
            &gd[n * ol..(n + 1) * ol],
            &mut out[n * il..(n + 1) * il],
        )
        .map_err(core_err)?;
    }
    to_numpy(py, &[gs[0], input_hw.0, input_hw.1, gs[3]], out)
}

/// Max pool gradient `[N,H,W,C]` routed to each window's first maximum in the saved input.
#[pyfunction]
#[pyo3(signature = (x, grad_out, kernel, stride=None, pads=(0, 0, 0, 0)))]
fn maxpool_backward<'py>(
    py: Python<'py>,
    x: PyReadonlyArrayDyn<'py, i8>,
    grad_out: PyReadonlyArrayDyn<'py, f32>,
    kernel: (usize, usize),
    stride: Option<(usize, usize)>,
    pads: (usize, usize, usize, usize),
) -> Py1<'py, f32> {
    let xs = dims(&x, 4, "x")?;
    let g = pool_geom(&xs, kernel, stride, pads)?;
    let (xd, gd) = (data(&x), data(&grad_out));
    let (il, ol) = (g.input_len(), g.output_len());
    if gd.len() != xs[0] * ol {
        return Err(bad("grad_out: shape does not match the pool output".into()));
    }
    let mut out = vec![0f32; xs[0] * il];
    for n in 0..xs[0] {
        pool::maxpool_backward(
            &g,
            &xd[n * il..(n + 1) * il],
            &gd[n * ol..(n + 1) * ol],
            &mut out[n * il..(n + 1) * il],
        )
        .map_err(core_err)?;
    }
    to_numpy(py, &xs, out)
}

/// Per-sample softmax cross-entropy on int8 logits `[N,K]`: `(loss[N], grad_logits[N,K])`.
#[pyfunction]
fn softmax_cross_entropy<'py>(
    py: Python<'py>,
    logits: PyReadonlyArrayDyn<'py, i8>,
    scale: f32,
    zero_point: i32,
    labels: Vec<usize>,
) -> Py2<'py> {
    let ls = dims(&logits, 2, "logits")?;
    if labels.len() != ls[0] {
        return Err(bad(format!(
            "{} labels for {} samples",
            labels.len(),
            ls[0]
        )));
    }
    let q = QParams { scale, zero_point };
    let ld = data(&logits);
    let k = ls[1];
    let mut losses = vec![0f32; ls[0]];
    let mut grad = vec![0f32; ls[0] * k];
    for n in 0..ls[0] {
        losses[n] = loss::softmax_cross_entropy(
            &ld[n * k..(n + 1) * k],
            q,
            labels[n],
            &mut grad[n * k..(n + 1) * k],
        )
        .map_err(core_err)?;
    }
    Ok((to_numpy(py, &[ls[0]], losses)?, to_numpy(py, &ls, grad)?))
}

/// Per-sample mean squared error of int8 outputs `[N,...]` against f32 targets of equal shape.
#[pyfunction]
fn mse<'py>(
    py: Python<'py>,
    output: PyReadonlyArrayDyn<'py, i8>,
    scale: f32,
    zero_point: i32,
    target: PyReadonlyArrayDyn<'py, f32>,
) -> Py2<'py> {
    let shape = output.shape().to_vec();
    if shape.is_empty() || target.shape() != shape.as_slice() {
        return Err(bad(format!(
            "mse: output {shape:?} and target {:?} must have the same batched shape",
            target.shape()
        )));
    }
    let q = QParams { scale, zero_point };
    let (od, td) = (data(&output), data(&target));
    let per = shape[1..].iter().product::<usize>();
    let mut losses = vec![0f32; shape[0]];
    let mut grad = vec![0f32; od.len()];
    for n in 0..shape[0] {
        losses[n] = loss::mse(
            &od[n * per..(n + 1) * per],
            q,
            &td[n * per..(n + 1) * per],
            &mut grad[n * per..(n + 1) * per],
        )
        .map_err(core_err)?;
    }
    Ok((
        to_numpy(py, &[shape[0]], losses)?,
        to_numpy(py, &shape, grad)?,
    ))
}

fn precision(name: &str) -> PyResult<Precision> {
    crate::engine::parse_name::<Precision>(name)
}

/// Bytes of SRAM per updated weight for a precision ('stochastic' | 'residual' | 'fp32').
#[pyfunction]
#[pyo3(signature = (precision_name, momentum=false))]
fn bytes_per_weight(precision_name: &str, momentum: bool) -> PyResult<usize> {
    Ok(precision(precision_name)?.bytes_per_weight(momentum))
}

/// One in-place int8 SGD step on the selected channels of `weight` (OHWI or `[O,I]`).
/// `grad_w` is the real-unit gradient of the selected block; `state` is the residual (int8) or
/// master copy (f32) of the selected block for 'residual' / 'fp32'; `rng_state` drives
/// 'stochastic'. Returns the generator state after the step.
#[pyfunction]
#[pyo3(signature = (weight, weight_scale, grad_w, lr, precision_name="stochastic", qas=true, momentum=0.0, momentum_buf=None, rng_state=1, residual=None, master=None, groups=1, axis="output", count=None))]
#[allow(clippy::too_many_arguments)]
fn sgd_update_weights(
    mut weight: PyReadwriteArrayDyn<'_, i8>,
    weight_scale: PyReadonlyArrayDyn<'_, f32>,
    grad_w: PyReadonlyArrayDyn<'_, f32>,
    lr: f32,
    precision_name: &str,
    qas: bool,
    momentum: f32,
    momentum_buf: Option<PyReadwriteArrayDyn<'_, f32>>,
    rng_state: u32,
    residual: Option<PyReadwriteArrayDyn<'_, i8>>,
    master: Option<PyReadwriteArrayDyn<'_, f32>>,
    groups: usize,
    axis: &str,
    count: Option<usize>,
) -> PyResult<u32> {
    let s = weight.shape().to_vec();
    let shape = match s.len() {
        4 => tt_core::ops::WeightShape {
            out_c: s[0],
            taps: s[1] * s[2],
            in_per_group: s[3],
            groups,
        },
        2 => tt_core::ops::WeightShape {
            out_c: s[0],
            taps: 1,
            in_per_group: s[1],
            groups,
        },
        _ => {
            return Err(bad(format!(
                "weight must be OHWI or [O,I], got shape {s:?}"
            )))
        }
    };
    let count = count.unwrap_or(if axis == "input" {
        shape.in_per_group
    } else {
        shape.out_c
    });
    let sel = selection(axis, count)?;
    let cfg = SgdConfig { lr, momentum, qas };
    let (sd, gd) = (data(&weight_scale), data(&grad_w));
    let w = weight
        .as_slice_mut()
        .map_err(|_| bad("weight must be C-contiguous (it is updated in place)".into()))?;
    let mut rng = XorShift32::new(rng_state);
    let mut residual = residual;
    let mut master = master;
    let state = match precision(precision_name)? {
        Precision::StochasticRounding => UpdateState::StochasticRounding(&mut rng),
        Precision::Residual => UpdateState::Residual(
            residual
                .as_mut()
                .ok_or_else(|| bad("precision 'residual' needs residual=".into()))?
                .as_slice_mut()
                .map_err(|_| bad("residual must be C-contiguous".into()))?,
        ),
        Precision::FpMaster => UpdateState::FpMaster(
            master
                .as_mut()
                .ok_or_else(|| bad("precision 'fp32' needs master=".into()))?
                .as_slice_mut()
                .map_err(|_| bad("master must be C-contiguous".into()))?,
        ),
    };
    let mut mb = momentum_buf;
    let mref = match mb.as_mut() {
        Some(m) => Some(
            m.as_slice_mut()
                .map_err(|_| bad("momentum_buf must be C-contiguous".into()))?,
        ),
        None => None,
    };
    qas::sgd_update_weights(w, &shape, &sd, sel, &gd, &cfg, mref, state).map_err(core_err)?;
    Ok(rng.state)
}

/// One in-place SGD step on int32 biases (prefix `0..len(grad_b)`).
#[pyfunction]
#[pyo3(signature = (bias, weight_scale, input_scale, grad_b, lr, qas=true, momentum=0.0, momentum_buf=None))]
#[allow(clippy::too_many_arguments)]
fn sgd_update_bias(
    mut bias: PyReadwriteArrayDyn<'_, i32>,
    weight_scale: PyReadonlyArrayDyn<'_, f32>,
    input_scale: f32,
    grad_b: PyReadonlyArrayDyn<'_, f32>,
    lr: f32,
    qas: bool,
    momentum: f32,
    momentum_buf: Option<PyReadwriteArrayDyn<'_, f32>>,
) -> PyResult<()> {
    let cfg = SgdConfig { lr, momentum, qas };
    let (sd, gd) = (data(&weight_scale), data(&grad_b));
    let b = bias
        .as_slice_mut()
        .map_err(|_| bad("bias must be C-contiguous (it is updated in place)".into()))?;
    let mut mb = momentum_buf;
    let mref = match mb.as_mut() {
        Some(m) => Some(
            m.as_slice_mut()
                .map_err(|_| bad("momentum_buf must be C-contiguous".into()))?,
        ),
        None => None,
    };
    qas::sgd_update_bias(b, &sd, input_scale, &gd, &cfg, mref).map_err(core_err)
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(requant_from_scale, m)?)?;
    m.add_function(wrap_pyfunction!(conv2d_forward, m)?)?;
    m.add_function(wrap_pyfunction!(conv2d_accumulate, m)?)?;
    m.add_function(wrap_pyfunction!(conv2d_backward_input, m)?)?;
    m.add_function(wrap_pyfunction!(conv2d_backward_weight, m)?)?;
    m.add_function(wrap_pyfunction!(conv2d_backward_bias, m)?)?;
    m.add_function(wrap_pyfunction!(fc_forward, m)?)?;
    m.add_function(wrap_pyfunction!(fc_accumulate, m)?)?;
    m.add_function(wrap_pyfunction!(fc_backward_input, m)?)?;
    m.add_function(wrap_pyfunction!(fc_backward_weight, m)?)?;
    m.add_function(wrap_pyfunction!(add_forward, m)?)?;
    m.add_function(wrap_pyfunction!(add_backward, m)?)?;
    m.add_function(wrap_pyfunction!(clamp_mask_backward, m)?)?;
    m.add_function(wrap_pyfunction!(global_avgpool_forward, m)?)?;
    m.add_function(wrap_pyfunction!(global_avgpool_backward, m)?)?;
    m.add_function(wrap_pyfunction!(avgpool_forward, m)?)?;
    m.add_function(wrap_pyfunction!(avgpool_backward, m)?)?;
    m.add_function(wrap_pyfunction!(maxpool_forward, m)?)?;
    m.add_function(wrap_pyfunction!(maxpool_backward, m)?)?;
    m.add_function(wrap_pyfunction!(softmax_cross_entropy, m)?)?;
    m.add_function(wrap_pyfunction!(mse, m)?)?;
    m.add_function(wrap_pyfunction!(bytes_per_weight, m)?)?;
    m.add_function(wrap_pyfunction!(sgd_update_weights, m)?)?;
    m.add_function(wrap_pyfunction!(sgd_update_bias, m)?)?;
    Ok(())
}

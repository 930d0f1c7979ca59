//! The requantization and clamping rules as Python asks them at run time (the importers fit
//! dead channels' biases with them), plus the array conversions the kernel bindings share.
//! Always compiled: unlike `kernels`, these serve the shipped package.
use std::borrow::Cow;

use numpy::ndarray::{ArrayD, IxDyn};
use numpy::{Element, IntoPyArray, PyArrayDyn, PyReadonlyArrayDyn, PyUntypedArrayMethods};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use tt_core::quant::{self, Activation, QParams, Requant, Rounding};

pub type Py1<'py, T> = PyResult<Bound<'py, PyArrayDyn<T>>>;

pub fn core_err(e: tt_core::Error) -> PyErr {
    PyValueError::new_err(e.to_string())
}

pub fn bad(msg: String) -> PyErr {
    PyValueError::new_err(msg)
}

/// The array's elements in C order, borrowed when already contiguous.
pub fn data<'a, T: Element + Copy>(a: &'a PyReadonlyArrayDyn<'_, T>) -> Cow<'a, [T]> {
    match a.as_slice() {
        Ok(s) => Cow::Borrowed(s),
        Err(_) => Cow::Owned(a.as_array().iter().copied().collect()),
    }
}

pub fn to_numpy<'py, T: Element>(py: Python<'py>, shape: &[usize], v: Vec<T>) -> Py1<'py, T> {
    let a = ArrayD::from_shape_vec(IxDyn(shape), v).map_err(|e| bad(e.to_string()))?;
    Ok(a.into_pyarray(py))
}

/// Requantization records of a conv (`fc == false`) or fc layer of a model whose rounding mode
/// is `rounding` (the model's, not the record's: see `Rounding::for_layer`).
pub fn requants(scales: &[f64], rounding: &str, fc: bool) -> PyResult<Vec<Requant>> {
    let mode = crate::engine::parse_name::<Rounding>(rounding)?.for_layer(fc);
    scales
        .iter()
        .map(|&s| {
            Requant::from_scale(s)
                .map(|r| r.with_rounding(mode))
                .map_err(core_err)
        })
        .collect()
}

pub fn qparams(scale: f32, zp: i32) -> PyResult<QParams> {
    QParams::new(scale, zp).map_err(core_err)
}

/// `[act_min, act_max]` of "none" / "relu" / "relu6" for an output quantization.
#[pyfunction]
fn activation_range(act: &str, scale: f32, zero_point: i32) -> PyResult<(i8, i8)> {
    let a = match act {
        "none" => Activation::None,
        "relu" => Activation::Relu,
        "relu6" => Activation::Relu6,
        _ => return Err(bad(format!("unknown activation {act:?}"))),
    };
    Ok(quant::activation_range(a, qparams(scale, zero_point)?))
}

/// Requantizes int32 accumulators `[..., C]` with per-channel (or one) real scales, rounding as
/// a conv layer (or, with `fully_connected`, an fc layer) of a model whose mode is `rounding`.
#[pyfunction]
#[pyo3(signature = (acc, requant_scale, out_zp, act_min=-128, act_max=127, rounding="single", fully_connected=false))]
#[allow(clippy::too_many_arguments)]
fn requantize<'py>(
    py: Python<'py>,
    acc: PyReadonlyArrayDyn<'py, i32>,
    requant_scale: PyReadonlyArrayDyn<'py, f64>,
    out_zp: i32,
    act_min: i8,
    act_max: i8,
    rounding: &str,
    fully_connected: bool,
) -> Py1<'py, i8> {
    let shape = acc.shape().to_vec();
    let c = *shape
        .last()
        .ok_or_else(|| bad("requantize: scalar input".into()))?;
    let rq = requants(&data(&requant_scale), rounding, fully_connected)?;
    let a = data(&acc);
    let mut out = vec![0i8; a.len()];
    if !a.is_empty() {
        quant::requantize(&a, c, &rq, out_zp, act_min, act_max, &mut out).map_err(core_err)?;
    }
    to_numpy(py, &shape, out)
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(activation_range, m)?)?;
    m.add_function(wrap_pyfunction!(requantize, m)?)?;
    Ok(())
}

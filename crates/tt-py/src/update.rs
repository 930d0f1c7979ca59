//! Bindings of the fleet update blob (tt_core::update): read a blob against a plan into numpy
//! arrays, write one from arrays, and export / apply one on a running `Session`. The format and
//! every check live in tt-core; here are conversions only.
use numpy::{IntoPyArray, PyReadonlyArray1};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::PyBytes;
use tt_core::plan::PlanView;
use tt_core::update::{self, DType, ParamKind, Section};
use tt_core::Error;

use crate::engine::{core_err, Session};

/// (layer index, "weight" | "bias", OHWI shape, fully connected) of one section.
type Layout = (u16, &'static str, [usize; 4], bool);

/// (plan tag, sample count, [(layout, flat values)]) of a blob.
type Read = (u32, u32, Vec<(Layout, PyObject)>);

fn layout(s: &Section) -> Layout {
    let kind = match s.kind {
        ParamKind::Weight => "weight",
        ParamKind::Bias => "bias",
    };
    (s.layer, kind, s.shape, s.fc)
}

fn plan_view<'p>(py: Python<'_>, plan: &'p [u8]) -> PyResult<PlanView<'p>> {
    PlanView::parse(plan).map_err(|e| core_err(py, e))
}

/// The plan's trained parameters in blob order, and the blob's size in bytes.
#[pyfunction]
fn update_layout(py: Python<'_>, plan: &[u8]) -> PyResult<(Vec<Layout>, usize)> {
    let pv = plan_view(py, plan)?;
    let secs = update::sections(&pv)
        .map(|s| s.map(|s| layout(&s)))
        .collect::<Result<Vec<_>, Error>>()
        .map_err(|e| core_err(py, e))?;
    let len = update::blob_len(&pv).map_err(|e| core_err(py, e))?;
    Ok((secs, len))
}

/// Checks `blob` against `plan`; returns (plan tag, sample count, [(layout, flat values)]) with
/// int8 weights and int32 biases as numpy arrays.
#[pyfunction]
fn update_read(py: Python<'_>, plan: &[u8], blob: &[u8]) -> PyResult<Read> {
    let pv = plan_view(py, plan)?;
    let v = update::read(&pv, blob).map_err(|e| core_err(py, e))?;
    let mut out = Vec::with_capacity(v.n_sections);
    v.for_each(&pv, |s, raw| {
        let arr: PyObject = match s.dtype {
            DType::I8 => raw
                .iter()
                .map(|&b| b as i8)
                .collect::<Vec<i8>>()
                .into_pyarray(py)
                .into_any()
                .unbind(),
            DType::I32 => raw
                .chunks_exact(4)
                .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect::<Vec<i32>>()
                .into_pyarray(py)
                .into_any()
                .unbind(),
        };
        out.push((layout(s), arr));
        Ok(())
    })
    .map_err(|e| core_err(py, e))?;
    Ok((v.plan_tag, v.sample_count, out))
}

/// The blob of the given values (one flat array per section, in blob order: int8 weights,
/// int32 biases) and sample count.
#[pyfunction]
fn update_write<'py>(
    py: Python<'py>,
    plan: &[u8],
    values: Vec<Bound<'py, PyAny>>,
    sample_count: u32,
) -> PyResult<Bound<'py, PyBytes>> {
    let pv = plan_view(py, plan)?;
    let secs = update::sections(&pv)
        .collect::<Result<Vec<_>, Error>>()
        .map_err(|e| core_err(py, e))?;
    if values.len() != secs.len() {
        return Err(PyValueError::new_err(format!(
            "update: the plan trains {} parameters, {} arrays given",
            secs.len(),
            values.len()
        )));
    }
    // A learned state holding just these values: the blob is written from it as from a device's.
    let mut state = vec![0u8; pv.state_bytes];
    for (s, v) in secs.iter().zip(values) {
        let l = pv.layer(s.layer as usize).map_err(|e| core_err(py, e))?;
        let buf = match s.kind {
            ParamKind::Weight => l.st_weight,
            ParamKind::Bias => l.st_bias,
        };
        let at = pv.buffer(buf as usize).map_err(|e| core_err(py, e))?.offset as usize;
        let bytes: Vec<u8> = match s.dtype {
            DType::I8 => {
                let a: PyReadonlyArray1<'_, i8> = v.extract()?;
                a.as_array().iter().map(|&x| x as u8).collect()
            }
            DType::I32 => {
                let a: PyReadonlyArray1<'_, i32> = v.extract()?;
                a.as_array().iter().flat_map(|x| x.to_ne_bytes()).collect()
            }
        };
        if bytes.len() != s.bytes() {
            return Err(PyValueError::new_err(format!(
                "update: layer {} {}: {} values expected, got {}",
                s.layer,
                layout(s).1,
                s.count,
                bytes.len() / s.dtype.size()
            )));
        }
        state
            .get_mut(at..at + bytes.len())
            .ok_or_else(|| {
                core_err(
                    py,
                    Error::CorruptPlan {
                        field: "buffers.offset",
                    },
                )
            })?
            .copy_from_slice(&bytes);
    }
    let mut out = vec![0u8; update::blob_len(&pv).map_err(|e| core_err(py, e))?];
    let n = update::write(&pv, &state, sample_count, &mut out).map_err(|e| core_err(py, e))?;
    Ok(PyBytes::new(py, &out[..n]))
}

/// The update blob of a session's current learned state.
#[pyfunction]
fn session_export_update<'py>(
    py: Python<'py>,
    session: &Bound<'py, Session>,
    sample_count: u32,
) -> PyResult<Bound<'py, PyBytes>> {
    let mut s = session.borrow_mut();
    let blob = s.with(py, |ex| {
        let mut out = vec![0u8; update::blob_len(ex.plan())?];
        let n = ex.write_update(sample_count, &mut out)?;
        out.truncate(n);
        Ok(out)
    })?;
    Ok(PyBytes::new(py, &blob))
}

/// Loads a blob's trained parameters into a session (all checked first); returns its sample count.
#[pyfunction]
fn session_apply_update(
    py: Python<'_>,
    session: &Bound<'_, Session>,
    blob: &[u8],
) -> PyResult<u32> {
    session.borrow_mut().with(py, |ex| ex.apply_update(blob))
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(update_layout, m)?)?;
    m.add_function(wrap_pyfunction!(update_read, m)?)?;
    m.add_function(wrap_pyfunction!(update_write, m)?)?;
    m.add_function(wrap_pyfunction!(session_export_update, m)?)?;
    m.add_function(wrap_pyfunction!(session_apply_update, m)?)?;
    Ok(())
}

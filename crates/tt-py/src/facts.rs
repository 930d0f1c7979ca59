//! The facts Python asks tt-core instead of keeping its own copy: a plan's tag and header
//! lengths, how many channels a weight ratio trains, the bounds trained values stay in, and the
//! names of the settings.
use pyo3::prelude::*;
use pyo3::types::PyTuple;
use tt_core::ir::{LossKind, Precision};
use tt_core::plan;
use tt_core::quant::Rounding;
use tt_core::sparse;

use crate::engine::core_err;

/// The identity of a plan (the CRC-32 of its header), as checkpoints and fleet updates carry it.
#[pyfunction]
fn plan_tag(py: Python<'_>, plan: &[u8]) -> PyResult<u32> {
    plan::plan_tag(plan).map_err(|e| core_err(py, e))
}

/// (plan length, parameter blob length) recorded in the header at the start of `data`.
#[pyfunction]
fn plan_lengths(py: Python<'_>, data: &[u8]) -> PyResult<(usize, usize)> {
    let l = plan::plan_lengths(data).map_err(|e| core_err(py, e))?;
    Ok((l.plan, l.params))
}

/// How many of `total` channels a weight ratio trains (what `tt.compile` trains).
#[pyfunction]
fn channels_for_ratio(total: usize, ratio: f32) -> usize {
    sparse::channels_for_ratio(total, ratio)
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(plan_tag, m)?)?;
    m.add_function(wrap_pyfunction!(plan_lengths, m)?)?;
    m.add_function(wrap_pyfunction!(channels_for_ratio, m)?)?;
    m.add("PLAN_HEADER_LEN", plan::HEADER_LEN)?;
    // Symmetric int8 weights: training saturates them to +-127, never -128.
    m.add("WEIGHT_LIMIT", i8::MAX)?;
    m.add("BIAS_LIMIT", tt_core::ops::BIAS_LIMIT)?;
    m.add("UPDATE_PRECISIONS", PyTuple::new(m.py(), Precision::NAMES)?)?;
    m.add("LOSSES", PyTuple::new(m.py(), LossKind::NAMES)?)?;
    m.add("ROUNDINGS", PyTuple::new(m.py(), Rounding::NAMES)?)?;
    Ok(())
}

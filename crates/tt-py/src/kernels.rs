//! Bindings of the individual tt-core kernels (used by the importers' reference checks and tests).
use pyo3::prelude::*;

pub fn register(_m: &Bound<'_, PyModule>) -> PyResult<()> {
    Ok(())
}

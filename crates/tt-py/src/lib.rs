//! tinytrain._core: conversion between numpy and tt-core, and errors mapped to Python.
//! No math lives here.
use pyo3::prelude::*;

mod engine;
mod facts;
#[cfg(feature = "kernels")]
mod kernels;
mod numerics;
mod update;

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    #[cfg(feature = "kernels")]
    kernels::register(m)?;
    engine::register(m)?;
    update::register(m)?;
    facts::register(m)?;
    numerics::register(m)?;
    Ok(())
}

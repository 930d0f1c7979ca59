//! tt-core: the part of tinytrain that runs on the microcontroller and on the host alike.
//!
//! The executor path (kernels, requantization, QAS, SGD update, the plan reader) needs neither
//! `alloc` nor `std`; the compiler (graph, sparse, autodiff, planner, compile) needs `alloc`. No
//! module of the first group imports one of the second (`docs/engine.md`, layering; checked by
//! `tests/layering.rs`).
#![no_std]
#![forbid(unsafe_op_in_unsafe_fn)]

#[cfg(feature = "alloc")]
extern crate alloc;
#[cfg(feature = "std")]
extern crate std;

#[cfg(feature = "alloc")]
pub mod autodiff;
#[cfg(feature = "alloc")]
pub mod compile;
pub mod crc;
pub mod error;
pub mod exec;
#[cfg(feature = "alloc")]
pub mod graph;
pub mod ir;
pub mod names;
pub mod ops;
pub mod plan;
#[cfg(feature = "alloc")]
pub mod planner;
pub mod qas;
pub mod quant;
#[cfg(feature = "alloc")]
pub mod sparse;
pub mod update;

pub use error::{Error, Result};

//! tt-core: the part of tinytrain that runs on the microcontroller and on the host alike.
//!
//! The executor path (kernels, requantization, QAS, SGD update) needs neither `alloc` nor `std`;
//! the graph, autodiff and planner need `alloc`.
#![no_std]
#![forbid(unsafe_op_in_unsafe_fn)]

#[cfg(feature = "alloc")]
extern crate alloc;
#[cfg(feature = "std")]
extern crate std;

pub mod crc;
pub mod error;
pub mod ops;
pub mod qas;
pub mod quant;

pub use error::{Error, Result};

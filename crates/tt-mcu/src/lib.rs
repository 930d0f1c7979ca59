//! no_std runtime for Cortex-M: plan and frozen weights in flash, one arena in SRAM.
//!
//! - [`trainer`]: [`trainer::Trainer`], tt-core's executor over a plan and frozen weights in flash
//!   and one arena in SRAM: `step`, `predict`, checkpoint `save` / `restore`.
//! - `bundle` (feature `host`): the plan, parameter and sample files a firmware includes, a
//!   self-contained demo bundle, and the host reference run firmware results are compared with.
//! - [`checkpoint`]: power-loss-safe A/B checkpoint of the learned parameters through
//!   embedded-storage's `NorFlash`.
//! - [`source`]: where training samples come from ([`source::SampleSource`]), with a source over
//!   samples shipped in flash and one reading an accelerometer through embedded-hal 1.0 I2C.
#![no_std]

#[cfg(feature = "host")]
pub mod bundle;
pub mod checkpoint;
pub mod source;
pub mod trainer;

//! no_std runtime for Cortex-M: plan and frozen weights in flash, one arena in SRAM.
#![no_std]

//! Quantization parameters and fixed-point requantization.

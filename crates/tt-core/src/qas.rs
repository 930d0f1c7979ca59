//! Quantization-Aware Scaling and the int8 SGD update.

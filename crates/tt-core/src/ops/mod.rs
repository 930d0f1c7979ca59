//! Int8 kernels, one file per op family: forward and backward side by side.

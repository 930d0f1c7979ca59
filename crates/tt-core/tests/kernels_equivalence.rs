//! Every kernel with a DSP path equals its portable twin (`tt_core::ops::portable`). On the host
//! the two are the same code, so this checks that the shared cases build and run; the QEMU
//! firmware `kernel_equivalence` (scripts/mcu-qemu.sh) runs the same cases on a Cortex-M4F,
//! where the dispatchers take their DSP paths.
#[path = "kernels_equivalence/cases.rs"]
mod cases;

#[test]
fn dispatchers_equal_their_portable_twins() {
    let mut buffers = Box::new(cases::Buffers::new());
    let mut families = 0;
    let result = cases::run_all(&mut buffers, 7, |kernel, n| {
        assert!(n > 0, "{kernel}: no case ran");
        families += 1;
    });
    if let Err(e) = result {
        panic!("{e}");
    }
    assert_eq!(families, 7);
}

//! Word-aligned byte storage for the tests: a parameter blob or an arena as flash and SRAM give
//! them (the executor requires 4-byte alignment).

pub fn words(bytes: &[u8]) -> Vec<u32> {
    let mut w = vec![0u32; bytes.len().div_ceil(4)];
    as_bytes_mut(&mut w)[..bytes.len()].copy_from_slice(bytes);
    w
}

pub fn as_bytes(w: &[u32]) -> &[u8] {
    // SAFETY: u8 has no alignment or validity requirements; the length covers the same bytes.
    unsafe { core::slice::from_raw_parts(w.as_ptr() as *const u8, w.len() * 4) }
}

pub fn as_bytes_mut(w: &mut [u32]) -> &mut [u8] {
    // SAFETY: as `as_bytes`.
    unsafe { core::slice::from_raw_parts_mut(w.as_mut_ptr() as *mut u8, w.len() * 4) }
}

// Shared by the targets: a `.ttp` image (plan then parameter blob) split at the plan's own
// length, and 4-byte aligned copies as flash and SRAM would give.
use tt_core::crc::crc32;
use tt_core::plan::{PlanView, HEADER_LEN};

/// Arena bytes a target hands the executor at most: a claim above this must come back
/// `OutOfMemory`, never an allocation.
pub const MAX_ARENA: usize = 1 << 16;

/// Forward multiply-accumulates a plan may claim for the targets to train and predict with it.
/// Instrumented, the 759k-MAC digits plan took 60 ms per input (80 inputs/s for the campaign);
/// the kernels' checks do not depend on size, so they are reached as well on the smaller seeds
/// (demo bundle 18k, ds_cnn 54k, the digits architecture at 8x8 19k). Plans above it are still
/// parsed, constructed and initialised.
pub const MAX_MACS: u64 = 1 << 17;

/// Forward multiply-accumulates the plan's nodes claim: per output element, one per weight of
/// its window (conv, pooling), per input element (fc) or per input pixel (global pooling), one
/// for the rest. Saturating.
pub fn forward_macs(pv: &PlanView) -> u64 {
    let mut total = 0u64;
    for i in 0..pv.n_nodes {
        let Ok(n) = pv.node(i) else { return u64::MAX };
        let (Ok(out), Ok(inp)) = (
            pv.tensor(n.output as usize),
            pv.tensor(n.inputs[0] as usize),
        ) else {
            return u64::MAX;
        };
        let per = match n.kind {
            tt_core::plan::NODE_CONV => {
                u64::from(n.win[0]) * u64::from(n.win[1]) * u64::from(inp.c / n.groups.max(1))
            }
            tt_core::plan::NODE_FC => inp.numel() as u64,
            tt_core::plan::NODE_GAP => u64::from(inp.h) * u64::from(inp.w),
            tt_core::plan::NODE_AVGPOOL | tt_core::plan::NODE_MAXPOOL => {
                u64::from(n.win[0]) * u64::from(n.win[1])
            }
            _ => 1,
        };
        total = total.saturating_add((out.numel() as u64).saturating_mul(per.max(1)));
    }
    total
}

/// The plan length the header claims (`HEADER_LEN + body_len`), clamped to the data.
pub fn split(data: &[u8]) -> (&[u8], &[u8]) {
    let body = data
        .get(8..12)
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
        .unwrap_or(0);
    let at = HEADER_LEN.saturating_add(body).min(data.len());
    data.split_at(at)
}

/// The same image with the body and parameter CRCs made to match, so mutations reach the
/// record checks and the executor instead of stopping at the CRC.
pub fn with_crcs(plan: &[u8], params: &[u8]) -> Option<Vec<u8>> {
    if plan.len() < HEADER_LEN {
        return None;
    }
    let mut p = plan.to_vec();
    let body = crc32(&p[HEADER_LEN..]);
    p[12..16].copy_from_slice(&body.to_le_bytes());
    p[16..20].copy_from_slice(&(params.len() as u32).to_le_bytes());
    p[20..24].copy_from_slice(&crc32(params).to_le_bytes());
    Some(p)
}

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

//! Memory planning: liveness over the final op order, one fixed offset per buffer in one arena,
//! and the report of where the bytes go.
//!
//! Persistent buffers (trained weights, biases, their extra precision, optimizer state) sit at the
//! bottom of the arena for the whole life of the plan. Every other buffer lives from the first op
//! that touches it to the last one (the input sample from the start of the step). Offsets are
//! packed greedily by decreasing size, each buffer into the tightest gap among the buffers whose
//! lifetimes overlap it (best fit); two orderings are tried and the smaller arena kept. The lower
//! bound of any packing is the largest sum of simultaneously live bytes.
use alloc::vec::Vec;

use crate::ir::{BufKind, Buffer, OpKind, TrainOp, NONE};

/// Every buffer starts on a 4-byte boundary (fp32 gradients and int32 biases are read in place).
pub const ALIGN: usize = 4;

pub fn aligned(bytes: usize) -> usize {
    bytes.div_ceil(ALIGN) * ALIGN
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemoryPlan {
    pub offsets: Vec<usize>,
    /// Arena size: the high-water mark of one training step.
    pub arena_bytes: usize,
    /// Bytes of persistent state at the bottom of the arena.
    pub state_bytes: usize,
    /// Largest sum of simultaneously live (aligned) bytes: no packing can beat it.
    pub lower_bound: usize,
    /// Live bytes while each op runs.
    pub live: Vec<usize>,
    /// The op where the live bytes peak.
    pub peak_op: usize,
}

/// (first, last) op touching each buffer; `None` for a buffer no op uses.
pub fn lifetimes(buffers: &[Buffer], ops: &[TrainOp]) -> Vec<Option<(usize, usize)>> {
    let mut life: Vec<Option<(usize, usize)>> = alloc::vec![None; buffers.len()];
    for (i, op) in ops.iter().enumerate() {
        // Operands of a block op are read by the op after them.
        let end = if op.kind == OpKind::BlockOperands {
            i + 1
        } else {
            i
        };
        for &b in &op.bufs {
            if b == NONE {
                continue;
            }
            if let Some(l) = life.get_mut(b as usize) {
                *l = Some(match *l {
                    None => (i, end),
                    Some((f, e)) => (f, e.max(end)),
                });
            }
        }
    }
    let last = ops.len().saturating_sub(1);
    for (b, l) in buffers.iter().zip(life.iter_mut()) {
        if b.kind.persistent() {
            *l = Some((0, last));
        } else if b.kind == BufKind::Input {
            *l = l.map(|(_, e)| (0, e));
        }
    }
    life
}

fn overlaps(a: (usize, usize), b: (usize, usize)) -> bool {
    a.0 <= b.1 && b.0 <= a.1
}

fn pack(
    buffers: &[Buffer],
    life: &[Option<(usize, usize)>],
    order: &[usize],
    base: usize,
    first_fit: bool,
) -> (Vec<usize>, usize) {
    let mut offsets = alloc::vec![0usize; buffers.len()];
    let mut placed: Vec<usize> = Vec::new();
    let mut top = base;
    for &i in order {
        let Some(li) = life[i] else { continue };
        let size = aligned(buffers[i].bytes);
        if size == 0 {
            offsets[i] = base;
            continue;
        }
        let mut busy: Vec<(usize, usize)> = placed
            .iter()
            .filter(|&&j| life[j].is_some_and(|lj| overlaps(li, lj)))
            .map(|&j| (offsets[j], offsets[j] + aligned(buffers[j].bytes)))
            .collect();
        busy.sort_unstable();
        let mut best: Option<(usize, usize)> = None; // (gap size, offset)
        let mut cursor = base;
        for &(s, e) in &busy {
            if s > cursor {
                let gap = s - cursor;
                if gap >= size && best.is_none_or(|(g, _)| !first_fit && gap < g) {
                    best = Some((gap, cursor));
                }
            }
            cursor = cursor.max(e);
        }
        let off = best.map(|(_, o)| o).unwrap_or(cursor);
        offsets[i] = off;
        top = top.max(off + size);
        placed.push(i);
    }
    (offsets, top)
}

pub fn plan(buffers: &[Buffer], ops: &[TrainOp]) -> MemoryPlan {
    let life = lifetimes(buffers, ops);
    let mut offsets = alloc::vec![0usize; buffers.len()];
    let mut state = 0;
    for (i, b) in buffers.iter().enumerate() {
        if b.kind.persistent() {
            offsets[i] = state;
            state += aligned(b.bytes);
        }
    }
    let transient: Vec<usize> = (0..buffers.len())
        .filter(|&i| !buffers[i].kind.persistent())
        .collect();
    // Greedy packings under several orders, best fit and first fit; the smallest arena wins.
    let len = |i: usize| life[i].map_or(0, |(f, l)| l - f + 1);
    let start = |i: usize| life[i].map_or(0, |(f, _)| f);
    let mut orders: Vec<Vec<usize>> = Vec::new();
    let mut o = transient.clone();
    o.sort_by_key(|&i| (core::cmp::Reverse(aligned(buffers[i].bytes)), i));
    orders.push(o);
    let mut o = transient.clone();
    o.sort_by_key(|&i| (core::cmp::Reverse(aligned(buffers[i].bytes) * len(i)), i));
    orders.push(o);
    let mut o = transient.clone();
    o.sort_by_key(|&i| (start(i), core::cmp::Reverse(aligned(buffers[i].bytes)), i));
    orders.push(o);
    let mut o = transient.clone();
    o.sort_by_key(|&i| {
        (
            core::cmp::Reverse(len(i)),
            core::cmp::Reverse(aligned(buffers[i].bytes)),
            i,
        )
    });
    orders.push(o);
    let mut best: Option<(Vec<usize>, usize)> = None;
    for order in &orders {
        for first_fit in [false, true] {
            let (o, t) = pack(buffers, &life, order, state, first_fit);
            if best.as_ref().is_none_or(|(_, bt)| t < *bt) {
                best = Some((o, t));
            }
        }
    }
    let (to, top) = best.unwrap_or_else(|| (alloc::vec![0; buffers.len()], state));
    for &i in &transient {
        offsets[i] = to[i];
    }
    measure(buffers, ops, offsets, top.max(state), state)
}

/// Liveness figures of a placement (also used to report on a plan read back from bytes).
pub fn measure(
    buffers: &[Buffer],
    ops: &[TrainOp],
    offsets: Vec<usize>,
    arena_bytes: usize,
    state_bytes: usize,
) -> MemoryPlan {
    let life = lifetimes(buffers, ops);
    let mut live = alloc::vec![state_bytes; ops.len()];
    for (i, b) in buffers.iter().enumerate() {
        if b.kind.persistent() {
            continue;
        }
        if let Some((f, l)) = life[i] {
            for v in &mut live[f..=l] {
                *v += aligned(b.bytes);
            }
        }
    }
    let (peak_op, lower_bound) = live
        .iter()
        .copied()
        .enumerate()
        .max_by_key(|&(i, v)| (v, core::cmp::Reverse(i)))
        .unwrap_or((0, state_bytes));
    MemoryPlan {
        offsets,
        arena_bytes,
        state_bytes,
        lower_bound,
        live,
        peak_op,
    }
}

/// Report categories (stable names, used by the Python API and the CLI).
pub const CATEGORIES: [&str; 8] = [
    "updated_weights",
    "precision_and_optimizer",
    "saved_activations",
    "activations",
    "gradients",
    "scratch",
    "accumulated_gradients",
    "fragmentation",
];

pub fn category(kind: BufKind) -> usize {
    use BufKind::*;
    match kind {
        StateWeight | StateBias => 0,
        StatePrecision | StateMomentum | StateRng => 1,
        Saved | Mask => 2,
        Input | Activation => 3,
        Grad | WeightGrad | BiasGrad => 4,
        Scratch => 5,
        AccumWeight | AccumBias => 6,
    }
}

/// Bytes per category live at the peak op, plus the packing overhead above the lower bound, so
/// the entries sum to the arena size.
pub fn breakdown(buffers: &[Buffer], ops: &[TrainOp], mp: &MemoryPlan) -> [usize; 8] {
    let life = lifetimes(buffers, ops);
    let mut out = [0usize; 8];
    for (b, l) in buffers.iter().zip(&life) {
        let Some((f, e)) = *l else { continue };
        if f <= mp.peak_op && mp.peak_op <= e {
            out[category(b.kind)] += aligned(b.bytes);
        }
    }
    out[7] = mp.arena_bytes - mp.lower_bound.min(mp.arena_bytes);
    out
}

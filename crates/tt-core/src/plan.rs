//! The plan format: everything the executor needs to run one training step, defined once here.
//! This module reads plans ([`PlanView`]); `compile` writes them. The records' vocabulary
//! (buffer and op kinds, precision, loss) is `ir`'s.
//!
//! A plan is a 40-byte header followed by a body; all integers little-endian.
//!
//! ```text
//! header  magic "TTPL" | version u16 | header_len u16 | body_len u32 | body_crc u32
//!         | params_len u32 | params_crc u32 | arena_bytes u32 | state_bytes u32
//!         | lower_bound u32 | flags u32 (0 in version 1)
//! body    counts: tensors, nodes, layers, buffers, ops, meta_len (u32 each)
//!         globals: input u32, output u32, loss u8, precision u8, reorder u8, momentum u8,
//!                  rng buffer u32, seed u64, peak op u32, lr f32, momentum f32
//!         tensors  16 B: c u32, h u16, w u16, scale f32, zero_point i32
//!         nodes    32 B: kind u8, act u8, arity u8, 0, in0 u32, in1 u32, out u32,
//!                        kh kw sh sw pt pl pb pr (u8), groups u32, layer u32
//!         layers   48 B: node u32, bias u8, axis u8, 0 u16, channels u32, weight/bias/scale/
//!                        requant offsets into the parameter blob (u32 x4), state buffers
//!                        weight/bias/precision/momentum_w/momentum_b (u32 x5, NONE = u32::MAX)
//!         buffers  12 B: arena offset u32, bytes u32, kind u8, 0 0 0
//!         ops      28 B: kind u8, 0 0 0, node u32, arg u32, buffers u32 x4
//!         meta     meta_len bytes of UTF-8 JSON for tools (layer names); ignored by the executor
//! ```
//!
//! Version 2 is version 1 plus the header's `flags`: bit 0 = gradient accumulation (persistent
//! `AccumWeight` / `AccumBias` buffers; `BackWeight` / `BackBias` add into them and the `Update`
//! ops, flagged `ACCUMULATE`, run only in the separate update phase). Plans without accumulation
//! are written as version 1, so readers of version 1 keep reading them.
//!
//! Version 3 is version 2 plus flags bit 1: the model requantizes as TFLite's kernels do
//! ([`Rounding::Double`]: the conv records below, and the multipliers the executor derives for
//! add and global pooling; fc records round once, [`Rounding::for_layer`]). Only such plans are written as version 3; older plans are
//! single-rounding plans, read as before, and older readers refuse version 3 instead of running
//! it with the wrong rounding.
//!
//! The parameter blob (frozen weights: flash on the MCU) holds per layer, each part 4-aligned:
//! OHWI int8 weights, int32 bias, f32 weight scales, then a [`Requant`] record (multiplier i32,
//! shift i16, rounding i16) per output channel, whose rounding field must agree with the
//! header's flag. Its length and CRC are in the header, so a plan cannot run on the wrong blob.
//!
//! [`PlanView::parse`] checks the CRC and every id, offset and length once, without allocating;
//! after that the executor can index records without further bounds worries (and still uses
//! checked access, so nothing panics even if it could not).
use crate::crc::crc32;
use crate::ir::{
    patch_axis_sums, Axis1, BufKind, ForwardMacs, LossKind, OpKind, Precision, ACCUMULATE,
    MAX_PATCH_CHAIN, MAX_PATCH_GRID, NONE,
};
use crate::ops::{MAX_DOT_LEN, MAX_POOL_LEN};
#[cfg(doc)]
use crate::quant::Requant;
use crate::quant::Rounding;
use crate::{Error, Result};

pub const MAGIC: [u8; 4] = *b"TTPL";
/// Version of plans with gradient accumulation; others are written as [`VERSION_PLAIN`].
pub const VERSION: u16 = 2;
pub const VERSION_PLAIN: u16 = 1;
/// Version of plans whose model rounds as TFLite ([`FLAG_DOUBLE_ROUNDING`]).
pub const VERSION_ROUNDING: u16 = 3;
/// Header `flags` bit: the plan accumulates gradients over a batch.
pub const FLAG_ACCUMULATE: u32 = 1;
/// Header `flags` bit (version 3): requantization uses [`Rounding::Double`].
pub const FLAG_DOUBLE_ROUNDING: u32 = 2;
pub const HEADER_LEN: usize = 40;
pub const COUNTS_LEN: usize = 24;
pub const GLOBALS_LEN: usize = 36;
pub const TENSOR_LEN: usize = 16;
pub const NODE_LEN: usize = 32;
pub const LAYER_LEN: usize = 48;
pub const BUFFER_LEN: usize = 12;
pub const OP_LEN: usize = 28;

/// The identity of a plan: the CRC-32 of its header, which holds the CRCs of the body and of the
/// parameter blob and the state size. A checkpoint or a fleet update carries it, so neither is
/// ever restored into another plan or another set of frozen weights.
pub fn plan_tag(plan: &[u8]) -> Result<u32> {
    let header = plan
        .get(..HEADER_LEN)
        .ok_or(corrupt("header (plan shorter than its header)"))?;
    Ok(crc32(header))
}

/// The lengths a plan file's header records (a `.ttp` file is the plan, then its parameters).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PlanLengths {
    /// Header and body: where the parameter blob starts.
    pub plan: usize,
    /// The parameter blob.
    pub params: usize,
}

/// Reads the lengths from the start of a plan file, checking only the header's own fields (the
/// magic and its length); [`PlanView::parse`] checks the rest.
pub fn plan_lengths(bytes: &[u8]) -> Result<PlanLengths> {
    let header = bytes
        .get(..HEADER_LEN)
        .ok_or(corrupt("header (truncated)"))?;
    if header[0..4] != MAGIC {
        return Err(corrupt("magic"));
    }
    let u32_at = |at: usize| {
        u32::from_le_bytes([header[at], header[at + 1], header[at + 2], header[at + 3]])
    };
    if u16::from_le_bytes([header[6], header[7]]) as usize != HEADER_LEN {
        return Err(corrupt("header_len"));
    }
    Ok(PlanLengths {
        plan: HEADER_LEN
            .checked_add(u32_at(8) as usize)
            .ok_or(corrupt("body_len"))?,
        params: u32_at(16) as usize,
    })
}

pub const NODE_CONV: u8 = 0;
pub const NODE_FC: u8 = 1;
pub const NODE_ADD: u8 = 2;
pub const NODE_GAP: u8 = 3;
pub const NODE_AVGPOOL: u8 = 4;
pub const NODE_MAXPOOL: u8 = 5;
pub const NODE_FLATTEN: u8 = 6;

fn corrupt(field: &'static str) -> Error {
    Error::CorruptPlan { field }
}

pub(crate) fn rd_u8(b: &[u8], at: usize, field: &'static str) -> Result<u8> {
    b.get(at).copied().ok_or(corrupt(field))
}
pub(crate) fn rd_u16(b: &[u8], at: usize, field: &'static str) -> Result<u16> {
    let s = b.get(at..at + 2).ok_or(corrupt(field))?;
    Ok(u16::from_le_bytes([s[0], s[1]]))
}
pub(crate) fn rd_u32(b: &[u8], at: usize, field: &'static str) -> Result<u32> {
    let s = b.get(at..at + 4).ok_or(corrupt(field))?;
    Ok(u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
}
fn rd_f32(b: &[u8], at: usize, field: &'static str) -> Result<f32> {
    Ok(f32::from_bits(rd_u32(b, at, field)?))
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TensorRec {
    pub c: u32,
    pub h: u16,
    pub w: u16,
    pub scale: f32,
    pub zero_point: i32,
}

impl TensorRec {
    /// Saturating: a corrupted shape must not overflow (32-bit targets), it fails a size check.
    pub fn numel(&self) -> usize {
        (self.c as usize)
            .saturating_mul(self.h as usize)
            .saturating_mul(self.w as usize)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NodeRec {
    pub kind: u8,
    pub act: u8,
    pub arity: u8,
    pub inputs: [u32; 2],
    pub output: u32,
    /// kh, kw, sh, sw, pt, pl, pb, pr
    pub win: [u8; 8],
    pub groups: u32,
    pub layer: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LayerRec {
    pub node: u32,
    pub bias: bool,
    /// 0 = output channels, 1 = input channels.
    pub axis: u8,
    pub channels: u32,
    pub weight_off: u32,
    pub bias_off: u32,
    pub scale_off: u32,
    pub requant_off: u32,
    pub st_weight: u32,
    pub st_bias: u32,
    pub st_precision: u32,
    pub st_momentum_w: u32,
    pub st_momentum_b: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BufferRec {
    pub offset: u32,
    pub bytes: u32,
    pub kind: BufKind,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OpRec {
    pub kind: OpKind,
    pub node: u32,
    pub arg: u32,
    pub bufs: [u32; 4],
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Globals {
    pub input: u32,
    pub output: u32,
    pub loss: LossKind,
    pub precision: Precision,
    pub reorder: bool,
    pub momentum_buffers: bool,
    pub rng: u32,
    pub seed: u64,
    pub peak_op: u32,
    pub lr: f32,
    pub momentum: f32,
    /// Gradient accumulation (header flag, version 2).
    pub accumulate: bool,
    /// How every requantization rounds (header flag, version 3).
    pub rounding: Rounding,
}

/// A validated, zero-copy view of plan bytes.
#[derive(Clone, Copy, Debug)]
pub struct PlanView<'a> {
    body: &'a [u8],
    /// CRC-32 of the 40-byte header, which holds the CRCs of the body and of the parameter blob:
    /// the plan's identity for checkpoints and update blobs.
    pub tag: u32,
    pub plan_len: usize,
    pub params_len: usize,
    pub params_crc: u32,
    pub arena_bytes: usize,
    pub state_bytes: usize,
    pub lower_bound: usize,
    pub n_tensors: usize,
    pub n_nodes: usize,
    pub n_layers: usize,
    pub n_buffers: usize,
    pub n_ops: usize,
    meta_len: usize,
    tensors_at: usize,
    nodes_at: usize,
    layers_at: usize,
    buffers_at: usize,
    ops_at: usize,
    meta_at: usize,
    pub globals: Globals,
}

/// Per-layer parameter sizes in the blob: (weights, out channels).
pub fn layer_param_bytes(weights: usize, out_ch: usize) -> usize {
    weights.div_ceil(4) * 4 + out_ch * (4 + 4 + 8)
}

/// Number of weights of a node, given its tensors (conv: OHWI; fc: O x I).
fn weight_count(kind: u8, win: &[u8; 8], groups: u32, inp: &TensorRec, out: &TensorRec) -> usize {
    match kind {
        NODE_CONV => {
            out.c as usize * win[0] as usize * win[1] as usize * (inp.c / groups.max(1)) as usize
        }
        _ => out.c as usize * inp.numel(),
    }
}

fn out_dim(n: u32, k: u8, s: u8, p0: u8, p1: u8) -> Option<u32> {
    let padded = n + p0 as u32 + p1 as u32;
    if k == 0 || s == 0 || padded < k as u32 {
        return None;
    }
    Some((padded - k as u32) / s as u32 + 1)
}

impl<'a> PlanView<'a> {
    /// Validates `bytes` (which may carry the parameter blob after the plan) and returns a view.
    pub fn parse(bytes: &'a [u8]) -> Result<PlanView<'a>> {
        if bytes.len() < HEADER_LEN {
            return Err(corrupt("header (truncated)"));
        }
        if bytes[0..4] != MAGIC {
            return Err(corrupt("magic"));
        }
        let version = rd_u16(bytes, 4, "version")?;
        let allowed = match version {
            VERSION_PLAIN => 0,
            VERSION => FLAG_ACCUMULATE,
            VERSION_ROUNDING => FLAG_ACCUMULATE | FLAG_DOUBLE_ROUNDING,
            _ => return Err(corrupt("version")),
        };
        let flags = rd_u32(bytes, 36, "flags")?;
        // A version 3 plan exists to say "double rounding": without the flag it is malformed.
        if flags & !allowed != 0
            || (version == VERSION_ROUNDING && flags & FLAG_DOUBLE_ROUNDING == 0)
        {
            return Err(corrupt("flags"));
        }
        if rd_u16(bytes, 6, "header_len")? as usize != HEADER_LEN {
            return Err(corrupt("header_len"));
        }
        let body_len = rd_u32(bytes, 8, "body_len")? as usize;
        let body = bytes
            .get(
                HEADER_LEN
                    ..HEADER_LEN
                        .checked_add(body_len)
                        .ok_or(corrupt("body_len"))?,
            )
            .ok_or(corrupt("body (truncated)"))?;
        if crc32(body) != rd_u32(bytes, 12, "body_crc")? {
            return Err(corrupt("body_crc"));
        }
        let arena_bytes = rd_u32(bytes, 24, "arena_bytes")? as usize;
        let state_bytes = rd_u32(bytes, 28, "state_bytes")? as usize;
        if state_bytes > arena_bytes {
            return Err(corrupt("state_bytes"));
        }
        let n = |i: usize, f| rd_u32(body, 4 * i, f).map(|v| v as usize);
        let (n_tensors, n_nodes, n_layers, n_buffers, n_ops, meta_len) = (
            n(0, "counts.tensors")?,
            n(1, "counts.nodes")?,
            n(2, "counts.layers")?,
            n(3, "counts.buffers")?,
            n(4, "counts.ops")?,
            n(5, "counts.meta")?,
        );
        let mut at = COUNTS_LEN + GLOBALS_LEN;
        let mut section = |count: usize, rec: usize, f: &'static str| -> Result<usize> {
            let start = at;
            at = count
                .checked_mul(rec)
                .and_then(|s| s.checked_add(at))
                .ok_or(corrupt(f))?;
            Ok(start)
        };
        let tensors_at = section(n_tensors, TENSOR_LEN, "counts.tensors")?;
        let nodes_at = section(n_nodes, NODE_LEN, "counts.nodes")?;
        let layers_at = section(n_layers, LAYER_LEN, "counts.layers")?;
        let buffers_at = section(n_buffers, BUFFER_LEN, "counts.buffers")?;
        let ops_at = section(n_ops, OP_LEN, "counts.ops")?;
        let meta_at = section(meta_len, 1, "counts.meta")?;
        if at != body.len() {
            return Err(corrupt("body_len (sections do not add up)"));
        }
        let g = COUNTS_LEN;
        let globals = Globals {
            input: rd_u32(body, g, "globals.input")?,
            output: rd_u32(body, g + 4, "globals.output")?,
            loss: LossKind::from_u8(rd_u8(body, g + 8, "globals.loss")?)
                .ok_or(corrupt("globals.loss"))?,
            precision: Precision::from_u8(rd_u8(body, g + 9, "globals.precision")?)
                .ok_or(corrupt("globals.precision"))?,
            reorder: rd_u8(body, g + 10, "globals.reorder")? != 0,
            momentum_buffers: rd_u8(body, g + 11, "globals.momentum")? != 0,
            rng: rd_u32(body, g + 12, "globals.rng")?,
            seed: rd_u32(body, g + 16, "globals.seed")? as u64
                | (rd_u32(body, g + 20, "globals.seed")? as u64) << 32,
            peak_op: rd_u32(body, g + 24, "globals.peak_op")?,
            lr: rd_f32(body, g + 28, "globals.lr")?,
            momentum: rd_f32(body, g + 32, "globals.momentum")?,
            accumulate: flags & FLAG_ACCUMULATE != 0,
            rounding: if flags & FLAG_DOUBLE_ROUNDING != 0 {
                Rounding::Double
            } else {
                Rounding::Single
            },
        };
        let view = PlanView {
            body,
            tag: crc32(&bytes[..HEADER_LEN]),
            plan_len: HEADER_LEN + body_len,
            params_len: rd_u32(bytes, 16, "params_len")? as usize,
            params_crc: rd_u32(bytes, 20, "params_crc")?,
            arena_bytes,
            state_bytes,
            lower_bound: rd_u32(bytes, 32, "lower_bound")? as usize,
            n_tensors,
            n_nodes,
            n_layers,
            n_buffers,
            n_ops,
            meta_len,
            tensors_at,
            nodes_at,
            layers_at,
            buffers_at,
            ops_at,
            meta_at,
            globals,
        };
        view.validate()?;
        Ok(view)
    }

    fn validate(&self) -> Result<()> {
        let gl = &self.globals;
        if gl.input as usize >= self.n_tensors || gl.output as usize >= self.n_tensors {
            return Err(corrupt("globals.input/output"));
        }
        if !(gl.lr.is_finite() && gl.momentum.is_finite()) {
            return Err(corrupt("globals.lr/momentum"));
        }
        if gl.rng != NONE && gl.rng as usize >= self.n_buffers {
            return Err(corrupt("globals.rng"));
        }
        for i in 0..self.n_tensors {
            let t = self.tensor(i)?;
            if t.numel() == 0 || !(t.scale.is_finite() && t.scale > 0.0) {
                return Err(corrupt("tensors.shape/scale"));
            }
            if !(-128..=127).contains(&t.zero_point) {
                return Err(corrupt("tensors.zero_point"));
            }
        }
        for i in 0..self.n_buffers {
            let b = self.buffer(i)?;
            let end = (b.offset as usize)
                .checked_add((b.bytes as usize).div_ceil(4) * 4)
                .ok_or(corrupt("buffers.bytes"))?;
            if b.offset % 4 != 0 || end > self.arena_bytes {
                return Err(corrupt("buffers.offset"));
            }
            if b.kind.persistent() && end > self.state_bytes {
                return Err(corrupt("buffers.state region"));
            }
        }
        let mut params_end = 0usize;
        for i in 0..self.n_nodes {
            let n = self.node(i)?;
            let arity_ok = match n.kind {
                NODE_ADD => n.arity == 2,
                NODE_CONV..=NODE_FLATTEN => n.arity == 1,
                _ => false,
            };
            if !arity_ok || n.act > 2 {
                return Err(corrupt("nodes.kind/act/arity"));
            }
            for j in 0..n.arity as usize {
                if n.inputs[j] as usize >= self.n_tensors {
                    return Err(corrupt("nodes.inputs"));
                }
            }
            if n.output as usize >= self.n_tensors {
                return Err(corrupt("nodes.output"));
            }
            let inp = self.tensor(n.inputs[0] as usize)?;
            let out = self.tensor(n.output as usize)?;
            let w = &n.win;
            let shapes_ok = match n.kind {
                NODE_CONV => {
                    n.groups > 0
                        && inp.c % n.groups == 0
                        && out.c % n.groups == 0
                        && out_dim(inp.h as u32, w[0], w[2], w[4], w[6]) == Some(out.h as u32)
                        && out_dim(inp.w as u32, w[1], w[3], w[5], w[7]) == Some(out.w as u32)
                }
                NODE_AVGPOOL | NODE_MAXPOOL => {
                    out.c == inp.c
                        && out_dim(inp.h as u32, w[0], w[2], w[4], w[6]) == Some(out.h as u32)
                        && out_dim(inp.w as u32, w[1], w[3], w[5], w[7]) == Some(out.w as u32)
                }
                NODE_FC | NODE_GAP => {
                    out.h == 1 && out.w == 1 && (n.kind == NODE_FC || out.c == inp.c)
                }
                NODE_ADD => {
                    let b = self.tensor(n.inputs[1] as usize)?;
                    inp.numel() == out.numel() && b.numel() == out.numel() && inp.c == out.c
                }
                _ => inp.numel() == out.numel(),
            };
            if !shapes_ok {
                return Err(corrupt("nodes.shape"));
            }
            // Sums no int32 accumulator can overflow (see `ops::BIAS_LIMIT`).
            let exact = match n.kind {
                NODE_CONV => {
                    w[0] as usize * w[1] as usize * (inp.c / n.groups) as usize <= MAX_DOT_LEN
                }
                NODE_FC => inp.numel() <= MAX_DOT_LEN,
                NODE_GAP => inp.h as usize * inp.w as usize <= MAX_POOL_LEN,
                _ => true,
            };
            if !exact {
                return Err(corrupt(
                    "nodes (more terms than an int32 accumulator holds exactly)",
                ));
            }
            let trainable = n.kind == NODE_CONV || n.kind == NODE_FC;
            if trainable != (n.layer != NONE) {
                return Err(corrupt("nodes.layer"));
            }
            if trainable {
                let l = self.layer(n.layer as usize)?;
                if l.node as usize != i {
                    return Err(corrupt("layers.node"));
                }
                let wn = weight_count(n.kind, w, n.groups, &inp, &out);
                let oc = out.c as usize;
                let parts = [
                    (l.weight_off, wn),
                    (l.bias_off, 4 * oc),
                    (l.scale_off, 4 * oc),
                    (l.requant_off, 8 * oc),
                ];
                for (off, len) in parts {
                    let end = (off as usize)
                        .checked_add(len)
                        .ok_or(corrupt("layers.params"))?;
                    if off % 4 != 0 || end > self.params_len {
                        return Err(corrupt("layers.params offsets"));
                    }
                    params_end = params_end.max(end);
                }
                let total = match (l.axis, n.kind) {
                    (0, _) => oc,
                    (1, NODE_FC) => inp.numel(),
                    (1, _) if n.groups == 1 => inp.c as usize,
                    _ => return Err(corrupt("layers.axis")),
                };
                if l.axis > 1 || l.channels as usize > total {
                    return Err(corrupt("layers.channels"));
                }
                for s in [
                    l.st_weight,
                    l.st_bias,
                    l.st_precision,
                    l.st_momentum_w,
                    l.st_momentum_b,
                ] {
                    if s != NONE && self.buffer(s as usize)?.kind.persistent() == false {
                        return Err(corrupt("layers.state buffers"));
                    }
                }
                if (l.channels > 0) != (l.st_weight != NONE) || l.bias != (l.st_bias != NONE) {
                    return Err(corrupt("layers.state buffers"));
                }
            }
        }
        for i in 0..self.n_layers {
            let l = self.layer(i)?;
            if l.node as usize >= self.n_nodes || self.node(l.node as usize)?.layer as usize != i {
                return Err(corrupt("layers.node"));
            }
        }
        for i in 0..self.n_ops {
            let o = self.op(i)?;
            if o.node as usize >= self.n_nodes {
                return Err(corrupt("ops.node"));
            }
            for b in o.bufs {
                if b != NONE && b as usize >= self.n_buffers {
                    return Err(corrupt("ops.buffers"));
                }
            }
            // Accumulators are written only by flagged gradient ops and read only by the update
            // phase; an accumulation plan has no in-place update.
            let flagged = o.arg & ACCUMULATE != 0;
            let grads = match o.kind {
                OpKind::BackWeight => [o.bufs[2], NONE],
                OpKind::BackBias => [o.bufs[1], NONE],
                OpKind::Update => [o.bufs[0], o.bufs[1]],
                _ => [NONE, NONE],
            };
            for b in grads {
                if b != NONE && self.buffer(b as usize)?.kind.accumulator() != flagged {
                    return Err(corrupt("ops.arg (accumulation)"));
                }
            }
            let in_place_update = matches!(o.kind, OpKind::WeightStep | OpKind::BlockBackward)
                || (o.kind == OpKind::Update && !flagged);
            if (o.kind == OpKind::Update && flagged && !gl.accumulate)
                || (gl.accumulate && in_place_update)
            {
                return Err(corrupt("ops (accumulation flag)"));
            }
        }
        if params_end > self.params_len {
            return Err(corrupt("params_len"));
        }
        Ok(())
    }

    pub fn tensor(&self, i: usize) -> Result<TensorRec> {
        if i >= self.n_tensors {
            return Err(corrupt("tensor id"));
        }
        let at = self.tensors_at + i * TENSOR_LEN;
        let b = self.body;
        Ok(TensorRec {
            c: rd_u32(b, at, "tensors.c")?,
            h: rd_u16(b, at + 4, "tensors.h")?,
            w: rd_u16(b, at + 6, "tensors.w")?,
            scale: rd_f32(b, at + 8, "tensors.scale")?,
            zero_point: rd_u32(b, at + 12, "tensors.zero_point")? as i32,
        })
    }

    pub fn node(&self, i: usize) -> Result<NodeRec> {
        if i >= self.n_nodes {
            return Err(corrupt("node id"));
        }
        let at = self.nodes_at + i * NODE_LEN;
        let b = self.body;
        let mut win = [0u8; 8];
        win.copy_from_slice(b.get(at + 16..at + 24).ok_or(corrupt("nodes.window"))?);
        Ok(NodeRec {
            kind: rd_u8(b, at, "nodes.kind")?,
            act: rd_u8(b, at + 1, "nodes.act")?,
            arity: rd_u8(b, at + 2, "nodes.arity")?,
            inputs: [
                rd_u32(b, at + 4, "nodes.in0")?,
                rd_u32(b, at + 8, "nodes.in1")?,
            ],
            output: rd_u32(b, at + 12, "nodes.out")?,
            win,
            groups: rd_u32(b, at + 24, "nodes.groups")?,
            layer: rd_u32(b, at + 28, "nodes.layer")?,
        })
    }

    pub fn layer(&self, i: usize) -> Result<LayerRec> {
        if i >= self.n_layers {
            return Err(corrupt("layer id"));
        }
        let at = self.layers_at + i * LAYER_LEN;
        let b = self.body;
        let u = |k: usize, f| rd_u32(b, at + k, f);
        Ok(LayerRec {
            node: u(0, "layers.node")?,
            bias: rd_u8(b, at + 4, "layers.bias")? != 0,
            axis: rd_u8(b, at + 5, "layers.axis")?,
            channels: u(8, "layers.channels")?,
            weight_off: u(12, "layers.weight_off")?,
            bias_off: u(16, "layers.bias_off")?,
            scale_off: u(20, "layers.scale_off")?,
            requant_off: u(24, "layers.requant_off")?,
            st_weight: u(28, "layers.state")?,
            st_bias: u(32, "layers.state")?,
            st_precision: u(36, "layers.state")?,
            st_momentum_w: u(40, "layers.state")?,
            st_momentum_b: u(44, "layers.state")?,
        })
    }

    pub fn buffer(&self, i: usize) -> Result<BufferRec> {
        if i >= self.n_buffers {
            return Err(corrupt("buffer id"));
        }
        let at = self.buffers_at + i * BUFFER_LEN;
        let b = self.body;
        Ok(BufferRec {
            offset: rd_u32(b, at, "buffers.offset")?,
            bytes: rd_u32(b, at + 4, "buffers.bytes")?,
            kind: BufKind::from_u8(rd_u8(b, at + 8, "buffers.kind")?)
                .ok_or(corrupt("buffers.kind"))?,
        })
    }

    pub fn op(&self, i: usize) -> Result<OpRec> {
        if i >= self.n_ops {
            return Err(corrupt("op id"));
        }
        let at = self.ops_at + i * OP_LEN;
        let b = self.body;
        Ok(OpRec {
            kind: OpKind::from_u8(rd_u8(b, at, "ops.kind")?).ok_or(corrupt("ops.kind"))?,
            node: rd_u32(b, at + 4, "ops.node")?,
            arg: rd_u32(b, at + 8, "ops.arg")?,
            bufs: [
                rd_u32(b, at + 12, "ops.buffers")?,
                rd_u32(b, at + 16, "ops.buffers")?,
                rd_u32(b, at + 20, "ops.buffers")?,
                rd_u32(b, at + 24, "ops.buffers")?,
            ],
        })
    }

    /// The conv chain `0..=last` a patch stage runs: each node's row and column windows, and the
    /// stage's output tensor.
    #[allow(clippy::type_complexity)]
    pub fn patch_chain(
        &self,
        last: usize,
    ) -> Result<([Axis1; MAX_PATCH_CHAIN], [Axis1; MAX_PATCH_CHAIN], u32)> {
        if last >= MAX_PATCH_CHAIN {
            return Err(corrupt("ops.arg (patch stage)"));
        }
        let mut rows = [Axis1::default(); MAX_PATCH_CHAIN];
        let mut cols = rows;
        let mut t = self.globals.input;
        for j in 0..=last {
            let n = self.node(j)?;
            if n.kind != NODE_CONV || n.inputs[0] != t {
                return Err(corrupt("ops (patch stage is not a conv chain)"));
            }
            let ti = self.tensor(t as usize)?;
            let w = n.win;
            rows[j] = Axis1 {
                k: w[0] as usize,
                s: w[2] as usize,
                p: w[4] as usize,
                n: ti.h as usize,
            };
            cols[j] = Axis1 {
                k: w[1] as usize,
                s: w[3] as usize,
                p: w[5] as usize,
                n: ti.w as usize,
            };
            t = n.output;
        }
        Ok((rows, cols, t))
    }

    /// Forward MACs of one sample as the model defines them and as this plan executes them (its
    /// patch stage recomputes halos): what a layout costs in compute, beside its peak.
    pub fn forward_macs(&self) -> Result<ForwardMacs> {
        let mut per_px = [0u64; MAX_PATCH_CHAIN];
        let mut model = 0u64;
        for i in 0..self.n_nodes {
            let n = self.node(i)?;
            if n.kind != NODE_CONV && n.kind != NODE_FC {
                continue;
            }
            let (inp, out) = (
                self.tensor(n.inputs[0] as usize)?,
                self.tensor(n.output as usize)?,
            );
            // Conv weights are per output pixel; an fc's output is one pixel.
            let w = weight_count(n.kind, &n.win, n.groups, &inp, &out) as u64;
            let px = if n.kind == NODE_CONV {
                out.h as u64 * out.w as u64
            } else {
                1
            };
            if let Some(p) = per_px.get_mut(i) {
                *p = w;
            }
            model = model.saturating_add(w.saturating_mul(px));
        }
        let mut executed = model;
        for i in 0..self.n_ops {
            let o = self.op(i)?;
            if o.kind != OpKind::PatchStage {
                continue;
            }
            let (last, grid) = ((o.arg & 0xFFFF) as usize, (o.arg >> 16) as usize);
            if grid == 0 || grid > MAX_PATCH_GRID {
                return Err(corrupt("ops.arg (patch stage)"));
            }
            let (rows, cols, out_t) = self.patch_chain(last)?;
            let out = self.tensor(out_t as usize)?;
            let mut rs = [0u64; MAX_PATCH_CHAIN];
            let mut cs = rs;
            if !patch_axis_sums(&rows[..=last], out.h as usize, grid, &mut rs)
                || !patch_axis_sums(&cols[..=last], out.w as usize, grid, &mut cs)
            {
                return Err(corrupt("nodes.window (patch stage)"));
            }
            for j in 0..=last {
                let o = self.tensor(self.node(j)?.output as usize)?;
                let once = per_px[j].saturating_mul(o.h as u64 * o.w as u64);
                let run = per_px[j].saturating_mul(rs[j].saturating_mul(cs[j]));
                executed = executed.saturating_add(run.saturating_sub(once));
            }
        }
        Ok(ForwardMacs { model, executed })
    }

    /// Tool metadata (UTF-8 JSON); the executor never reads it.
    pub fn meta(&self) -> &'a [u8] {
        self.body
            .get(self.meta_at..self.meta_at + self.meta_len)
            .unwrap_or(&[])
    }
}

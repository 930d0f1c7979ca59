//! The plan format: everything the executor needs to run one training step, defined once here.
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
use crate::ops::{MAX_DOT_LEN, MAX_POOL_LEN};
#[cfg(doc)]
use crate::quant::Requant;
use crate::quant::Rounding;
use crate::{Error, Result};

// The vocabulary of training graphs lives here, beside the format that stores it, so the
// no-alloc executor can use it; `autodiff` builds graphs from it.
pub const NONE: u32 = u32::MAX;

/// Where a buffer's bytes serve; the planner reports bytes by kind.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum BufKind {
    /// The int8 input sample.
    Input = 0,
    /// An int8 activation read only by the forward pass.
    Activation = 1,
    /// An int8 activation (or channel slice) kept for a weight gradient.
    Saved = 2,
    /// 1-bit clamp mask of a requantized output.
    Mask = 3,
    /// fp32 gradient of an activation.
    Grad = 4,
    /// fp32 gradient of the selected weights of one layer.
    WeightGrad = 5,
    /// fp32 gradient of one layer's bias.
    BiasGrad = 6,
    /// Temporary of one op.
    Scratch = 7,
    /// SRAM int8 copy of a layer's trained weights (persistent).
    StateWeight = 8,
    /// SRAM int32 copy of a layer's trained bias (persistent).
    StateBias = 9,
    /// Extra precision of trained weights: int8 residual or fp32 master (persistent).
    StatePrecision = 10,
    /// Momentum buffers (persistent).
    StateMomentum = 11,
    /// Stochastic-rounding PRNG state (persistent).
    StateRng = 12,
    /// fp32 sum of a batch's weight gradients of one layer's selected channels (persistent
    /// across the samples of a batch; accumulation plans only).
    AccumWeight = 13,
    /// fp32 sum of a batch's bias gradients of one layer (as `AccumWeight`).
    AccumBias = 14,
}

impl BufKind {
    pub fn from_u8(v: u8) -> Option<BufKind> {
        use BufKind::*;
        Some(match v {
            0 => Input,
            1 => Activation,
            2 => Saved,
            3 => Mask,
            4 => Grad,
            5 => WeightGrad,
            6 => BiasGrad,
            7 => Scratch,
            8 => StateWeight,
            9 => StateBias,
            10 => StatePrecision,
            11 => StateMomentum,
            12 => StateRng,
            13 => AccumWeight,
            14 => AccumBias,
            _ => return None,
        })
    }
    /// Persistent buffers live across steps: they are the learned state.
    pub fn persistent(self) -> bool {
        (self as u8) >= BufKind::StateWeight as u8
    }
    pub fn accumulator(self) -> bool {
        matches!(self, BufKind::AccumWeight | BufKind::AccumBias)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Buffer {
    pub kind: BufKind,
    pub bytes: usize,
    /// The node the buffer belongs to (for reports).
    pub node: u32,
}

/// Operation kinds of the training graph. Buffer slots per kind (`bufs`):
/// - `Forward`: [input0, input1 (add) | NONE, output, NONE]
/// - `SaveChannels`: [source activation, saved slice, NONE, NONE]; `node` is the consumer layer
/// - `Mask`: [output activation, mask, NONE, NONE]
/// - `Loss`: [logits, logits gradient, NONE, NONE]
/// - `ApplyMask`: [gradient (in place), mask, NONE, NONE]
/// - `BackInput`: [output grad, input grad, scratch | NONE, NONE]; `arg` = input index | ACCUMULATE
/// - `BackWeight`: [output grad, saved input, weight grad, NONE]
/// - `BackBias`: [output grad, bias grad, NONE, NONE]
/// - `Update`: [weight grad | NONE, bias grad | NONE, NONE, NONE]
///
/// In an accumulation plan `BackWeight` / `BackBias` carry `ACCUMULATE` (add into the persistent
/// accumulators) and every `Update` carries `ACCUMULATE` (it belongs to the update phase, not to
/// the per-sample pass).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum OpKind {
    Forward = 0,
    SaveChannels = 1,
    Mask = 2,
    Loss = 3,
    ApplyMask = 4,
    BackInput = 5,
    BackWeight = 6,
    BackBias = 7,
    Update = 8,
    /// Forward of a chain of convs patch by patch: [input, output, ping, pong]; `node` is the
    /// first node, `arg` = last node | grid << 16.
    PatchStage = 9,
    /// Weight gradient and SGD update fused row by row (no full gradient buffer):
    /// [output grad, saved input, row scratch, NONE].
    WeightStep = 10,
    /// Extra operands of the `BlockBackward` right after it: [pw1 mask, depthwise mask,
    /// pw1 saved input | NONE, NONE]. Its buffers live through the next op.
    BlockOperands = 11,
    /// Backward of pw1 -> depthwise -> pw2 (`node`) channel by channel of the expanded tensor,
    /// with pw1's and the depthwise conv's updates: [pw2 output grad, pw1 input grad | NONE,
    /// scratch, NONE]; `arg` = pw1 | depthwise << 12 | accumulate << 24.
    BlockBackward = 12,
}

impl OpKind {
    pub fn from_u8(v: u8) -> Option<OpKind> {
        use OpKind::*;
        Some(match v {
            0 => Forward,
            1 => SaveChannels,
            2 => Mask,
            3 => Loss,
            4 => ApplyMask,
            5 => BackInput,
            6 => BackWeight,
            7 => BackBias,
            8 => Update,
            9 => PatchStage,
            10 => WeightStep,
            11 => BlockOperands,
            12 => BlockBackward,
            _ => return None,
        })
    }
    pub fn name(self) -> &'static str {
        use OpKind::*;
        match self {
            Forward => "forward",
            SaveChannels => "save_channels",
            Mask => "mask",
            Loss => "loss",
            ApplyMask => "apply_mask",
            BackInput => "grad_input",
            BackWeight => "grad_weight",
            BackBias => "grad_bias",
            Update => "update",
            PatchStage => "patch_stage",
            WeightStep => "grad_weight_and_update",
            BlockOperands => "block_operands",
            BlockBackward => "grad_block",
        }
    }
}

/// `BackInput` / `BackWeight` / `BackBias` add into their gradient instead of overwriting it; an
/// `Update` with it runs in the update phase of an accumulation plan.
pub const ACCUMULATE: u32 = 1 << 8;
/// A depthwise `Forward` / `BackInput` whose output overwrites its input channel by channel
/// (bufs[3] / bufs[2] is the per-channel scratch).
pub const IN_PLACE: u32 = 1 << 9;

/// Longest chain a patch stage may cover.
pub const MAX_PATCH_CHAIN: usize = 32;

/// Most patches per side a patch stage may use.
pub const MAX_PATCH_GRID: usize = 256;

/// One axis of a conv window: kernel, stride, leading padding, input size.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Axis1 {
    pub k: usize,
    pub s: usize,
    pub p: usize,
    pub n: usize,
}

/// Back-propagates an output range `[o0, o1)` of the last conv of a chain to every conv's input:
/// `out[j] = (lo, hi, pad_before, pad_after)` of node j's input (clipped to the tensor, the cut
/// part becoming padding), so node j's patch output is node j+1's patch input.
pub fn patch_ranges(
    axes: &[Axis1],
    o0: usize,
    o1: usize,
    out: &mut [(usize, usize, usize, usize)],
) -> bool {
    if axes.len() > out.len() || o1 <= o0 {
        return false;
    }
    let (mut a, mut b) = (o0, o1);
    for j in (0..axes.len()).rev() {
        let ax = axes[j];
        if ax.s == 0 || ax.k == 0 {
            return false;
        }
        let start = (a * ax.s) as isize - ax.p as isize;
        let end = ((b - 1) * ax.s + ax.k) as isize - ax.p as isize;
        let lo = start.max(0) as usize;
        let hi = (end.min(ax.n as isize)).max(0) as usize;
        if hi <= lo {
            return false;
        }
        out[j] = (
            lo,
            hi,
            (lo as isize - start) as usize,
            (end - hi as isize) as usize,
        );
        a = lo;
        b = hi;
    }
    true
}

/// Bounds of patch `i` of `grid` along an axis of size `n`.
pub fn patch_bounds(n: usize, grid: usize, i: usize) -> (usize, usize) {
    (n * i / grid, n * (i + 1) / grid)
}

/// Output rows (or columns) each conv of a patch-stage chain computes along one axis, summed over
/// the grid's patches: a halo shared by two patches counts twice, as the executor computes it
/// twice. A patch's work is its rows times its columns, so a node's work over the whole grid is
/// its row sum times its column sum. False if the windows do not chain.
fn patch_axis_sums(axes: &[Axis1], out_n: usize, grid: usize, sums: &mut [u64]) -> bool {
    let mut r = [(0, 0, 0, 0); MAX_PATCH_CHAIN];
    let Some(last) = axes.len().checked_sub(1) else {
        return false;
    };
    if sums.len() < axes.len() {
        return false;
    }
    for i in 0..grid {
        let (o0, o1) = patch_bounds(out_n, grid, i);
        // The executor skips empty patches.
        if o1 <= o0 {
            continue;
        }
        if !patch_ranges(axes, o0, o1, &mut r) {
            return false;
        }
        for (j, s) in sums.iter_mut().enumerate().take(last) {
            *s += (r[j + 1].1 - r[j + 1].0) as u64;
        }
        sums[last] += (o1 - o0) as u64;
    }
    true
}

/// Forward multiply-accumulates (conv and fc weights, per sample) of a plan.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ForwardMacs {
    /// As the model defines them: every output computed once.
    pub model: u64,
    /// As the executor runs them: `model` plus the halos a patch stage recomputes.
    pub executed: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TrainOp {
    pub kind: OpKind,
    pub node: u32,
    pub arg: u32,
    pub bufs: [u32; 4],
}

/// How trained weights keep the precision int8 rounding would lose.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Precision {
    /// Stochastic rounding: no extra bytes (the paper's footprint).
    StochasticRounding = 0,
    /// An int8 residual of the low-order bits: 1 extra byte per trained weight.
    Residual = 1,
    /// An fp32 master copy: 4 extra bytes per trained weight.
    FpMaster = 2,
}

impl Precision {
    pub fn from_u8(v: u8) -> Option<Precision> {
        match v {
            0 => Some(Precision::StochasticRounding),
            1 => Some(Precision::Residual),
            2 => Some(Precision::FpMaster),
            _ => None,
        }
    }
    pub fn extra_bytes(self) -> usize {
        match self {
            Precision::StochasticRounding => 0,
            Precision::Residual => 1,
            Precision::FpMaster => 4,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum LossKind {
    CrossEntropy = 0,
    Mse = 1,
}

impl LossKind {
    pub fn from_u8(v: u8) -> Option<LossKind> {
        match v {
            0 => Some(LossKind::CrossEntropy),
            1 => Some(LossKind::Mse),
            _ => None,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CompileOptions {
    pub reorder: bool,
    pub precision: Precision,
    /// Allocate momentum buffers (needed to train with momentum > 0).
    pub momentum: bool,
    pub loss: LossKind,
    /// Gradient accumulation over a batch: persistent fp32 accumulators for the trained
    /// parameters and a separate update phase, instead of in-place per-sample updates.
    pub accumulate: bool,
}

impl Default for CompileOptions {
    fn default() -> Self {
        CompileOptions {
            reorder: true,
            precision: Precision::StochasticRounding,
            momentum: false,
            loss: LossKind::CrossEntropy,
            accumulate: false,
        }
    }
}

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

#[cfg(feature = "alloc")]
pub use encode::*;

#[cfg(feature = "alloc")]
mod encode {
    use alloc::vec::Vec;

    use super::*;
    use crate::autodiff::{CompileOptions, TrainingGraph};
    use crate::graph::{Graph, NodeKind};
    use crate::planner::MemoryPlan;
    use crate::quant::Requant;

    /// Everything besides the graph that goes into a plan.
    #[derive(Clone, Copy, Debug, PartialEq)]
    pub struct PlanSettings {
        pub options: CompileOptions,
        pub seed: u64,
        pub lr: f32,
        pub momentum: f32,
    }

    fn u8_fits(v: u16, what: &'static str) -> Result<u8> {
        u8::try_from(v).map_err(|_| Error::InvalidParameter { what })
    }

    fn u32_of(v: usize, what: &'static str) -> Result<u32> {
        u32::try_from(v).map_err(|_| Error::InvalidParameter { what })
    }

    /// The parameter blob and each layer's offsets (weight, bias, scale, requant) in it.
    pub fn encode_params(g: &Graph) -> Result<(Vec<u8>, Vec<[u32; 4]>)> {
        let mut blob = Vec::new();
        let mut offs = Vec::new();
        for (i, p) in g.params.iter().enumerate() {
            let Some(p) = p else { continue };
            let n = &g.nodes[i];
            let s_in = g.tensors[n.inputs[0]].scale as f64;
            let s_out = g.tensors[n.output].scale as f64;
            let w_off = u32_of(blob.len(), "params too large")?;
            blob.extend(p.weight.iter().map(|&v| v as u8));
            while blob.len() % 4 != 0 {
                blob.push(0);
            }
            let b_off = u32_of(blob.len(), "params too large")?;
            for &b in &p.bias {
                blob.extend_from_slice(&b.to_le_bytes());
            }
            let s_off = u32_of(blob.len(), "params too large")?;
            for &s in &p.weight_scale {
                blob.extend_from_slice(&s.to_le_bytes());
            }
            let r_off = u32_of(blob.len(), "params too large")?;
            for &s in &p.weight_scale {
                let fc = matches!(n.kind, NodeKind::Fc { .. });
                let r = Requant::from_scale(s_in * s as f64 / s_out)?
                    .with_rounding(g.rounding.for_layer(fc));
                blob.extend_from_slice(&r.multiplier.to_le_bytes());
                blob.extend_from_slice(&r.shift.to_le_bytes());
                blob.extend_from_slice(&r.rounding.to_le_bytes());
            }
            offs.push([w_off, b_off, s_off, r_off]);
        }
        Ok((blob, offs))
    }

    /// The result of compiling a graph for training.
    #[derive(Clone, Debug)]
    pub struct Compiled {
        pub plan: Vec<u8>,
        pub params: Vec<u8>,
        pub training: TrainingGraph,
        pub memory: MemoryPlan,
    }

    /// Forward graph + scheme -> training graph -> memory plan -> plan bytes, with the execution
    /// layout (patch stage, in-place depthwise) that gives the smallest peak.
    pub fn compile(
        g: &Graph,
        scheme: &crate::sparse::Scheme,
        settings: &PlanSettings,
        meta: &[u8],
    ) -> Result<Compiled> {
        compile_with(g, scheme, settings, meta, None, false, Objective::Memory)
    }

    /// Patch grids the layout search tries.
    pub const PATCH_GRIDS: [usize; 5] = [2, 3, 4, 6, 8];

    /// What the layout search minimizes. Layouts never change the numbers, only the peak and the
    /// work: a patch stage cuts the peak by recomputing halos, more of them on finer grids.
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
    pub enum Objective {
        /// The smallest peak.
        #[default]
        Memory,
        /// Spare SRAM bought back as speed: among the layouts whose peak is at most `budget`
        /// bytes, one running inverted-residual blocks' backward fused, then the fewest executed
        /// forward MACs ([`ForwardMacs::executed`]), then one running the forward out of place,
        /// then the smaller peak. What MACs do not show, measured on the Cortex-M4
        /// (ProxylessNAS-w0.3 @128, whole tensors): op by op, the backward's MACs took 83.4 M
        /// instructions per step instead of 40.8 M fused, and the in-place forward kernels (an
        /// output ring, a reversed pixel walk) 59.8 M instead of 57.3 M out of place. When no
        /// layout fits, the smallest peak (which then does not fit either).
        Compute { budget: usize },
    }

    /// A layout's rank under an objective: lower is better.
    type Rank = (bool, bool, u64, bool, usize);

    impl Objective {
        fn key(self, layout: &crate::autodiff::Layout, peak: usize, macs: u64) -> Rank {
            match self {
                Objective::Memory => (false, false, 0, false, peak),
                Objective::Compute { budget } if peak <= budget => {
                    let fused = layout.in_place || layout.fuse_blocks;
                    (false, !fused, macs, layout.in_place, peak)
                }
                Objective::Compute { .. } => (true, false, 0, false, peak),
            }
        }
    }

    /// `compile` with a given layout (`Some`), or searching for the best one under `objective`
    /// (`None`).
    pub fn compile_with(
        g: &Graph,
        scheme: &crate::sparse::Scheme,
        settings: &PlanSettings,
        meta: &[u8],
        fixed: Option<crate::autodiff::Layout>,
        stream_input: bool,
        objective: Objective,
    ) -> Result<Compiled> {
        use crate::autodiff::{build_with, patch_candidates, Layout};
        if let Some(layout) = fixed {
            let training = build_with(g, scheme, &settings.options, &layout)?;
            let memory = crate::planner::plan(&training.buffers, &training.ops);
            let (plan, params) = encode(g, &training, &memory, settings, meta)?;
            return Ok(Compiled {
                plan,
                params,
                training,
                memory,
            });
        }
        g.validate()?;
        let mut patches = alloc::vec![];
        if !stream_input {
            patches.push(None);
        }
        for &last in &patch_candidates(g, scheme)? {
            patches.extend(PATCH_GRIDS.map(|grid| Some((last, grid))));
        }
        let mut layouts = alloc::vec![];
        if !stream_input {
            layouts.push(Layout::default());
        }
        for shrink_in_place in [false, true] {
            for &patch in &patches {
                layouts.push(Layout {
                    patch,
                    in_place: true,
                    shrink_in_place,
                    stream_input,
                    ..Layout::default()
                });
            }
        }
        if let Objective::Compute { .. } = objective {
            for &patch in &patches {
                layouts.push(Layout {
                    patch,
                    fuse_blocks: true,
                    stream_input,
                    ..Layout::default()
                });
            }
        }
        let mut best: Option<(TrainingGraph, MemoryPlan, Rank)> = None;
        let mut best_layout = Layout::default();
        for layout in &layouts {
            let Ok(training) = build_with(g, scheme, &settings.options, layout) else {
                if *layout == Layout::default() {
                    // The plain layout always builds unless the graph or scheme is invalid.
                    build_with(g, scheme, &settings.options, layout)?;
                }
                continue;
            };
            let memory = crate::planner::plan(&training.buffers, &training.ops);
            // The work is read back from the encoded plan: what is chosen on is what the plan
            // reports and the executor runs.
            let macs = match objective {
                Objective::Memory => 0,
                Objective::Compute { .. } => {
                    let work = encode(g, &training, &memory, settings, meta)
                        .and_then(|(p, _)| PlanView::parse(&p).and_then(|v| v.forward_macs()));
                    // A layout that does not encode is not a candidate (as one that does not
                    // build); the chosen one is encoded again below.
                    let Ok(work) = work else {
                        continue;
                    };
                    work.executed
                }
            };
            let key = objective.key(layout, memory.arena_bytes, macs);
            if best.as_ref().is_none_or(|(_, _, k)| key < *k) {
                best = Some((training, memory, key));
                best_layout = *layout;
            }
        }
        let (mut training, mut memory, _) = best.ok_or(Error::InvalidParameter {
            what: "compile: no layout builds (a streamed input needs the first convs to form a patch stage)",
        })?;
        // In-place shrinking is a per-node trade-off: keep each such node out of place when that
        // alone lowers the peak (one greedy pass).
        let mut layout = best_layout;
        if layout.shrink_in_place {
            for (i, n) in g.nodes.iter().enumerate().take(256) {
                let shrinking = match n.kind {
                    crate::graph::NodeKind::Add { .. } => true,
                    crate::graph::NodeKind::Conv { .. } => {
                        g.tensors[n.output].numel() < g.tensors[n.inputs[0]].numel()
                    }
                    _ => false,
                };
                if !shrinking {
                    continue;
                }
                let mut trial = layout;
                trial.out_of_place[i / 64] |= 1 << (i % 64);
                let Ok(t) = build_with(g, scheme, &settings.options, &trial) else {
                    continue;
                };
                let m = crate::planner::plan(&t.buffers, &t.ops);
                if m.arena_bytes < memory.arena_bytes {
                    layout = trial;
                    training = t;
                    memory = m;
                }
            }
        }
        let (plan, params) = encode(g, &training, &memory, settings, meta)?;
        Ok(Compiled {
            plan,
            params,
            training,
            memory,
        })
    }

    /// Serializes a compiled training graph; returns (plan bytes, parameter blob).
    pub fn encode(
        g: &Graph,
        tg: &TrainingGraph,
        mp: &MemoryPlan,
        settings: &PlanSettings,
        meta: &[u8],
    ) -> Result<(Vec<u8>, Vec<u8>)> {
        let (params, poffs) = encode_params(g)?;
        let mut body = Vec::new();
        let put = |body: &mut Vec<u8>, v: u32| body.extend_from_slice(&v.to_le_bytes());
        for c in [
            g.tensors.len(),
            g.nodes.len(),
            tg.layers.len(),
            tg.buffers.len(),
            tg.ops.len(),
            meta.len(),
        ] {
            put(&mut body, u32_of(c, "plan: count too large")?);
        }
        let o = &settings.options;
        put(&mut body, g.input as u32);
        put(&mut body, g.output as u32);
        body.extend_from_slice(&[
            o.loss as u8,
            o.precision as u8,
            o.reorder as u8,
            o.momentum as u8,
        ]);
        put(&mut body, tg.rng);
        body.extend_from_slice(&settings.seed.to_le_bytes());
        put(&mut body, mp.peak_op as u32);
        body.extend_from_slice(&settings.lr.to_le_bytes());
        body.extend_from_slice(&settings.momentum.to_le_bytes());
        for t in &g.tensors {
            put(&mut body, t.c);
            for d in [t.h, t.w] {
                let d = u16::try_from(d).map_err(|_| Error::InvalidParameter {
                    what: "plan: tensor height/width above 65535",
                })?;
                body.extend_from_slice(&d.to_le_bytes());
            }
            body.extend_from_slice(&t.scale.to_le_bytes());
            body.extend_from_slice(&t.zero_point.to_le_bytes());
        }
        let mut layer_of = alloc::vec![NONE; g.nodes.len()];
        for (li, l) in tg.layers.iter().enumerate() {
            layer_of[l.node as usize] = li as u32;
        }
        for (i, n) in g.nodes.iter().enumerate() {
            let (kind, act, win, groups) = match n.kind {
                NodeKind::Conv { win, groups, act } => (NODE_CONV, act as u8, Some(win), groups),
                NodeKind::Fc { act } => (NODE_FC, act as u8, None, 1),
                NodeKind::Add { act } => (NODE_ADD, act as u8, None, 1),
                NodeKind::GlobalAvgPool => (NODE_GAP, 0, None, 1),
                NodeKind::AvgPool { win } => (NODE_AVGPOOL, 0, Some(win), 1),
                NodeKind::MaxPool { win } => (NODE_MAXPOOL, 0, Some(win), 1),
                NodeKind::Flatten => (NODE_FLATTEN, 0, None, 1),
            };
            body.extend_from_slice(&[kind, act, n.inputs.len() as u8, 0]);
            put(&mut body, n.inputs[0] as u32);
            put(&mut body, n.inputs.get(1).map_or(NONE, |&v| v as u32));
            put(&mut body, n.output as u32);
            let w = win.unwrap_or_default();
            for v in [w.kh, w.kw, w.sh, w.sw, w.pt, w.pl, w.pb, w.pr] {
                body.push(u8_fits(v, "plan: kernel/stride/padding above 255")?);
            }
            put(&mut body, groups);
            put(&mut body, layer_of[i]);
        }
        for (li, l) in tg.layers.iter().enumerate() {
            put(&mut body, l.node);
            body.extend_from_slice(&[l.sel.bias as u8, l.sel.axis as u8, 0, 0]);
            put(&mut body, u32_of(l.sel.channels, "plan: channels")?);
            for v in poffs[li] {
                put(&mut body, v);
            }
            for v in [l.weight, l.bias, l.precision, l.momentum_w, l.momentum_b] {
                put(&mut body, v);
            }
        }
        for (b, &off) in tg.buffers.iter().zip(&mp.offsets) {
            put(&mut body, u32_of(off, "plan: arena above 4 GB")?);
            put(&mut body, u32_of(b.bytes, "plan: buffer above 4 GB")?);
            body.extend_from_slice(&[b.kind as u8, 0, 0, 0]);
        }
        for op in &tg.ops {
            body.extend_from_slice(&[op.kind as u8, 0, 0, 0]);
            put(&mut body, op.node);
            put(&mut body, op.arg);
            for v in op.bufs {
                put(&mut body, v);
            }
        }
        body.extend_from_slice(meta);

        let mut out = Vec::with_capacity(HEADER_LEN + body.len());
        out.extend_from_slice(&MAGIC);
        let double = g.rounding == Rounding::Double;
        let version = match (double, o.accumulate) {
            (true, _) => VERSION_ROUNDING,
            (false, true) => VERSION,
            (false, false) => VERSION_PLAIN,
        };
        out.extend_from_slice(&version.to_le_bytes());
        out.extend_from_slice(&(HEADER_LEN as u16).to_le_bytes());
        for v in [
            u32_of(body.len(), "plan too large")?,
            crc32(&body),
            u32_of(params.len(), "params too large")?,
            crc32(&params),
            u32_of(mp.arena_bytes, "arena too large")?,
            u32_of(mp.state_bytes, "state too large")?,
            u32_of(mp.lower_bound, "arena too large")?,
            if o.accumulate { FLAG_ACCUMULATE } else { 0 }
                | if double { FLAG_DOUBLE_ROUNDING } else { 0 },
        ] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        out.extend_from_slice(&body);
        // The encoder and the reader are one definition: a plan that does not parse is a bug
        // here, reported as an error rather than shipped.
        PlanView::parse(&out)?;
        Ok((out, params))
    }
}

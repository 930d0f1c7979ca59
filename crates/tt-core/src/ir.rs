//! The training graph's vocabulary: buffers and their kinds, op kinds, the update precision, the
//! loss, the compile options and the patch-stage geometry.
//!
//! Both sides of the plan format speak it: the compiler (`autodiff`, `planner`, `compile`) builds
//! training graphs from it, and the plan reader and the no-alloc executor decode records into it.
//! It stands below both, so neither has to import the other (see `docs/engine.md`, layering).
/// "No buffer / no layer" in every buffer and layer slot.
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
pub fn patch_axis_sums(axes: &[Axis1], out_n: usize, grid: usize, sums: &mut [u64]) -> bool {
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
    /// Bytes beside the int8 weight each trained weight keeps.
    pub const fn extra_bytes(self) -> usize {
        match self {
            Precision::StochasticRounding => 0,
            Precision::Residual => 1,
            Precision::FpMaster => 4,
        }
    }
    /// Bytes of SRAM per updated weight during training: the int8 weight plus the precision's
    /// state, plus an f32 momentum buffer if momentum is used. Gradient buffers are not included
    /// (the planner schedules those).
    pub const fn bytes_per_weight(self, momentum: bool) -> usize {
        1 + self.extra_bytes() + if momentum { 4 } else { 0 }
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

#[cfg(test)]
mod tests {
    use super::Precision;

    #[test]
    fn bytes_per_updated_weight() {
        let p = [
            Precision::StochasticRounding,
            Precision::Residual,
            Precision::FpMaster,
        ];
        assert_eq!(p.map(|p| p.bytes_per_weight(false)), [1, 2, 5]);
        assert_eq!(Precision::FpMaster.bytes_per_weight(true), 9);
        for p in p {
            assert_eq!(Precision::from_u8(p as u8), Some(p));
        }
    }
}

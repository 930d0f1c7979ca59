//! The executor: runs a plan over one arena. No allocation, no panics on bad plans, the same code
//! on the host and on the microcontroller.
//!
//! ```text
//! let mut ex = Executor::new(plan_bytes, params, &mut arena)?; // validates everything once
//! ex.init()?;                                   // trained params: flash -> SRAM state
//! let loss = ex.step(&image_q, Target::Class(3))?;   // forward, loss, backward, updates
//! let class = ex.predict(&image_q)?;            // forward only, same buffers
//! let state: &[u8] = ex.state();                // learned parameters, for a checkpoint
//! ex.state_mut().copy_from_slice(&checkpoint);  // ... restored instead of init()
//! // A plan compiled with accumulation: gradients of a batch add up, one update per batch.
//! for (x, y) in batch { ex.accumulate(x, Target::Class(y))?; }
//! ex.apply_accumulated(batch.len())?;           // mean gradient, QAS SGD; accumulators zeroed
//! ```
//!
//! - `plan_bytes`: a plan as written by [`crate::plan`] (flash); `params`: the frozen parameter blob
//!   it was compiled with (flash, 4-byte aligned; its length and CRC are checked against the plan);
//! - `arena`: SRAM, 4-byte aligned, at least [`PlanView::arena_bytes`] long. The bottom
//!   `state_bytes` hold the learned state (trained int8 weights, int32 biases, residual / fp32
//!   master copies, momentum, PRNG state) and persist across steps; everything above is
//!   scratch of one step.
//! - Inputs are int8, one sample, HWC, quantized with the plan's input tensor parameters.
//!
//! [`Executor::high_water`] is the end of the highest arena byte any op touched: it equals the
//! plan's arena size when every buffer is used, which the tests assert for every plan.
//!
//! A plan compiled with a streamed input (its patch stage has no input buffer) never copies the
//! sample into the arena: the patch stage reads its regions straight from the `input` slice given
//! to `step` / `predict`, which may live anywhere (a camera frame buffer, flash).
use crate::crc::crc32;
use crate::ops::act::{clamp_mask_apply_bits, clamp_mask_pack};
use crate::ops::add::{requant_each, AddParams, AddTerms};
use crate::ops::conv::{
    conv2d_backward_bias, conv2d_backward_input, conv2d_backward_weight,
    conv2d_depthwise_in_place_plane, conv2d_forward, Conv2dGeom,
};
use crate::ops::fc::{fc_backward_bias, fc_backward_input, fc_backward_weight, fc_forward, FcGeom};
use crate::ops::loss::{mse, softmax_cross_entropy};
use crate::ops::pool::{
    avgpool_backward, avgpool_forward, global_avgpool_backward, global_avgpool_forward,
    maxpool_forward, Pool2dGeom,
};
use crate::ops::{save_input_channels, ChannelSelection, WeightShape, BIAS_LIMIT};
use crate::plan::{
    patch_bounds, patch_ranges, BufKind, LossKind, OpKind, Precision, ACCUMULATE, IN_PLACE,
    MAX_PATCH_CHAIN, MAX_PATCH_GRID, NONE,
};
use crate::plan::{
    LayerRec, NodeRec, PlanView, TensorRec, NODE_ADD, NODE_AVGPOOL, NODE_CONV, NODE_FC, NODE_GAP,
    NODE_MAXPOOL,
};
use crate::qas::{sgd_update_bias, sgd_update_weights, SgdConfig, UpdateState, XorShift32};
use crate::quant::{activation_range, Activation, QParams, Requant};
use crate::{Error, Result};

/// `carve_t` length meaning "the whole buffer".
const ALL: usize = usize::MAX;

/// What the loss compares the output with.
#[derive(Clone, Copy, Debug)]
pub enum Target<'t> {
    Class(usize),
    Values(&'t [f32]),
}

// Requant is read in place from the parameter blob: its layout must be two consecutive i32.
const _: () = assert!(core::mem::size_of::<Requant>() == 8);
const _: () = assert!(core::mem::align_of::<Requant>() == 4);
const _: () = assert!(core::mem::offset_of!(Requant, multiplier) == 0);
const _: () = assert!(core::mem::offset_of!(Requant, shift) == 4);

/// Plain-old-data types that may be viewed in place over aligned bytes (every bit pattern valid).
trait Pod: Copy {}
impl Pod for f32 {}
impl Pod for i32 {}
impl Pod for i8 {}
impl Pod for Requant {}

fn view<'b, T: Pod>(b: &'b [u8], what: &'static str) -> Result<&'b [T]> {
    // SAFETY: T is plain old data (every bit pattern is a valid T; Requant's layout is pinned by
    // the assertions above) and align_to only returns correctly aligned, in-bounds middles.
    let (pre, mid, post) = unsafe { b.align_to::<T>() };
    if !pre.is_empty() || !post.is_empty() {
        return Err(Error::InvalidParameter { what });
    }
    Ok(mid)
}

fn view_mut<'b, T: Pod>(b: &'b mut [u8], what: &'static str) -> Result<&'b mut [T]> {
    // SAFETY: as in `view`; the bytes are exclusively borrowed, so no aliasing arises.
    let (pre, mid, post) = unsafe { b.align_to_mut::<T>() };
    if !pre.is_empty() || !post.is_empty() {
        return Err(Error::InvalidParameter { what });
    }
    Ok(mid)
}

fn act_of(v: u8) -> Activation {
    match v {
        1 => Activation::Relu,
        2 => Activation::Relu6,
        _ => Activation::None,
    }
}

fn qp(t: &TensorRec) -> QParams {
    QParams {
        scale: t.scale,
        zero_point: t.zero_point,
    }
}

/// Weight access of one layer: frozen (flash), fully trained (SRAM), or split between both.
#[derive(Clone, Copy)]
enum Weights<'w> {
    Whole(&'w [i8]),
    Split {
        flash: &'w [i8],
        sram: &'w [i8],
        axis: u8,
        k: usize,
    },
}

pub struct Executor<'p, 'a> {
    plan: PlanView<'p>,
    params: &'p [u8],
    arena: &'a mut [u8],
    high_water: usize,
    /// SGD hyper-parameters; start from the plan's values, may be changed between steps.
    pub lr: f32,
    pub momentum: f32,
    /// Quantization-aware scaling of gradients (the paper's QAS); off only for ablations.
    pub qas: bool,
}

impl<'p, 'a> Executor<'p, 'a> {
    pub fn new(plan: &'p [u8], params: &'p [u8], arena: &'a mut [u8]) -> Result<Self> {
        let pv = PlanView::parse(plan)?;
        if params.len() != pv.params_len {
            return Err(Error::CorruptPlan {
                field: "params_len (parameter blob does not belong to this plan)",
            });
        }
        if crc32(params) != pv.params_crc {
            return Err(Error::CorruptPlan {
                field: "params_crc (parameter blob does not belong to this plan)",
            });
        }
        if params.as_ptr() as usize % 4 != 0 {
            return Err(Error::InvalidParameter {
                what: "executor: parameter blob must be 4-byte aligned",
            });
        }
        if arena.as_ptr() as usize % 4 != 0 {
            return Err(Error::InvalidParameter {
                what: "executor: arena must be 4-byte aligned",
            });
        }
        if arena.len() < pv.arena_bytes {
            return Err(Error::OutOfMemory {
                what: "executor arena",
                needed: pv.arena_bytes,
                available: arena.len(),
            });
        }
        let ex = Executor {
            lr: pv.globals.lr,
            momentum: pv.globals.momentum,
            qas: true,
            plan: pv,
            params,
            arena,
            high_water: 0,
        };
        // Every requantization shift must be in the range `Requant::apply` is defined for, and
        // round as the plan says.
        for li in 0..pv.n_layers {
            let l = pv.layer(li)?;
            let fc = pv.node(l.node as usize)?.kind == NODE_FC;
            let mode = pv.globals.rounding.for_layer(fc);
            let (_, _, _, rq) = ex.frozen(&l)?;
            if rq.iter().any(|r| !r.is_valid(mode)) {
                return Err(Error::CorruptPlan {
                    field: "params (requantization shift or rounding)",
                });
            }
        }
        // Frozen and initial biases within the bound that keeps int32 accumulators exact.
        for li in 0..pv.n_layers {
            let (_, bias, _, _) = ex.frozen(&pv.layer(li)?)?;
            if bias.iter().any(|b| b.unsigned_abs() > BIAS_LIMIT) {
                return Err(Error::NotRepresentable {
                    what: "params: a bias beyond +-2^30 (an int32 accumulator could overflow)",
                });
            }
        }
        Ok(ex)
    }

    pub fn plan(&self) -> &PlanView<'p> {
        &self.plan
    }

    /// Highest arena byte touched since construction (or the last [`Self::reset_high_water`]).
    pub fn high_water(&self) -> usize {
        self.high_water
    }

    pub fn reset_high_water(&mut self) {
        self.high_water = 0;
    }

    /// The learned state (persistent bottom of the arena).
    pub fn state(&self) -> &[u8] {
        &self.arena[..self.plan.state_bytes]
    }

    pub fn state_mut(&mut self) -> &mut [u8] {
        &mut self.arena[..self.plan.state_bytes]
    }

    fn range(&self, b: u32) -> Result<(usize, usize)> {
        if b == NONE {
            return Ok((0, 0));
        }
        let r = self.plan.buffer(b as usize)?;
        Ok((r.offset as usize, r.bytes as usize))
    }

    /// Disjoint mutable slices of the arena for the given buffers (NONE gives an empty slice).
    fn carve<const N: usize>(&mut self, bufs: [u32; N]) -> Result<[&mut [u8]; N]> {
        self.carve_t(bufs, [ALL; N])
    }

    /// Like `carve`, each slice cut to the bytes its tensor occupies (`ALL`: the whole buffer);
    /// a buffer shared by an in-place op can be larger than one of the tensors it holds.
    fn carve_t<const N: usize>(
        &mut self,
        bufs: [u32; N],
        lens: [usize; N],
    ) -> Result<[&mut [u8]; N]> {
        let mut ranges = [(0usize, 0usize); N];
        for ((r, &b), &want) in ranges.iter_mut().zip(&bufs).zip(&lens) {
            *r = self.range(b)?;
            if want != ALL && b != NONE {
                if want > r.1 {
                    return Err(Error::CorruptPlan {
                        field: "buffers.bytes (smaller than its tensor)",
                    });
                }
                r.1 = want;
            }
            if r.1 > 0 {
                self.high_water = self.high_water.max((r.0 + r.1).div_ceil(4) * 4);
            }
        }
        let mut order: [usize; N] = core::array::from_fn(|i| i);
        order.sort_unstable_by_key(|&i| (ranges[i].1 > 0, ranges[i].0));
        let mut out: [&mut [u8]; N] = core::array::from_fn(|_| <&mut [u8]>::default());
        let mut rest: &mut [u8] = &mut *self.arena;
        let mut base = 0usize;
        for &i in &order {
            let (off, len) = ranges[i];
            if len == 0 {
                continue;
            }
            if off < base {
                return Err(Error::CorruptPlan {
                    field: "buffers (overlapping buffers used by one op)",
                });
            }
            let r = core::mem::take(&mut rest);
            if r.len() < off - base + len {
                return Err(Error::CorruptPlan {
                    field: "buffers.offset (beyond the arena)",
                });
            }
            let (_, r) = r.split_at_mut(off - base);
            let (mine, r) = r.split_at_mut(len);
            out[i] = mine;
            rest = r;
            base = off + len;
        }
        Ok(out)
    }

    /// Frozen parameters of a layer in the blob: weights, bias, weight scales, requantization.
    #[allow(clippy::type_complexity)]
    fn frozen(&self, l: &LayerRec) -> Result<(&'p [i8], &'p [i32], &'p [f32], &'p [Requant])> {
        Self::frozen_in(&self.plan, self.params, l)
    }

    #[allow(clippy::type_complexity)]
    fn frozen_in(
        pv: &PlanView<'p>,
        params: &'p [u8],
        l: &LayerRec,
    ) -> Result<(&'p [i8], &'p [i32], &'p [f32], &'p [Requant])> {
        let n = pv.node(l.node as usize)?;
        let (inp, out) = (
            pv.tensor(n.inputs[0] as usize)?,
            pv.tensor(n.output as usize)?,
        );
        let oc = out.c as usize;
        let wn = match n.kind {
            NODE_CONV => {
                oc * n.win[0] as usize * n.win[1] as usize * (inp.c / n.groups.max(1)) as usize
            }
            _ => oc * inp.numel(),
        };
        let p: &'p [u8] = params;
        let part = |off: u32, len: usize| -> Result<&'p [u8]> {
            p.get(off as usize..off as usize + len)
                .ok_or(Error::CorruptPlan {
                    field: "layers.params offsets",
                })
        };
        Ok((
            view(part(l.weight_off, wn)?, "params: weights")?,
            view(part(l.bias_off, 4 * oc)?, "params: bias")?,
            view(part(l.scale_off, 4 * oc)?, "params: weight scales")?,
            view(part(l.requant_off, 8 * oc)?, "params: requant")?,
        ))
    }

    fn io(&self, n: &NodeRec) -> Result<(TensorRec, TensorRec)> {
        Ok((
            self.plan.tensor(n.inputs[0] as usize)?,
            self.plan.tensor(n.output as usize)?,
        ))
    }

    fn conv_geom(n: &NodeRec, inp: &TensorRec, out: &TensorRec) -> Result<Conv2dGeom> {
        let w = &n.win;
        let g = if n.kind == NODE_FC {
            Conv2dGeom::new(1, 1, inp.numel(), out.c as usize, 1, 1, 1, 1, 0, 0, 0, 0, 1)?
        } else {
            Conv2dGeom::new(
                inp.h as usize,
                inp.w as usize,
                inp.c as usize,
                out.c as usize,
                w[0] as usize,
                w[1] as usize,
                w[2] as usize,
                w[3] as usize,
                w[4] as usize,
                w[5] as usize,
                w[6] as usize,
                w[7] as usize,
                n.groups as usize,
            )?
        };
        Ok(g)
    }

    fn pool_geom(n: &NodeRec, inp: &TensorRec) -> Result<Pool2dGeom> {
        let w = &n.win;
        Pool2dGeom::new(
            inp.h as usize,
            inp.w as usize,
            inp.c as usize,
            w[0] as usize,
            w[1] as usize,
            w[2] as usize,
            w[3] as usize,
            w[4] as usize,
            w[5] as usize,
            w[6] as usize,
            w[7] as usize,
        )
    }

    /// Shape of a layer's trained weight slice as stored in SRAM (compact), with the selection
    /// that covers all of it, plus the number of weight scales that apply to it.
    fn trained_shape(g: &Conv2dGeom, l: &LayerRec) -> (WeightShape, ChannelSelection, usize) {
        let taps = g.kh * g.kw;
        let k = l.channels as usize;
        if l.axis == 0 {
            (
                WeightShape {
                    out_c: k,
                    taps,
                    in_per_group: g.in_per_group(),
                    groups: 1,
                },
                ChannelSelection::output(k),
                k,
            )
        } else {
            (
                WeightShape {
                    out_c: g.out_c,
                    taps,
                    in_per_group: k,
                    groups: 1,
                },
                ChannelSelection::input(k),
                g.out_c,
            )
        }
    }

    fn full_selection(g: &Conv2dGeom, l: &LayerRec) -> bool {
        let total = if l.axis == 0 {
            g.out_c
        } else {
            g.in_per_group()
        };
        l.channels as usize == total
    }

    /// Copies the trained parameters from the blob into the SRAM state and resets the extra
    /// precision, momentum and PRNG state: the start of training.
    pub fn init(&mut self) -> Result<()> {
        let pv = self.plan;
        // Padding between state buffers is written by nothing below; zeroing the whole region
        // makes the learned state (and so every checkpoint of it) independent of what the SRAM
        // held at boot.
        self.arena
            .get_mut(..pv.state_bytes)
            .ok_or(Error::CorruptPlan {
                field: "header.state_bytes",
            })?
            .fill(0);
        for li in 0..pv.n_layers {
            let l = pv.layer(li)?;
            let (fw, fb, _, _) = self.frozen(&l)?;
            let n = pv.node(l.node as usize)?;
            let (inp, out) = self.io(&n)?;
            let g = Self::conv_geom(&n, &inp, &out)?;
            let [w, b, p, mw, mb] = self.carve([
                l.st_weight,
                l.st_bias,
                l.st_precision,
                l.st_momentum_w,
                l.st_momentum_b,
            ])?;
            if l.st_weight != NONE {
                let w: &mut [i8] = view_mut(w, "state: weights")?;
                let (shape, _, _) = Self::trained_shape(&g, &l);
                if w.len() != shape.len() {
                    return Err(Error::CorruptPlan {
                        field: "buffers.bytes (trained weights)",
                    });
                }
                let (taps, icg) = (g.kh * g.kw, g.in_per_group());
                let cols = shape.in_per_group;
                for o in 0..shape.out_c {
                    for t in 0..taps {
                        let src = fw
                            .get((o * taps + t) * icg..(o * taps + t) * icg + cols)
                            .ok_or(Error::CorruptPlan {
                                field: "layers.channels",
                            })?;
                        w[(o * taps + t) * cols..][..cols].copy_from_slice(src);
                    }
                }
                match pv.globals.precision {
                    Precision::FpMaster => {
                        let m: &mut [f32] = view_mut(p, "state: master copy")?;
                        if m.len() != w.len() {
                            return Err(Error::CorruptPlan {
                                field: "buffers.bytes (master copy)",
                            });
                        }
                        for (d, &s) in m.iter_mut().zip(w.iter()) {
                            *d = s as f32;
                        }
                    }
                    _ => p.fill(0),
                }
            }
            if l.st_bias != NONE {
                let b: &mut [i32] = view_mut(b, "state: bias")?;
                if b.len() != fb.len() {
                    return Err(Error::CorruptPlan {
                        field: "buffers.bytes (trained bias)",
                    });
                }
                b.copy_from_slice(fb);
            }
            mw.fill(0);
            mb.fill(0);
        }
        self.reseed(pv.globals.seed)?;
        self.zero_accumulated()
    }

    /// Restarts the stochastic-rounding generator from `seed` ([`Self::init`] uses the plan's).
    /// A device rebuilt for every round of a fleet (a Flower client in a fresh process) would
    /// otherwise draw the same numbers each round, and the same small step of a weight would
    /// round the same way round after round. No effect on a plan without the generator.
    pub fn reseed(&mut self, seed: u64) -> Result<()> {
        let pv = self.plan;
        if pv.globals.rng != NONE {
            let [r] = self.carve([pv.globals.rng])?;
            let rng = XorShift32::new(seed as u32 ^ (seed >> 32) as u32);
            let bytes = rng.state.to_le_bytes();
            r.get_mut(..4)
                .ok_or(Error::CorruptPlan {
                    field: "buffers.bytes (rng)",
                })?
                .copy_from_slice(&bytes);
        }
        Ok(())
    }

    /// The current parameters of layer `li` (frozen values from flash overlaid with the trained
    /// ones from SRAM): full OHWI weights and int32 bias. For exporting or checking what training
    /// learned.
    pub fn read_layer(&mut self, li: usize, weight: &mut [i8], bias: &mut [i32]) -> Result<()> {
        let l = self.plan.layer(li)?;
        let (fw, fb, _, _) = self.frozen(&l)?;
        let n = self.plan.node(l.node as usize)?;
        let (inp, out) = self.io(&n)?;
        let g = Self::conv_geom(&n, &inp, &out)?;
        if weight.len() != fw.len() || bias.len() != fb.len() {
            return Err(Error::ShapeMismatch {
                what: "read_layer: weight/bias buffers",
                expected: fw.len(),
                actual: weight.len(),
            });
        }
        let [sw, sb] = self.carve([l.st_weight, l.st_bias])?;
        let sw: &[i8] = view(sw, "trained weights")?;
        let w = Self::weights_of_static(&l, &g, fw, sw);
        w.check(&g)?;
        let (taps, icg) = (g.kh * g.kw, g.in_per_group());
        for o in 0..g.out_c {
            for t in 0..taps {
                for i in 0..icg {
                    weight[(o * taps + t) * icg + i] = w.at(o, t, i, taps, icg);
                }
            }
        }
        if l.st_bias != NONE {
            let sb: &[i32] = view(sb, "trained bias")?;
            if sb.len() != bias.len() {
                return Err(Error::CorruptPlan {
                    field: "buffers.bytes (trained bias)",
                });
            }
            bias.copy_from_slice(sb);
        } else {
            bias.copy_from_slice(fb);
        }
        Ok(())
    }

    fn write_input(&mut self, input: &[i8]) -> Result<()> {
        let t = self.plan.tensor(self.plan.globals.input as usize)?;
        if input.len() != t.numel() {
            return Err(Error::ShapeMismatch {
                what: "executor: input sample",
                expected: t.numel(),
                actual: input.len(),
            });
        }
        // The input buffer is the one the first op reading the input tensor uses.
        for i in 0..self.plan.n_ops {
            let op = self.plan.op(i)?;
            let n = self.plan.node(op.node as usize)?;
            if op.kind == OpKind::PatchStage && op.bufs[0] == NONE {
                // A streamed input: the patch stage reads its regions from the caller's slice.
                return Ok(());
            }
            if matches!(
                op.kind,
                OpKind::Forward | OpKind::SaveChannels | OpKind::PatchStage
            ) && n.inputs[0] == self.plan.globals.input
                && op.bufs[0] != NONE
                && self.plan.buffer(op.bufs[0] as usize)?.kind == BufKind::Input
            {
                let [dst] = self.carve([op.bufs[0]])?;
                if dst.len() != input.len() {
                    return Err(Error::CorruptPlan {
                        field: "buffers.bytes (input)",
                    });
                }
                for (d, &s) in dst.iter_mut().zip(input) {
                    *d = s as u8;
                }
                return Ok(());
            }
        }
        Err(Error::CorruptPlan {
            field: "ops (nothing reads the input)",
        })
    }

    /// One training step on one sample; returns the loss. Updates are applied in place (an
    /// accumulation plan: [`Self::accumulate`] then [`Self::apply_accumulated`] with count 1).
    pub fn step(&mut self, input: &[i8], target: Target<'_>) -> Result<f32> {
        let loss = self.sample_pass(input, target)?;
        if self.plan.globals.accumulate {
            self.apply_accumulated(1)?;
        }
        Ok(loss)
    }

    /// Forward, loss and backward of one sample of a batch, adding its weight and bias gradients
    /// into the plan's accumulators; the weights do not change. Returns the loss.
    pub fn accumulate(&mut self, input: &[i8], target: Target<'_>) -> Result<f32> {
        if !self.plan.globals.accumulate {
            return Err(Error::InvalidParameter {
                what: "executor: accumulate needs a plan compiled with gradient accumulation",
            });
        }
        self.sample_pass(input, target)
    }

    /// The update phase: applies the mean of the `count` accumulated gradients (QAS SGD with the
    /// plan's update precision and momentum) and zeroes the accumulators. When any accumulated
    /// gradient is not finite, no weight changes, the accumulators are zeroed and the result is
    /// `Error::NonFinite` (the batch is skipped).
    pub fn apply_accumulated(&mut self, count: usize) -> Result<()> {
        if !self.plan.globals.accumulate {
            return Err(Error::InvalidParameter {
                what:
                    "executor: apply_accumulated needs a plan compiled with gradient accumulation",
            });
        }
        if count == 0 {
            return Err(Error::InvalidParameter {
                what: "executor: apply_accumulated over zero samples",
            });
        }
        let r = self.update_phase(1.0 / count as f32);
        let z = self.zero_accumulated();
        r.and(z)
    }

    fn update_phase(&mut self, scale: f32) -> Result<()> {
        // Every accumulator is checked before any weight moves: a skipped batch leaves them all.
        for i in 0..self.plan.n_ops {
            let op = self.plan.op(i)?;
            if op.kind == OpKind::Update && op.arg & ACCUMULATE != 0 {
                let [a, b] = self.carve([op.bufs[0], op.bufs[1]])?;
                let (a, b): (&[f32], &[f32]) = (view(a, "accumulator")?, view(b, "accumulator")?);
                if !(crate::qas::all_finite(a) && crate::qas::all_finite(b)) {
                    return Err(Error::NonFinite {
                        what: "accumulated gradients (the batch's update is skipped)",
                    });
                }
            }
        }
        for i in 0..self.plan.n_ops {
            let op = self.plan.op(i)?;
            if op.kind == OpKind::Update && op.arg & ACCUMULATE != 0 {
                let [a, b] = self.carve([op.bufs[0], op.bufs[1]])?;
                for g in view_mut::<f32>(a, "accumulator")?
                    .iter_mut()
                    .chain(view_mut::<f32>(b, "accumulator")?.iter_mut())
                {
                    *g *= scale;
                }
                self.run_op(i, op.kind, op.node, op.arg, op.bufs, Target::Class(0), &[])?;
            }
        }
        Ok(())
    }

    fn zero_accumulated(&mut self) -> Result<()> {
        for i in 0..self.plan.n_buffers {
            if self.plan.buffer(i)?.kind.accumulator() {
                let [a] = self.carve([i as u32])?;
                a.fill(0);
            }
        }
        Ok(())
    }

    /// Forward, loss, backward and the in-place updates of one sample (not the update phase of
    /// an accumulation plan).
    fn sample_pass(&mut self, input: &[i8], target: Target<'_>) -> Result<f32> {
        self.write_input(input)?;
        let mut loss = None;
        for i in 0..self.plan.n_ops {
            let op = self.plan.op(i)?;
            if op.kind == OpKind::Update && op.arg & ACCUMULATE != 0 {
                continue;
            }
            if let Some(l) = self.run_op(i, op.kind, op.node, op.arg, op.bufs, target, input)? {
                loss = Some(l);
            }
        }
        loss.ok_or(Error::CorruptPlan {
            field: "ops (no loss op)",
        })
    }

    /// Forward pass only; returns the int8 output (logits) of the sample.
    pub fn forward(&mut self, input: &[i8]) -> Result<&[i8]> {
        self.write_input(input)?;
        let mut out = NONE;
        for i in 0..self.plan.n_ops {
            let op = self.plan.op(i)?;
            if op.kind == OpKind::Forward || op.kind == OpKind::PatchStage {
                self.run_op(
                    i,
                    op.kind,
                    op.node,
                    op.arg,
                    op.bufs,
                    Target::Class(0),
                    input,
                )?;
                if self.plan.node(op.node as usize)?.output == self.plan.globals.output {
                    out = op.bufs[2];
                }
            }
        }
        if out == NONE {
            // A flatten at the very end aliases the output to an earlier buffer.
            for i in 0..self.plan.n_ops {
                let op = self.plan.op(i)?;
                if op.kind == OpKind::Loss {
                    out = op.bufs[0];
                }
            }
        }
        let (off, len) = self.range(out)?;
        let b = self.arena.get(off..off + len).ok_or(Error::CorruptPlan {
            field: "buffers.offset",
        })?;
        view(b, "output")
    }

    /// Forward pass only; returns the arg-max class.
    pub fn predict(&mut self, input: &[i8]) -> Result<usize> {
        let out = self.forward(input)?;
        let mut best = 0;
        for (i, &v) in out.iter().enumerate() {
            if v > out[best] {
                best = i;
            }
        }
        Ok(best)
    }

    #[allow(clippy::too_many_arguments)]
    fn run_op(
        &mut self,
        index: usize,
        kind: OpKind,
        node: u32,
        arg: u32,
        bufs: [u32; 4],
        target: Target<'_>,
        input: &[i8],
    ) -> Result<Option<f32>> {
        let pv = self.plan;
        let n = pv.node(node as usize)?;
        let (inp, out) = self.io(&n)?;
        let in_q = qp(&inp);
        let out_q = qp(&out);
        let (amin, amax) = activation_range(act_of(n.act), out_q);
        let (ni, no) = (inp.numel(), out.numel());
        let layer = if n.layer != NONE {
            Some(pv.layer(n.layer as usize)?)
        } else {
            None
        };
        let cfg = SgdConfig {
            lr: self.lr,
            momentum: self.momentum,
            qas: self.qas,
        };
        match kind {
            OpKind::Forward if arg & IN_PLACE != 0 && n.kind == NODE_ADD => {
                // The output overwrites input `j`, element by element.
                let j = (arg & 1) as usize;
                let b_t = pv.tensor(n.inputs[1] as usize)?;
                let p = AddParams::new(in_q, qp(&b_t), out_q, amin, amax, pv.globals.rounding)?;
                if bufs[2] != bufs[j] || bufs[0] == bufs[1] || ni != no || b_t.numel() != no {
                    return Err(Error::CorruptPlan {
                        field: "ops (in-place add)",
                    });
                }
                let other = bufs[1 - j];
                let [o, y] = self.carve_t([other, bufs[2]], [no, no])?;
                let o: &[i8] = view(o, "add input")?;
                let y: &mut [i8] = view_mut(y, "add output")?;
                let t = AddTerms::new(&p);
                // The operand order chosen once per tensor, not per element.
                if j == 1 {
                    requant_each(&p, y, |i, d| t.a(o[i]).wrapping_add(t.b(d)));
                } else {
                    requant_each(&p, y, |i, d| t.a(d).wrapping_add(t.b(o[i])));
                }
            }
            OpKind::Forward if arg & IN_PLACE != 0 => {
                let l = layer.ok_or(Error::CorruptPlan {
                    field: "nodes.layer",
                })?;
                let (fw, fb, _, rq) = self.frozen(&l)?;
                let g = Self::conv_geom(&n, &inp, &out)?;
                let pointwise = g.kh == 1
                    && g.kw == 1
                    && g.stride_h == 1
                    && g.stride_w == 1
                    && g.pad_top + g.pad_left + g.pad_bottom + g.pad_right == 0
                    && g.groups == 1;
                if n.kind != NODE_CONV
                    || !(g.is_depthwise() || pointwise)
                    || bufs[0] != bufs[2]
                    || (g.is_depthwise() && l.st_weight != NONE)
                {
                    return Err(Error::CorruptPlan {
                        field: "ops (in-place forward of this conv)",
                    });
                }
                let [buf, plane, sb, sw] =
                    self.carve([bufs[0], bufs[3], l.st_bias, l.st_weight])?;
                let bias: &[i32] = if l.st_bias != NONE {
                    view(sb, "trained bias")?
                } else {
                    fb
                };
                let buf: &mut [i8] = view_mut(buf, "in-place activation")?;
                let plane: &mut [i8] = view_mut(plane, "in-place scratch")?;
                if g.is_depthwise() {
                    conv2d_depthwise_in_place_plane(
                        &g,
                        buf,
                        in_q.zero_point,
                        fw,
                        bias,
                        rq,
                        out_q.zero_point,
                        amin,
                        amax,
                        plane,
                    )?;
                } else {
                    let w = Self::weights_of_static(&l, &g, fw, view(sw, "trained weights")?);
                    pw_forward_in_place(
                        &g,
                        buf,
                        in_q.zero_point,
                        w,
                        bias,
                        rq,
                        out_q.zero_point,
                        amin,
                        amax,
                        plane,
                    )?;
                }
            }
            OpKind::PatchStage => {
                self.patch_stage(node as usize, arg, bufs, input)?;
            }
            OpKind::BlockOperands => {}
            OpKind::BlockBackward => {
                self.block_backward(index, node as usize, arg, bufs)?;
            }
            OpKind::WeightStep => {
                let l = layer.ok_or(Error::CorruptPlan {
                    field: "nodes.layer",
                })?;
                let (_, _, ws, _) = self.frozen(&l)?;
                let g = Self::conv_geom(&n, &inp, &out)?;
                let (shape, _, rows) = Self::trained_shape(&g, &l);
                let with_m = self.momentum != 0.0;
                if with_m && !pv.globals.momentum_buffers {
                    return Err(Error::InvalidParameter {
                        what: "executor: momentum > 0 needs a plan compiled with momentum buffers",
                    });
                }
                let xc = if l.axis == 0 {
                    g.in_c
                } else {
                    l.channels as usize
                };
                let xn = g.in_h * g.in_w * xc;
                let rng_buf = pv.globals.rng;
                let [go, x, row, sw, sp, mw, rb] = self.carve_t(
                    [
                        bufs[0],
                        bufs[1],
                        bufs[2],
                        l.st_weight,
                        l.st_precision,
                        l.st_momentum_w,
                        rng_buf,
                    ],
                    [4 * no, xn, ALL, ALL, ALL, ALL, ALL],
                )?;
                let go: &[f32] = view(go, "grad out")?;
                let x: &[i8] = view(x, "saved input")?;
                let row: &mut [f32] = view_mut(row, "gradient row")?;
                let w: &mut [i8] = view_mut(sw, "trained weights")?;
                let per_row = shape.taps * shape.in_per_group;
                if go.len() != g.output_len()
                    || x.len() != xn
                    || row.len() != per_row
                    || w.len() != rows * per_row
                    || ws.len() < rows
                {
                    return Err(Error::CorruptPlan {
                        field: "buffers.bytes (weight step)",
                    });
                }
                let mut mom: &mut [f32] = if with_m {
                    view_mut(mw, "momentum")?
                } else {
                    &mut []
                };
                let prec = pv.globals.precision;
                let mut residual: &mut [i8] = &mut [];
                let mut master: &mut [f32] = &mut [];
                match prec {
                    Precision::Residual => residual = view_mut(sp, "residual")?,
                    Precision::FpMaster => master = view_mut(sp, "master copy")?,
                    Precision::StochasticRounding => {}
                }
                let mut rng = match rb.get(..4) {
                    Some(b) => XorShift32 {
                        state: u32::from_le_bytes([b[0], b[1], b[2], b[3]]),
                    },
                    None if prec == Precision::StochasticRounding => {
                        return Err(Error::CorruptPlan {
                            field: "globals.rng",
                        })
                    }
                    None => XorShift32::new(1),
                };
                let row_shape = WeightShape {
                    out_c: 1,
                    taps: shape.taps,
                    in_per_group: shape.in_per_group,
                    groups: 1,
                };
                let mut result = Ok(());
                for o in 0..rows {
                    weight_grad_row(&g, l.axis, o, go, x, xc, in_q, row);
                    let wr = &mut w[o * per_row..][..per_row];
                    let m = if with_m {
                        let (a, rest) = {
                            let k = per_row.min(mom.len());
                            core::mem::take(&mut mom).split_at_mut(k)
                        };
                        mom = rest;
                        Some(a)
                    } else {
                        None
                    };
                    let state = match prec {
                        Precision::StochasticRounding => UpdateState::StochasticRounding(&mut rng),
                        Precision::Residual => {
                            let (a, rest) = {
                                let k = per_row.min(residual.len());
                                core::mem::take(&mut residual).split_at_mut(k)
                            };
                            residual = rest;
                            UpdateState::Residual(a)
                        }
                        Precision::FpMaster => {
                            let (a, rest) = {
                                let k = per_row.min(master.len());
                                core::mem::take(&mut master).split_at_mut(k)
                            };
                            master = rest;
                            UpdateState::FpMaster(a)
                        }
                    };
                    result = sgd_update_weights(
                        wr,
                        &row_shape,
                        &ws[o..o + 1],
                        ChannelSelection::output(1),
                        row,
                        &cfg,
                        m,
                        state,
                    );
                    if result.is_err() {
                        break;
                    }
                }
                if let Some(b) = rb.get_mut(..4) {
                    b.copy_from_slice(&rng.state.to_le_bytes());
                }
                result?;
            }
            OpKind::BackInput if arg & IN_PLACE != 0 => {
                let l = layer.ok_or(Error::CorruptPlan {
                    field: "nodes.layer",
                })?;
                let (fw, _, ws, _) = self.frozen(&l)?;
                let g = Self::conv_geom(&n, &inp, &out)?;
                if n.kind != NODE_CONV || !g.is_depthwise() || bufs[0] != bufs[1] {
                    return Err(Error::CorruptPlan {
                        field: "ops (in-place gradient of a non-depthwise conv)",
                    });
                }
                let [buf, planes] = self.carve([bufs[0], bufs[2]])?;
                dw_backward_in_place(
                    &g,
                    view_mut(buf, "in-place gradient")?,
                    fw,
                    ws,
                    view_mut(planes, "plane scratch")?,
                )?;
            }
            OpKind::Forward => match n.kind {
                NODE_CONV | NODE_FC => {
                    let l = layer.ok_or(Error::CorruptPlan {
                        field: "nodes.layer",
                    })?;
                    let (fw, fb, _, rq) = self.frozen(&l)?;
                    let g = Self::conv_geom(&n, &inp, &out)?;
                    let [x, y, sw, sb] = self.carve_t(
                        [bufs[0], bufs[2], l.st_weight, l.st_bias],
                        [ni, no, ALL, ALL],
                    )?;
                    let x: &[i8] = view(x, "input")?;
                    let y: &mut [i8] = view_mut(y, "output")?;
                    let sw: &[i8] = view(sw, "trained weights")?;
                    let bias: &[i32] = if l.st_bias != NONE {
                        view(sb, "trained bias")?
                    } else {
                        fb
                    };
                    match Self::weights_of_static(&l, &g, fw, sw) {
                        Weights::Whole(w) if n.kind == NODE_FC => {
                            let fg = FcGeom::new(g.in_c, g.out_c)?;
                            fc_forward(
                                &fg,
                                x,
                                in_q.zero_point,
                                w,
                                bias,
                                rq,
                                out_q.zero_point,
                                amin,
                                amax,
                                y,
                            )?
                        }
                        Weights::Whole(w) => conv2d_forward(
                            &g,
                            x,
                            in_q.zero_point,
                            w,
                            bias,
                            rq,
                            out_q.zero_point,
                            amin,
                            amax,
                            y,
                        )?,
                        split => split_forward(
                            &g,
                            x,
                            in_q.zero_point,
                            split,
                            bias,
                            rq,
                            out_q.zero_point,
                            amin,
                            amax,
                            y,
                        )?,
                    }
                }
                NODE_ADD => {
                    let b_t = pv.tensor(n.inputs[1] as usize)?;
                    let p = AddParams::new(in_q, qp(&b_t), out_q, amin, amax, pv.globals.rounding)?;
                    if bufs[0] == bufs[1] {
                        let [a, y] = self.carve_t([bufs[0], bufs[2]], [ni, no])?;
                        let a: &[i8] = view(a, "add input")?;
                        crate::ops::add::add_forward(&p, a, a, view_mut(y, "add output")?)?;
                    } else {
                        let [a, b, y] =
                            self.carve_t([bufs[0], bufs[1], bufs[2]], [ni, b_t.numel(), no])?;
                        crate::ops::add::add_forward(
                            &p,
                            view(a, "add input a")?,
                            view(b, "add input b")?,
                            view_mut(y, "add output")?,
                        )?;
                    }
                }
                NODE_GAP => {
                    let [x, y] = self.carve_t([bufs[0], bufs[2]], [ni, no])?;
                    global_avgpool_forward(
                        inp.h as usize,
                        inp.w as usize,
                        inp.c as usize,
                        view(x, "pool input")?,
                        in_q,
                        out_q,
                        pv.globals.rounding,
                        view_mut(y, "pool output")?,
                    )?;
                }
                NODE_AVGPOOL | NODE_MAXPOOL => {
                    let g = Self::pool_geom(&n, &inp)?;
                    let [x, y] = self.carve_t([bufs[0], bufs[2]], [ni, no])?;
                    let (x, y) = (view(x, "pool input")?, view_mut(y, "pool output")?);
                    if n.kind == NODE_AVGPOOL {
                        avgpool_forward(&g, x, y)?
                    } else {
                        maxpool_forward(&g, x, y)?
                    }
                }
                _ => {
                    return Err(Error::CorruptPlan {
                        field: "ops (forward of a flatten)",
                    })
                }
            },
            OpKind::SaveChannels => {
                let l = layer.ok_or(Error::CorruptPlan {
                    field: "ops.node (save)",
                })?;
                let [x, s] = self.carve_t([bufs[0], bufs[1]], [ni, ALL])?;
                let c = if n.kind == NODE_FC {
                    inp.numel()
                } else {
                    inp.c as usize
                };
                save_input_channels(
                    view(x, "save source")?,
                    c,
                    l.channels as usize,
                    view_mut(s, "saved")?,
                )?;
            }
            OpKind::Mask => {
                let [y, m] = self.carve_t([bufs[0], bufs[1]], [no, ALL])?;
                clamp_mask_pack(view(y, "masked output")?, amin, amax, m)?;
            }
            OpKind::Loss => {
                let [y, gr] = self.carve_t([bufs[0], bufs[1]], [no, 4 * no])?;
                let y: &[i8] = view(y, "logits")?;
                let gr: &mut [f32] = view_mut(gr, "logits gradient")?;
                let l = match (LossKind::from_u8(arg as u8), target) {
                    (Some(LossKind::CrossEntropy), Target::Class(c)) => {
                        softmax_cross_entropy(y, out_q, c, gr)?
                    }
                    (Some(LossKind::Mse), Target::Values(t)) => mse(y, out_q, t, gr)?,
                    (Some(_), _) => {
                        return Err(Error::InvalidParameter {
                            what: "executor: target kind does not match the plan's loss",
                        })
                    }
                    (None, _) => {
                        return Err(Error::CorruptPlan {
                            field: "ops.arg (loss)",
                        })
                    }
                };
                return Ok(Some(l));
            }
            OpKind::ApplyMask => {
                let [gr, m] = self.carve_t([bufs[0], bufs[1]], [4 * no, ALL])?;
                clamp_mask_apply_bits(m, view_mut(gr, "gradient")?)?;
            }
            OpKind::BackInput => {
                let j = (arg & 0xFF) as usize;
                let accumulate = arg & ACCUMULATE != 0;
                if j >= n.arity as usize {
                    return Err(Error::CorruptPlan {
                        field: "ops.arg (input index)",
                    });
                }
                if n.kind == NODE_ADD {
                    let nj = pv.tensor(n.inputs[j] as usize)?.numel();
                    let [go, gi] = self.carve_t([bufs[0], bufs[1]], [4 * no, 4 * nj])?;
                    let go: &[f32] = view(go, "grad out")?;
                    let gi: &mut [f32] = view_mut(gi, "grad in")?;
                    if go.len() != gi.len() {
                        return Err(Error::ShapeMismatch {
                            what: "add backward: gradient",
                            expected: go.len(),
                            actual: gi.len(),
                        });
                    }
                    for (d, &s) in gi.iter_mut().zip(go) {
                        *d = if accumulate { *d + s } else { s };
                    }
                    return Ok(None);
                }
                if accumulate && bufs[2] == NONE {
                    return Err(Error::CorruptPlan {
                        field: "ops.buffers (scratch)",
                    });
                }
                let (fw, ws, l) = match layer {
                    Some(l) => {
                        let (fw, _, ws, _) = self.frozen(&l)?;
                        (fw, ws, Some(l))
                    }
                    None => (&[][..], &[][..], None),
                };
                let st_w = l.map_or(NONE, |l| l.st_weight);
                let [go, gi, sc, sw] = self.carve_t(
                    [bufs[0], bufs[1], bufs[2], st_w],
                    [4 * no, 4 * ni, ALL, ALL],
                )?;
                let go: &[f32] = view(go, "grad out")?;
                let gi: &mut [f32] = view_mut(gi, "grad in")?;
                let sc: &mut [f32] = view_mut(sc, "scratch")?;
                let dst: &mut [f32] = if accumulate { &mut *sc } else { &mut *gi };
                match n.kind {
                    NODE_CONV | NODE_FC => {
                        let l = l.ok_or(Error::CorruptPlan {
                            field: "nodes.layer",
                        })?;
                        let g = Self::conv_geom(&n, &inp, &out)?;
                        let sw: &[i8] = view(sw, "trained weights")?;
                        match Self::weights_of_static(&l, &g, fw, sw) {
                            Weights::Whole(w) if n.kind == NODE_FC => {
                                fc_backward_input(&FcGeom::new(g.in_c, g.out_c)?, go, w, ws, dst)?
                            }
                            Weights::Whole(w) => conv2d_backward_input(&g, go, w, ws, dst)?,
                            split => split_backward_input(&g, go, split, ws, dst)?,
                        }
                    }
                    NODE_GAP => global_avgpool_backward(
                        inp.h as usize,
                        inp.w as usize,
                        inp.c as usize,
                        go,
                        dst,
                    )?,
                    NODE_AVGPOOL => avgpool_backward(&Self::pool_geom(&n, &inp)?, go, dst)?,
                    _ => {
                        return Err(Error::CorruptPlan {
                            field: "ops.kind (no input gradient for this node)",
                        })
                    }
                }
                if accumulate {
                    if sc.len() != gi.len() {
                        return Err(Error::CorruptPlan {
                            field: "buffers.bytes (scratch)",
                        });
                    }
                    for (d, &s) in gi.iter_mut().zip(sc.iter()) {
                        *d += s;
                    }
                }
            }
            OpKind::BackWeight => {
                let l = layer.ok_or(Error::CorruptPlan {
                    field: "nodes.layer",
                })?;
                let g = Self::conv_geom(&n, &inp, &out)?;
                let (_, sel, _) = Self::trained_shape(&g, &l);
                let xn = if l.axis == 0 {
                    ni
                } else {
                    ni / g.in_c.max(1) * l.channels as usize
                };
                let [go, x, gw] = self.carve_t([bufs[0], bufs[1], bufs[2]], [4 * no, xn, ALL])?;
                let gw: &mut [f32] = view_mut(gw, "weight gradient")?;
                if arg & ACCUMULATE == 0 {
                    gw.fill(0.0);
                }
                let (go, x) = (view(go, "grad out")?, view(x, "saved input")?);
                if n.kind == NODE_FC {
                    fc_backward_weight(&FcGeom::new(g.in_c, g.out_c)?, x, in_q, go, sel, gw)?;
                } else {
                    conv2d_backward_weight(&g, x, in_q, go, sel, gw)?;
                }
            }
            OpKind::BackBias => {
                let g = Self::conv_geom(&n, &inp, &out)?;
                let [go, gb] = self.carve_t([bufs[0], bufs[1]], [4 * no, ALL])?;
                let gb: &mut [f32] = view_mut(gb, "bias gradient")?;
                if arg & ACCUMULATE == 0 {
                    gb.fill(0.0);
                }
                let go = view(go, "grad out")?;
                if n.kind == NODE_FC {
                    fc_backward_bias(&FcGeom::new(g.in_c, g.out_c)?, go, gb)?;
                } else {
                    conv2d_backward_bias(&g, go, gb)?;
                }
            }
            OpKind::Update => {
                let l = layer.ok_or(Error::CorruptPlan {
                    field: "nodes.layer",
                })?;
                let (_, _, ws, _) = self.frozen(&l)?;
                let g = Self::conv_geom(&n, &inp, &out)?;
                let rng_buf = pv.globals.rng;
                let with_m = self.momentum != 0.0;
                let [gw, gb, sw, sb, sp, mw, mb, rb] = self.carve([
                    bufs[0],
                    bufs[1],
                    l.st_weight,
                    l.st_bias,
                    l.st_precision,
                    l.st_momentum_w,
                    l.st_momentum_b,
                    if bufs[0] != NONE { rng_buf } else { NONE },
                ])?;
                if with_m && !pv.globals.momentum_buffers {
                    return Err(Error::InvalidParameter {
                        what: "executor: momentum > 0 needs a plan compiled with momentum buffers",
                    });
                }
                if bufs[0] != NONE {
                    let (shape, sel, rows) = Self::trained_shape(&g, &l);
                    let w: &mut [i8] = view_mut(sw, "trained weights")?;
                    let gw: &[f32] = view(gw, "weight gradient")?;
                    let mom: Option<&mut [f32]> = if with_m {
                        Some(view_mut(mw, "momentum")?)
                    } else {
                        None
                    };
                    let scales = ws.get(..rows).ok_or(Error::CorruptPlan {
                        field: "layers.channels",
                    })?;
                    match pv.globals.precision {
                        Precision::StochasticRounding => {
                            let rb = rb.get_mut(..4).ok_or(Error::CorruptPlan {
                                field: "buffers.bytes (rng)",
                            })?;
                            let mut rng = XorShift32 {
                                state: u32::from_le_bytes([rb[0], rb[1], rb[2], rb[3]]),
                            };
                            let r = sgd_update_weights(
                                w,
                                &shape,
                                scales,
                                sel,
                                gw,
                                &cfg,
                                mom,
                                UpdateState::StochasticRounding(&mut rng),
                            );
                            rb.copy_from_slice(&rng.state.to_le_bytes());
                            r?;
                        }
                        Precision::Residual => sgd_update_weights(
                            w,
                            &shape,
                            scales,
                            sel,
                            gw,
                            &cfg,
                            mom,
                            UpdateState::Residual(view_mut(sp, "residual")?),
                        )?,
                        Precision::FpMaster => sgd_update_weights(
                            w,
                            &shape,
                            scales,
                            sel,
                            gw,
                            &cfg,
                            mom,
                            UpdateState::FpMaster(view_mut(sp, "master copy")?),
                        )?,
                    }
                }
                if bufs[1] != NONE {
                    let b: &mut [i32] = view_mut(sb, "trained bias")?;
                    let gb: &[f32] = view(gb, "bias gradient")?;
                    let mom: Option<&mut [f32]> = if with_m {
                        Some(view_mut(mb, "momentum")?)
                    } else {
                        None
                    };
                    sgd_update_bias(b, ws, in_q.scale, gb, &cfg, mom)?;
                }
            }
        }
        Ok(None)
    }

    fn weights_of_static<'w>(
        l: &LayerRec,
        g: &Conv2dGeom,
        fw: &'w [i8],
        sram: &'w [i8],
    ) -> Weights<'w> {
        if l.st_weight == NONE {
            Weights::Whole(fw)
        } else if Self::full_selection(g, l) {
            Weights::Whole(sram)
        } else {
            Weights::Split {
                flash: fw,
                sram,
                axis: l.axis,
                k: l.channels as usize,
            }
        }
    }
}

impl Weights<'_> {
    /// Weight `(o, tap, i)` of a layer whose first `k` rows (axis 0) or columns (axis 1) are
    /// trained in SRAM; lengths are checked by the callers.
    #[inline]
    fn at(&self, o: usize, t: usize, i: usize, taps: usize, icg: usize) -> i8 {
        match *self {
            Weights::Whole(w) => w[(o * taps + t) * icg + i],
            Weights::Split {
                flash,
                sram,
                axis,
                k,
            } => {
                if axis == 0 && o < k {
                    sram[(o * taps + t) * icg + i]
                } else if axis == 1 && i < k {
                    sram[(o * taps + t) * k + i]
                } else {
                    flash[(o * taps + t) * icg + i]
                }
            }
        }
    }

    /// Column `i` of a 1x1 layer's weights (`[out_c, icg]`) for outputs `o0..o0 + out.len()`,
    /// as f32: the fused block backward stages pw2's columns this way, one strided walk per
    /// source instead of a lookup per weight (the same values as `at`). Lengths were checked by
    /// `check`.
    fn column_f32(&self, i: usize, icg: usize, o0: usize, out: &mut [f32]) {
        let walk = |w: &[i8], stride: usize, o0: usize, out: &mut [f32]| {
            // A chunk per output, its first entry: a pointer step per weight, where `step_by`
            // recomputed an index and its bound each time.
            for (d, ch) in out.iter_mut().zip(w[o0 * stride + i..].chunks(stride)) {
                *d = ch[0] as f32;
            }
        };
        match *self {
            Weights::Whole(w) => walk(w, icg, o0, out),
            Weights::Split {
                flash,
                sram,
                axis,
                k,
            } => {
                if axis == 0 {
                    // Outputs below k are trained (SRAM), the rest frozen (flash).
                    let s = k.clamp(o0, o0 + out.len()) - o0;
                    let (lo, hi) = out.split_at_mut(s);
                    if !lo.is_empty() {
                        walk(sram, icg, o0, lo);
                    }
                    if !hi.is_empty() {
                        walk(flash, icg, o0 + s, hi);
                    }
                } else if axis == 1 && i < k {
                    walk(sram, k, o0, out);
                } else {
                    walk(flash, icg, o0, out);
                }
            }
        }
    }

    /// The rows the DSP conv paths read: whole weights, or trained output channels below
    /// `k` (input-channel splits take the portable loops), for a patch that fits their staging
    /// and an int8-range zero point (so their int16 `x - zp` is the portable int32 one).
    /// Lengths were checked by `check`.
    #[cfg(all(target_arch = "arm", target_feature = "dsp", not(feature = "portable")))]
    fn dsp_rows(&self, g: &Conv2dGeom, in_zp: i32) -> Option<crate::ops::arm::Rows<'_>> {
        if g.kh * g.kw * g.in_per_group() > crate::ops::arm::PATCH_MAX
            || !(-128..=127).contains(&in_zp)
        {
            return None;
        }
        match *self {
            Weights::Whole(w) => Some(crate::ops::arm::Rows::whole(w)),
            Weights::Split {
                flash,
                sram,
                axis: 0,
                k,
            } => Some(crate::ops::arm::Rows {
                lo: sram,
                hi: flash,
                k,
            }),
            Weights::Split { .. } => None,
        }
    }

    fn check(&self, g: &Conv2dGeom) -> Result<()> {
        let full = g.weight_len();
        let (flash, sram, need) = match *self {
            Weights::Whole(w) => (w.len(), full, full),
            Weights::Split {
                flash,
                sram,
                axis,
                k,
            } => {
                let need = if axis == 0 {
                    k * g.kh * g.kw * g.in_per_group()
                } else {
                    g.out_c * g.kh * g.kw * k
                };
                (flash.len(), sram.len(), need)
            }
        };
        if flash != full || sram != need {
            return Err(Error::ShapeMismatch {
                what: "executor: split weights",
                expected: full,
                actual: flash,
            });
        }
        Ok(())
    }
}

/// Visits the valid (output pixel, tap, input pixel) triples of a conv.
fn for_each_tap(g: &Conv2dGeom, mut f: impl FnMut(usize, usize, usize)) {
    let (oh, ow) = (g.out_h(), g.out_w());
    for oy in 0..oh {
        for ox in 0..ow {
            for ky in 0..g.kh {
                let iy = (oy * g.stride_h + ky) as isize - g.pad_top as isize;
                if iy < 0 || iy >= g.in_h as isize {
                    continue;
                }
                for kx in 0..g.kw {
                    let ix = (ox * g.stride_w + kx) as isize - g.pad_left as isize;
                    if ix < 0 || ix >= g.in_w as isize {
                        continue;
                    }
                    f(
                        oy * ow + ox,
                        ky * g.kw + kx,
                        iy as usize * g.in_w + ix as usize,
                    );
                }
            }
        }
    }
}

/// Forward of a layer whose weights are partly in SRAM (a partial channel update): the same
/// arithmetic as the conv kernel, reading each weight from where it lives.
#[allow(clippy::too_many_arguments)]
fn split_forward(
    g: &Conv2dGeom,
    x: &[i8],
    in_zp: i32,
    w: Weights<'_>,
    bias: &[i32],
    rq: &[Requant],
    out_zp: i32,
    amin: i8,
    amax: i8,
    y: &mut [i8],
) -> Result<()> {
    g.validate()?;
    w.check(g)?;
    if x.len() != g.input_len()
        || y.len() != g.output_len()
        || bias.len() != g.out_c
        || rq.len() != g.out_c
    {
        return Err(Error::ShapeMismatch {
            what: "executor: split forward buffers",
            expected: g.output_len(),
            actual: y.len(),
        });
    }
    let (icg, ocg, taps, oc_n, in_c) = (
        g.in_per_group(),
        g.out_per_group(),
        g.kh * g.kw,
        g.out_c,
        g.in_c,
    );
    #[cfg(all(target_arch = "arm", target_feature = "dsp", not(feature = "portable")))]
    if let Some(rows) = w.dsp_rows(g, in_zp) {
        crate::ops::arm::conv_forward_rows(g, x, in_zp, rows, bias, rq, out_zp, amin, amax, y);
        return Ok(());
    }
    let ow = g.out_w();
    for oy in 0..g.out_h() {
        for ox in 0..ow {
            for o in 0..oc_n {
                let grp = o / ocg;
                let mut acc = bias[o];
                for ky in 0..g.kh {
                    let iy = (oy * g.stride_h + ky) as isize - g.pad_top as isize;
                    if iy < 0 || iy >= g.in_h as isize {
                        continue;
                    }
                    for kx in 0..g.kw {
                        let ix = (ox * g.stride_w + kx) as isize - g.pad_left as isize;
                        if ix < 0 || ix >= g.in_w as isize {
                            continue;
                        }
                        let ipx = iy as usize * g.in_w + ix as usize;
                        let xs = &x[ipx * in_c + grp * icg..][..icg];
                        for (i, &xv) in xs.iter().enumerate() {
                            let wv = w.at(o, ky * g.kw + kx, i, taps, icg) as i32;
                            acc = acc.wrapping_add((xv as i32 - in_zp).wrapping_mul(wv));
                        }
                    }
                }
                let v = rq[o].apply(acc).saturating_add(out_zp);
                y[(oy * ow + ox) * oc_n + o] = v.clamp(amin as i32, amax as i32) as i8;
            }
        }
    }
    Ok(())
}

fn split_backward_input(
    g: &Conv2dGeom,
    go: &[f32],
    w: Weights<'_>,
    ws: &[f32],
    gi: &mut [f32],
) -> Result<()> {
    g.validate()?;
    w.check(g)?;
    if go.len() != g.output_len() || gi.len() != g.input_len() || ws.len() != g.out_c {
        return Err(Error::ShapeMismatch {
            what: "executor: split backward buffers",
            expected: g.input_len(),
            actual: gi.len(),
        });
    }
    gi.fill(0.0);
    let (icg, ocg, taps, oc_n, in_c) = (
        g.in_per_group(),
        g.out_per_group(),
        g.kh * g.kw,
        g.out_c,
        g.in_c,
    );
    for_each_tap(g, |opx, t, ipx| {
        for o in 0..oc_n {
            let gs = go[opx * oc_n + o] * ws[o];
            if gs == 0.0 {
                continue;
            }
            let grp = o / ocg;
            let d = &mut gi[ipx * in_c + grp * icg..][..icg];
            for (i, dv) in d.iter_mut().enumerate() {
                *dv += gs * w.at(o, t, i, taps, icg) as f32;
            }
        }
    });
    Ok(())
}

impl<'p, 'a> Executor<'p, 'a> {
    /// Runs nodes `first..=last` (a chain of frozen convs) patch by patch: each output patch is
    /// computed from its receptive field, halos recomputed, through two small ping-pong buffers,
    /// so only the stage's input and output tensors are ever whole.
    fn patch_stage(&mut self, first: usize, arg: u32, bufs: [u32; 4], input: &[i8]) -> Result<()> {
        let last = (arg & 0xFFFF) as usize;
        let grid = (arg >> 16) as usize;
        let bad = |field| Error::CorruptPlan { field };
        if first != 0 || grid == 0 || grid > MAX_PATCH_GRID {
            return Err(bad("ops.arg (patch stage)"));
        }
        let pv = self.plan;
        let params = self.params;
        let (rows, cols, t) = pv.patch_chain(last)?;
        let in_t = pv.tensor(pv.globals.input as usize)?;
        let out_t = pv.tensor(t as usize)?;
        let [src, dst, a, b] = self.carve_t(bufs, [in_t.numel(), out_t.numel(), ALL, ALL])?;
        // Without an input buffer the image is streamed: regions come from the caller's sample.
        let src: &[i8] = if bufs[0] == NONE {
            input
        } else {
            view(src, "patch stage input")?
        };
        if src.len() != in_t.numel() {
            return Err(bad("buffers.bytes (patch stage input)"));
        }
        let dst: &mut [i8] = view_mut(dst, "patch stage output")?;
        let a: &mut [i8] = view_mut(a, "patch ping")?;
        let b: &mut [i8] = view_mut(b, "patch pong")?;
        let mut rr = [(0usize, 0usize, 0usize, 0usize); MAX_PATCH_CHAIN];
        let mut cr = rr;
        let (ih, iw, ic) = (in_t.h as usize, in_t.w as usize, in_t.c as usize);
        let (oh, ow, oc) = (out_t.h as usize, out_t.w as usize, out_t.c as usize);
        for py in 0..grid {
            for px in 0..grid {
                let (y0, y1) = patch_bounds(oh, grid, py);
                let (x0, x1) = patch_bounds(ow, grid, px);
                if y1 <= y0 || x1 <= x0 {
                    continue;
                }
                if !patch_ranges(&rows[..=last], y0, y1, &mut rr)
                    || !patch_ranges(&cols[..=last], x0, x1, &mut cr)
                {
                    return Err(bad("nodes.window (patch stage)"));
                }
                // The input region, made contiguous for the first conv.
                let (r0, r1, c0, c1) = (rr[0].0, rr[0].1, cr[0].0, cr[0].1);
                let rw = (c1 - c0) * ic;
                if r1 > ih || c1 > iw || (r1 - r0) * rw > a.len() {
                    return Err(bad("buffers.bytes (patch ping)"));
                }
                for y in r0..r1 {
                    let s = src
                        .get((y * iw + c0) * ic..(y * iw + c1) * ic)
                        .ok_or(bad("buffers.bytes (patch stage input)"))?;
                    a[(y - r0) * rw..][..rw].copy_from_slice(s);
                }
                let mut in_a = true;
                for j in first..=last {
                    let n = pv.node(j)?;
                    let l = pv.layer(n.layer as usize)?;
                    let (fw, fb, _, rq) = Self::frozen_in(&pv, params, &l)?;
                    let (ti, to) = (
                        pv.tensor(n.inputs[0] as usize)?,
                        pv.tensor(n.output as usize)?,
                    );
                    let (orows, ocols) = if j < last {
                        (rr[j + 1].1 - rr[j + 1].0, cr[j + 1].1 - cr[j + 1].0)
                    } else {
                        (y1 - y0, x1 - x0)
                    };
                    let w = n.win;
                    let g = Conv2dGeom::new(
                        rr[j].1 - rr[j].0,
                        cr[j].1 - cr[j].0,
                        ti.c as usize,
                        to.c as usize,
                        w[0] as usize,
                        w[1] as usize,
                        w[2] as usize,
                        w[3] as usize,
                        rr[j].2,
                        cr[j].2,
                        rr[j].3,
                        cr[j].3,
                        n.groups as usize,
                    )?;
                    if g.out_h() != orows || g.out_w() != ocols {
                        return Err(bad("nodes.window (patch stage)"));
                    }
                    let (amin, amax) = activation_range(act_of(n.act), qp(&to));
                    let (il, ol) = (g.input_len(), g.output_len());
                    let (x, y): (&[i8], &mut [i8]) = if in_a {
                        (
                            a.get(..il).ok_or(bad("buffers.bytes (patch ping)"))?,
                            b.get_mut(..ol).ok_or(bad("buffers.bytes (patch pong)"))?,
                        )
                    } else {
                        (
                            b.get(..il).ok_or(bad("buffers.bytes (patch pong)"))?,
                            a.get_mut(..ol).ok_or(bad("buffers.bytes (patch ping)"))?,
                        )
                    };
                    conv2d_forward(
                        &g,
                        x,
                        ti.zero_point,
                        fw,
                        fb,
                        rq,
                        to.zero_point,
                        amin,
                        amax,
                        y,
                    )?;
                    in_a = !in_a;
                }
                let res: &[i8] = if in_a { a } else { b };
                let rw = (x1 - x0) * oc;
                for y in y0..y1 {
                    let s = res
                        .get((y - y0) * rw..(y - y0 + 1) * rw)
                        .ok_or(bad("buffers.bytes (patch result)"))?;
                    dst.get_mut((y * ow + x0) * oc..(y * ow + x1) * oc)
                        .ok_or(bad("buffers.bytes (patch stage output)"))?
                        .copy_from_slice(s);
                }
            }
        }
        Ok(())
    }
}

/// Weights per block the fused block backward stages as f32 (1 KB of stack).
const STAGE_F32: usize = 256;

/// Depthwise taps staged as f32 for the input gradient (7x7 kernels and smaller).
const DW_STAGED_TAPS: usize = 49;

fn bit(mask: &[u8], i: usize) -> bool {
    mask[i / 8] & (1 << (i % 8)) != 0
}

/// Hands the indices of `it` to `quad` four at a time and returns the last few (up to three):
/// the fused block backward's loops then load each weight (or accumulate each row entry) once
/// per four pixels instead of once per pixel. Every pixel's sum keeps its order, so the numbers
/// are unchanged.
fn quads(it: impl Iterator<Item = usize>, mut quad: impl FnMut([usize; 4])) -> ([usize; 4], usize) {
    let mut group = [0usize; 4];
    let mut k = 0;
    for i in it {
        group[k] = i;
        k += 1;
        if k == 4 {
            quad(group);
            k = 0;
        }
    }
    (group, k)
}

/// Rows `qs` (distinct) of a row-major `[_, c]` matrix, entries `i0..i0 + n` of each.
fn rows4(a: &mut [f32], c: usize, i0: usize, n: usize, qs: [usize; 4]) -> [&mut [f32]; 4] {
    let [r0, r1, r2, r3] = a
        .get_disjoint_mut(qs.map(|q| q * c + i0..q * c + i0 + n))
        .expect("distinct rows inside the matrix");
    [r0, r1, r2, r3]
}

/// pw2's input gradient of one expanded channel at four pixels, over outputs `o0..o0 + n`.
/// No test for a zero gv: its product is a zero that leaves v as it is (v starts at +0 and never
/// becomes -0), and the branch costs more.
fn pw2_col_grad4(
    go: &[f32],
    c3: usize,
    o0: usize,
    ps: [usize; 4],
    sc: &[f32],
    st: &[f32],
    pa: &mut [f32],
) {
    let n = st.len();
    let [g0, g1, g2, g3] = ps.map(|p| &go[p * c3 + o0..][..n]);
    let mut v = ps.map(|p| pa[p]);
    let gs = g0.iter().zip(g1).zip(g2).zip(g3);
    for ((((&a, &b), &c), &d), (&s, &w)) in gs.zip(sc.iter().zip(st)) {
        v[0] += a * s * w;
        v[1] += b * s * w;
        v[2] += c * s * w;
        v[3] += d * s * w;
    }
    for (&p, v) in ps.iter().zip(v) {
        pa[p] = v;
    }
}

fn pw2_col_grad1(
    go: &[f32],
    c3: usize,
    o0: usize,
    p: usize,
    sc: &[f32],
    st: &[f32],
    pa: &mut [f32],
) {
    let mut v = pa[p];
    for ((&gv, &s), &w) in go[p * c3 + o0..][..st.len()].iter().zip(sc).zip(st) {
        v += gv * s * w;
    }
    pa[p] = v;
}

impl<'p, 'a> Executor<'p, 'a> {
    /// Backward of an inverted-residual tail pw1 -> depthwise -> pw2, one expanded channel at a
    /// time: pw2's input gradient for channel c, the depthwise mask, bias gradient and input
    /// gradient, pw1's mask and bias gradient, pw1's input gradient (with the weights before this
    /// step's update) and pw1's weight row c, updated at once. The expanded tensors' fp32
    /// gradients never exist whole; the numbers are those of the unfused ops.
    fn block_backward(&mut self, index: usize, pw2: usize, arg: u32, bufs: [u32; 4]) -> Result<()> {
        let bad = |field| Error::CorruptPlan { field };
        let pv = self.plan;
        let params = self.params;
        if index == 0 {
            return Err(bad("ops (block without operands)"));
        }
        let opr = pv.op(index - 1)?;
        if opr.kind != OpKind::BlockOperands || opr.node as usize != pw2 {
            return Err(bad("ops (block without operands)"));
        }
        let (p1, d) = ((arg & 0xFFF) as usize, ((arg >> 12) & 0xFFF) as usize);
        let accumulate = arg & (1 << 24) != 0;
        let (n1, nd, n2) = (pv.node(p1)?, pv.node(d)?, pv.node(pw2)?);
        if n1.kind != NODE_CONV
            || nd.kind != NODE_CONV
            || n2.kind != NODE_CONV
            || n1.output != nd.inputs[0]
            || nd.output != n2.inputs[0]
        {
            return Err(bad("ops.arg (block is not pw -> depthwise -> pw)"));
        }
        let (l1, ld, l2) = (
            pv.layer(n1.layer as usize)?,
            pv.layer(nd.layer as usize)?,
            pv.layer(n2.layer as usize)?,
        );
        let t0 = pv.tensor(n1.inputs[0] as usize)?;
        let t1 = pv.tensor(n1.output as usize)?;
        let t2 = pv.tensor(nd.output as usize)?;
        let t3 = pv.tensor(n2.output as usize)?;
        let g1 = Self::conv_geom(&n1, &t0, &t1)?;
        let gd = Self::conv_geom(&nd, &t1, &t2)?;
        let g2 = Self::conv_geom(&n2, &t2, &t3)?;
        let pointwise = |g: &Conv2dGeom| {
            g.kh == 1
                && g.kw == 1
                && g.stride_h == 1
                && g.stride_w == 1
                && g.pad_top + g.pad_left + g.pad_bottom + g.pad_right == 0
                && g.groups == 1
        };
        if !pointwise(&g1) || !pointwise(&g2) || !gd.is_depthwise() || ld.st_weight != NONE {
            return Err(bad("ops.arg (block is not pw -> depthwise -> pw)"));
        }
        let (fw1, _, ws1, _) = Self::frozen_in(&pv, params, &l1)?;
        let (fwd, _, wsd, _) = Self::frozen_in(&pv, params, &ld)?;
        let (fw2, _, ws2, _) = Self::frozen_in(&pv, params, &l2)?;
        let (m, c0, c3) = (t1.c as usize, t0.c as usize, t3.c as usize);
        let (hw1, hw2) = (t1.h as usize * t1.w as usize, t2.h as usize * t2.w as usize);
        let k = l1.channels as usize;
        let (rows, cols, xc) = match (l1.st_weight != NONE, l1.axis) {
            (false, _) => (0, 0, 0),
            (true, 0) => (k, c0, c0),
            (true, _) => (m, k, k),
        };
        let with_m = self.momentum != 0.0;
        if with_m && !pv.globals.momentum_buffers {
            return Err(Error::InvalidParameter {
                what: "executor: momentum > 0 needs a plan compiled with momentum buffers",
            });
        }
        let cfg = SgdConfig {
            lr: self.lr,
            momentum: self.momentum,
            qas: self.qas,
        };
        let prec = pv.globals.precision;
        let rng_buf = if rows > 0 { pv.globals.rng } else { NONE };
        let [go2, gi, scratch, mask_d, mask_1, x, w2s, w1s, sp, mw1, rb, bd, mbd, b1, mb1] = self
            .carve_t(
            [
                bufs[0],
                bufs[1],
                bufs[2],
                opr.bufs[0],
                opr.bufs[1],
                opr.bufs[2],
                l2.st_weight,
                l1.st_weight,
                l1.st_precision,
                l1.st_momentum_w,
                rng_buf,
                ld.st_bias,
                ld.st_momentum_b,
                l1.st_bias,
                l1.st_momentum_b,
            ],
            [
                4 * hw2 * c3,
                if bufs[1] == NONE { ALL } else { 4 * hw1 * c0 },
                ALL,
                ALL,
                ALL,
                if opr.bufs[2] == NONE { ALL } else { hw1 * xc },
                ALL,
                ALL,
                ALL,
                ALL,
                ALL,
                ALL,
                ALL,
                ALL,
                ALL,
            ],
        )?;
        let go2: &[f32] = view(go2, "grad out")?;
        let gi: &mut [f32] = view_mut(gi, "grad in")?;
        let scratch: &mut [f32] = view_mut(scratch, "block scratch")?;
        let x: &[i8] = view(x, "saved input")?;
        let w2s: &[i8] = view(w2s, "trained weights")?;
        let w1s: &mut [i8] = view_mut(w1s, "trained weights")?;
        let w2 = Self::weights_of_static(&l2, &g2, fw2, w2s);
        w2.check(&g2)?;
        let has_gi = bufs[1] != NONE;
        if go2.len() != hw2 * c3
            || (has_gi && gi.len() != hw1 * c0)
            || scratch.len() < hw2 + hw1 + 2 * m + cols
            || mask_d.len() != (hw2 * m).div_ceil(8)
            || mask_1.len() != (hw1 * m).div_ceil(8)
            || (rows > 0 && (x.len() != hw1 * xc || w1s.len() != rows * cols))
            || fw1.len() != m * c0
            || fwd.len() != m * gd.kh * gd.kw
            || ws1.len() != m
            || wsd.len() != m
            || ws2.len() != c3
        {
            return Err(bad("buffers.bytes (block backward)"));
        }
        let mut residual: &mut [i8] = &mut [];
        let mut master: &mut [f32] = &mut [];
        if rows > 0 {
            match prec {
                Precision::Residual => residual = view_mut(sp, "residual")?,
                Precision::FpMaster => master = view_mut(sp, "master copy")?,
                Precision::StochasticRounding => {}
            }
        }
        let mut mom1: &mut [f32] = if with_m && rows > 0 {
            view_mut(mw1, "momentum")?
        } else {
            &mut []
        };
        let mut rng = match rb.get(..4) {
            Some(b) => XorShift32 {
                state: u32::from_le_bytes([b[0], b[1], b[2], b[3]]),
            },
            None if rows > 0 && prec == Precision::StochasticRounding => {
                return Err(bad("globals.rng"))
            }
            None => XorShift32::new(1),
        };
        let (pa, rest) = scratch.split_at_mut(hw2);
        let (pb, rest) = rest.split_at_mut(hw1);
        let (dbg, rest) = rest.split_at_mut(m);
        let (b1g, rest) = rest.split_at_mut(m);
        let row = &mut rest[..cols];
        dbg.fill(0.0);
        b1g.fill(0.0);
        if has_gi && !accumulate {
            gi.fill(0.0);
        }
        let row_shape = WeightShape {
            out_c: 1,
            taps: 1,
            in_per_group: cols,
            groups: 1,
        };
        let dtaps = gd.kh * gd.kw;
        let in_scale = t0.scale;
        let x_zp = t0.zero_point;
        // `x - zp` as f32 for every int8 `x`, once per block: the weight rows' loop loads each
        // term instead of converting it (`SUB`, `VMOV`, `VCVT` per entry and pixel); the same
        // values, wrapping as the release build's subtraction.
        let mut xf = [0f32; 256];
        for (u, d) in xf.iter_mut().enumerate() {
            *d = (u as u8 as i8 as i32).wrapping_sub(x_zp) as f32;
        }
        let xf = &xf;
        let mut result = Ok(());
        // One weight column (pw2) or row (pw1) of channel c as f32, staged in blocks so the
        // inner loops are plain multiply-adds; sums keep their order, so the numbers do not
        // depend on the block size.
        let mut stage = [0f32; STAGE_F32];
        for c in 0..m {
            pa.fill(0.0);
            for o0 in (0..c3).step_by(STAGE_F32) {
                let n = (c3 - o0).min(STAGE_F32);
                w2.column_f32(c, m, o0, &mut stage[..n]);
                let (st, sc) = (&stage[..n], &ws2[o0..o0 + n]);
                let go = &go2[..hw2 * c3];
                let (tail, k) = quads((0..hw2).filter(|&p| bit(mask_d, p * m + c)), |ps| {
                    pw2_col_grad4(go, c3, o0, ps, sc, st, pa)
                });
                for &p in &tail[..k] {
                    pw2_col_grad1(go, c3, o0, p, sc, st, pa);
                }
            }
            dbg[c] = pa.iter().fold(dbg[c], |a, &v| a + v);
            dw_plane_input_grad(&gd, pa, &fwd[c * dtaps..(c + 1) * dtaps], wsd[c], pb);
            let mut acc = b1g[c];
            for (q, v) in pb.iter_mut().enumerate() {
                if !bit(mask_1, q * m + c) {
                    *v = 0.0;
                }
                acc += *v;
            }
            b1g[c] = acc;
            let trained_row = c < rows;
            if has_gi {
                let s = ws1[c];
                for i0 in (0..c0).step_by(STAGE_F32) {
                    let n = (c0 - i0).min(STAGE_F32);
                    for (j, d) in stage[..n].iter_mut().enumerate() {
                        let i = i0 + j;
                        *d = if trained_row && i < cols {
                            w1s[c * cols + i]
                        } else {
                            fw1[c * c0 + i]
                        } as f32;
                    }
                    let st = &stage[..n];
                    let pb = &*pb;
                    let gi = &mut gi[..hw1 * c0];
                    let (tail, k) = quads((0..hw1).filter(|&q| pb[q] != 0.0), |qs| {
                        let v = qs.map(|q| pb[q] * s);
                        let [d0, d1, d2, d3] = rows4(gi, c0, i0, n, qs);
                        let rows = d0.iter_mut().zip(d1).zip(d2).zip(d3);
                        for ((((a, b), c), d), &w) in rows.zip(st) {
                            *a += v[0] * w;
                            *b += v[1] * w;
                            *c += v[2] * w;
                            *d += v[3] * w;
                        }
                    });
                    for &q in &tail[..k] {
                        let v = pb[q] * s;
                        for (dv, &w) in gi[q * c0 + i0..][..n].iter_mut().zip(st) {
                            *dv += v * w;
                        }
                    }
                }
            }
            if trained_row {
                row.fill(0.0);
                let pb = &*pb;
                let x = &x[..hw1 * xc];
                let (tail, k) = quads((0..hw1).filter(|&q| pb[q] != 0.0), |qs| {
                    let v = qs.map(|q| pb[q] * in_scale);
                    let [x0, x1, x2, x3] = qs.map(|q| &x[q * xc..][..cols]);
                    // Each row entry takes the four pixels' terms in pixel order, as the
                    // pixel-by-pixel loop adds them.
                    let xs = x0.iter().zip(x1).zip(x2).zip(x3);
                    for (r, (((&a0, &a1), &a2), &a3)) in row.iter_mut().zip(xs) {
                        let mut a = *r;
                        a += v[0] * xf[a0 as u8 as usize];
                        a += v[1] * xf[a1 as u8 as usize];
                        a += v[2] * xf[a2 as u8 as usize];
                        a += v[3] * xf[a3 as u8 as usize];
                        *r = a;
                    }
                });
                for &q in &tail[..k] {
                    let v = pb[q] * in_scale;
                    let xs = &x[q * xc..][..cols];
                    for (r, &xv) in row.iter_mut().zip(xs) {
                        *r += v * xf[xv as u8 as usize];
                    }
                }
                let mslice = if with_m {
                    let n = cols.min(mom1.len());
                    let (a, rest) = core::mem::take(&mut mom1).split_at_mut(n);
                    mom1 = rest;
                    Some(a)
                } else {
                    None
                };
                let state = match prec {
                    Precision::StochasticRounding => UpdateState::StochasticRounding(&mut rng),
                    Precision::Residual => {
                        let n = cols.min(residual.len());
                        let (a, rest) = core::mem::take(&mut residual).split_at_mut(n);
                        residual = rest;
                        UpdateState::Residual(a)
                    }
                    Precision::FpMaster => {
                        let n = cols.min(master.len());
                        let (a, rest) = core::mem::take(&mut master).split_at_mut(n);
                        master = rest;
                        UpdateState::FpMaster(a)
                    }
                };
                result = sgd_update_weights(
                    &mut w1s[c * cols..][..cols],
                    &row_shape,
                    &ws1[c..c + 1],
                    ChannelSelection::output(1),
                    row,
                    &cfg,
                    mslice,
                    state,
                );
                if result.is_err() {
                    break;
                }
            }
        }
        if let Some(b) = rb.get_mut(..4) {
            b.copy_from_slice(&rng.state.to_le_bytes());
        }
        result?;
        if ld.st_bias != NONE {
            let mom = if with_m {
                Some(view_mut(mbd, "momentum")?)
            } else {
                None
            };
            sgd_update_bias(view_mut(bd, "trained bias")?, wsd, t1.scale, dbg, &cfg, mom)?;
        }
        if l1.st_bias != NONE {
            let mom = if with_m {
                Some(view_mut(mb1, "momentum")?)
            } else {
                None
            };
            sgd_update_bias(view_mut(b1, "trained bias")?, ws1, t0.scale, b1g, &cfg, mom)?;
        }
        Ok(())
    }
}

/// Gradient of one trained weight row `o` (real units), for the fused weight step.
#[allow(clippy::too_many_arguments)]
fn weight_grad_row(
    g: &Conv2dGeom,
    axis: u8,
    o: usize,
    go: &[f32],
    x: &[i8],
    xc: usize,
    in_q: QParams,
    row: &mut [f32],
) {
    row.fill(0.0);
    let taps = g.kh * g.kw;
    let cols = row.len() / taps.max(1);
    let base = if axis == 0 {
        (o / g.out_per_group()) * g.in_per_group()
    } else {
        0
    };
    let (ow, oc) = (g.out_w(), g.out_c);
    let zp = in_q.zero_point;
    for oy in 0..g.out_h() {
        for ox in 0..ow {
            let v = go[(oy * ow + ox) * oc + o];
            if v == 0.0 {
                continue;
            }
            let v = v * in_q.scale;
            for ky in 0..g.kh {
                let iy = (oy * g.stride_h + ky) as isize - g.pad_top as isize;
                if iy < 0 || iy >= g.in_h as isize {
                    continue;
                }
                for kx in 0..g.kw {
                    let ix = (ox * g.stride_w + kx) as isize - g.pad_left as isize;
                    if ix < 0 || ix >= g.in_w as isize {
                        continue;
                    }
                    let xs = &x[(iy as usize * g.in_w + ix as usize) * xc + base..][..cols];
                    let r = &mut row[(ky * g.kw + kx) * cols..][..cols];
                    for (d, &xv) in r.iter_mut().zip(xs) {
                        *d += v * (xv as i32 - zp) as f32;
                    }
                }
            }
        }
    }
}

/// Pointwise conv whose output overwrites its input pixel by pixel: output pixel p only needs
/// input pixel p. Shrinking convs walk forward, expanding ones backward, so a write never lands
/// on an input pixel still to be read.
#[allow(clippy::too_many_arguments)]
fn pw_forward_in_place(
    g: &Conv2dGeom,
    buf: &mut [i8],
    in_zp: i32,
    w: Weights<'_>,
    bias: &[i32],
    rq: &[Requant],
    out_zp: i32,
    amin: i8,
    amax: i8,
    px: &mut [i8],
) -> Result<()> {
    g.validate()?;
    w.check(g)?;
    let (ci, co) = (g.in_c, g.out_c);
    let pixels = g.in_h * g.in_w;
    if buf.len() < g.input_len()
        || buf.len() < g.output_len()
        || bias.len() != co
        || rq.len() != co
        || px.len() != co
    {
        return Err(Error::ShapeMismatch {
            what: "executor: in-place pointwise buffers",
            expected: g.output_len(),
            actual: buf.len(),
        });
    }
    #[cfg(all(target_arch = "arm", target_feature = "dsp", not(feature = "portable")))]
    if let Some(rows) = w.dsp_rows(g, in_zp) {
        crate::ops::arm::pw_in_place(
            pixels, ci, co, buf, in_zp, rows, bias, rq, out_zp, amin, amax,
        );
        return Ok(());
    }
    for step in 0..pixels {
        let p = if co > ci { pixels - 1 - step } else { step };
        let x = &buf[p * ci..][..ci];
        for (o, d) in px.iter_mut().enumerate() {
            let mut acc = bias[o];
            for (i, &xv) in x.iter().enumerate() {
                acc =
                    acc.wrapping_add((xv as i32 - in_zp).wrapping_mul(w.at(o, 0, i, 1, ci) as i32));
            }
            let v = rq[o].apply(acc).saturating_add(out_zp);
            *d = v.clamp(amin as i32, amax as i32) as i8;
        }
        buf[p * co..][..co].copy_from_slice(px);
    }
    Ok(())
}

/// Input gradient of one depthwise channel on planar (H x W) buffers: `gi` is overwritten with the
/// output gradient `go` scattered through the channel's `kh * kw` weights (dequantized by `scale`).
/// The caller has checked the plane sizes against `g`.
fn dw_plane_input_grad(g: &Conv2dGeom, go: &[f32], w: &[i8], scale: f32, gi: &mut [f32]) {
    let (ow, kh, kw) = (g.out_w(), g.kh, g.kw);
    let (in_h, in_w) = (g.in_h as isize, g.in_w as isize);
    gi.fill(0.0);
    // The scaled taps once per plane instead of once per pixel and tap (the same products).
    let mut staged = [0f32; DW_STAGED_TAPS];
    let staged = staged.get_mut(..kh * kw).map(|s| {
        for (d, &wv) in s.iter_mut().zip(w) {
            *d = wv as f32 * scale;
        }
        &*s
    });
    let taps3: Option<[f32; 9]> = match (kh, kw, staged) {
        (3, 3, Some(s)) => s.try_into().ok(),
        _ => None,
    };
    let tap = |k: usize| match staged {
        Some(s) => s[k],
        None => w[k] as f32 * scale,
    };
    for oy in 0..g.out_h() {
        let iy0 = (oy * g.stride_h) as isize - g.pad_top as isize;
        // The taps inside the input, found once per row and pixel rather than tested per tap;
        // they run in the same order, so every sum is unchanged.
        let ky_lo = (-iy0).clamp(0, kh as isize) as usize;
        let ky_hi = (in_h - iy0).clamp(ky_lo as isize, kh as isize) as usize;
        for ox in 0..ow {
            let v = go[oy * ow + ox];
            if v == 0.0 {
                continue;
            }
            let ix0 = (ox * g.stride_w) as isize - g.pad_left as isize;
            let kx_lo = (-ix0).clamp(0, kw as isize) as usize;
            let kx_hi = (in_w - ix0).clamp(kx_lo as isize, kw as isize) as usize;
            if let (Some(t), true) = (taps3, ky_hi - ky_lo == 3 && kx_hi - kx_lo == 3) {
                // A 3x3 window wholly inside: the taps in registers, the rows unrolled.
                let (b, w) = ((iy0 * in_w + ix0) as usize, in_w as usize);
                let r = &mut gi[b..b + 2 * w + 3];
                for (ky, t) in t.chunks_exact(3).enumerate() {
                    let r = &mut r[ky * w..ky * w + 3];
                    r[0] += v * t[0];
                    r[1] += v * t[1];
                    r[2] += v * t[2];
                }
                continue;
            }
            if let Some(s) = staged {
                // Each tap row inside the input at once, unrolled: small planes (4x4 under a
                // 7x7 kernel) clip every window, and the per-tap loop was mostly overhead. A tap
                // of one pixel touches its own input, so any order within the pixel gives the
                // same sums.
                let n = kx_hi - kx_lo;
                for ky in ky_lo..ky_hi {
                    // In isize until the sum: a clipped window's ix0 is negative.
                    let base = ((iy0 + ky as isize) * in_w + ix0 + kx_lo as isize) as usize;
                    let k0 = ky * kw + kx_lo;
                    tap_row(&mut gi[base..base + n], &s[k0..k0 + n], v);
                }
                continue;
            }
            for ky in ky_lo..ky_hi {
                let base = (iy0 + ky as isize) * in_w + ix0;
                for kx in kx_lo..kx_hi {
                    gi[(base + kx as isize) as usize] += v * tap(ky * kw + kx);
                }
            }
        }
    }
}

/// `d += v * t`, entry by entry (`d` and `t` of one length): unrolled for the rows of kernels
/// up to 7 wide.
#[inline(always)]
fn tap_row(d: &mut [f32], t: &[f32], v: f32) {
    fn n<const N: usize>(d: &mut [f32], t: &[f32], v: f32) {
        if let (Ok(d), Ok(t)) = (<&mut [f32; N]>::try_from(d), <&[f32; N]>::try_from(t)) {
            for (d, &t) in d.iter_mut().zip(t) {
                *d += v * t;
            }
        }
    }
    match d.len() {
        1 => n::<1>(d, t, v),
        2 => n::<2>(d, t, v),
        3 => n::<3>(d, t, v),
        4 => n::<4>(d, t, v),
        5 => n::<5>(d, t, v),
        6 => n::<6>(d, t, v),
        7 => n::<7>(d, t, v),
        _ => {
            for (d, &t) in d.iter_mut().zip(t) {
                *d += v * t;
            }
        }
    }
}

/// Input gradient of a depthwise conv written over its output gradient, channel by channel.
fn dw_backward_in_place(
    g: &Conv2dGeom,
    buf: &mut [f32],
    w: &[i8],
    ws: &[f32],
    planes: &mut [f32],
) -> Result<()> {
    g.validate()?;
    let (c, taps, ow) = (g.in_c, g.kh * g.kw, g.out_w());
    let (ipix, opix) = (g.in_h * g.in_w, g.out_h() * ow);
    if buf.len() < g.input_len()
        || buf.len() < g.output_len()
        || w.len() != c * taps
        || ws.len() != c
        || planes.len() != ipix + opix
    {
        return Err(Error::ShapeMismatch {
            what: "executor: in-place depthwise gradient buffers",
            expected: g.input_len(),
            actual: buf.len(),
        });
    }
    let (gi, go) = planes.split_at_mut(ipix);
    for ch in 0..c {
        for (p, v) in go.iter_mut().enumerate() {
            *v = buf[p * c + ch];
        }
        dw_plane_input_grad(g, go, &w[ch * taps..(ch + 1) * taps], ws[ch], gi);
        for (p, &v) in gi.iter().enumerate() {
            buf[p * c + ch] = v;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    extern crate std;
    use std::vec::Vec;

    use super::*;
    use crate::autodiff::{CompileOptions, LossKind, Precision};
    use crate::graph::{Act, Graph, LayerParams, Node, NodeKind, TensorInfo, Window};
    use crate::plan::{compile, PlanSettings};
    use crate::sparse::{ChannelAxis, LayerUpdate, Scheme};

    struct Lcg(u64);
    impl Lcg {
        fn next(&mut self) -> u32 {
            self.0 = self
                .0
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (self.0 >> 33) as u32
        }
        fn i8(&mut self, lim: i32) -> i8 {
            ((self.next() % (2 * lim as u32 + 1)) as i32 - lim) as i8
        }
    }

    #[test]
    fn weight_columns_are_the_weights_at_each_output() {
        let mut r = Lcg(7);
        for _ in 0..300 {
            let out_c = 1 + r.next() as usize % 40;
            let icg = 1 + r.next() as usize % 40;
            let axis = (r.next() % 3) as u8;
            let k = r.next() as usize % (out_c.max(icg) + 2);
            let flash: Vec<i8> = (0..out_c * icg).map(|_| r.i8(127)).collect();
            let n_sram = if axis == 0 { k * icg } else { out_c * k };
            let sram: Vec<i8> = (0..n_sram).map(|_| r.i8(127)).collect();
            let w = match r.next() % 2 {
                0 => Weights::Whole(&flash),
                _ => Weights::Split {
                    flash: &flash,
                    sram: &sram,
                    axis,
                    k,
                },
            };
            let i = r.next() as usize % icg;
            let o0 = r.next() as usize % out_c;
            let n = 1 + r.next() as usize % (out_c - o0);
            let mut got = std::vec![f32::NAN; n];
            w.column_f32(i, icg, o0, &mut got);
            for (o, &v) in got.iter().enumerate() {
                assert_eq!(v, w.at(o0 + o, 0, i, 1, icg) as f32);
            }
        }
    }

    #[test]
    fn depthwise_plane_input_gradient_is_the_per_tap_scatter() {
        let mut r = Lcg(11);
        for _ in 0..400 {
            let k: usize = [1, 3, 5, 7, 9][r.next() as usize % 5];
            let (s, p) = (1 + r.next() as usize % 2, r.next() as usize % k.div_ceil(2));
            let (ih, iw) = (k + r.next() as usize % 12, k + r.next() as usize % 12);
            let g = Conv2dGeom::new(ih, iw, 1, 1, k, k, s, s, p, p, p, p, 1).unwrap();
            let go: Vec<f32> = (0..g.out_h() * g.out_w())
                .map(|_| match r.next() % 4 {
                    0 => 0.0,
                    _ => r.i8(100) as f32 * 0.37,
                })
                .collect();
            let w: Vec<i8> = (0..k * k).map(|_| r.i8(127)).collect();
            let scale = 0.013;
            let mut got = std::vec![f32::NAN; ih * iw];
            dw_plane_input_grad(&g, &go, &w, scale, &mut got);
            let mut want = std::vec![0f32; ih * iw];
            for oy in 0..g.out_h() {
                for ox in 0..g.out_w() {
                    for ky in 0..k {
                        for kx in 0..k {
                            let iy = (oy * s + ky) as isize - p as isize;
                            let ix = (ox * s + kx) as isize - p as isize;
                            if (0..ih as isize).contains(&iy) && (0..iw as isize).contains(&ix) {
                                let t = w[ky * k + kx] as f32 * scale;
                                want[iy as usize * iw + ix as usize] += go[oy * g.out_w() + ox] * t;
                            }
                        }
                    }
                }
            }
            assert_eq!(
                got.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                want.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
            );
        }
    }

    fn t(c: u32, h: u32, w: u32, scale: f32, zp: i32) -> TensorInfo {
        TensorInfo {
            c,
            h,
            w,
            scale,
            zero_point: zp,
        }
    }

    fn win(k: u16, s: u16, p: u16) -> Window {
        Window {
            kh: k,
            kw: k,
            sh: s,
            sw: s,
            pt: p,
            pl: p,
            pb: p,
            pr: p,
        }
    }

    fn params(r: &mut Lcg, n: usize, o: usize, ws: f32) -> Option<LayerParams> {
        Some(LayerParams {
            weight: (0..n).map(|_| r.i8(100)).collect(),
            bias: (0..o).map(|_| (r.next() % 200) as i32 - 100).collect(),
            weight_scale: (0..o).map(|i| ws * (1.0 + 0.1 * i as f32)).collect(),
        })
    }

    /// conv3x3/2 relu6 -> dw3x3 relu6 -> pw1x1 -> add(skip) -> gap -> flatten -> fc
    pub(crate) fn small_graph() -> Graph {
        let mut r = Lcg(7);
        let tensors = std::vec![
            t(3, 8, 8, 0.02, 0),
            t(8, 4, 4, 0.03, -128),
            t(8, 4, 4, 0.03, -128),
            t(8, 4, 4, 0.05, 3),
            t(8, 4, 4, 0.06, -5),
            t(8, 1, 1, 0.04, -7),
            t(8, 1, 1, 0.04, -7),
            t(4, 1, 1, 0.1, 2),
        ];
        let node = |name: &str, kind, inputs: Vec<usize>, output| Node {
            name: name.into(),
            kind,
            inputs,
            output,
        };
        let nodes = std::vec![
            node(
                "conv0",
                NodeKind::Conv {
                    win: win(3, 2, 1),
                    groups: 1,
                    act: Act::Relu6
                },
                std::vec![0],
                1
            ),
            node(
                "dw1",
                NodeKind::Conv {
                    win: win(3, 1, 1),
                    groups: 8,
                    act: Act::Relu6
                },
                std::vec![1],
                2
            ),
            node(
                "pw2",
                NodeKind::Conv {
                    win: win(1, 1, 0),
                    groups: 1,
                    act: Act::None
                },
                std::vec![2],
                3
            ),
            node("add", NodeKind::Add { act: Act::None }, std::vec![1, 3], 4),
            node("gap", NodeKind::GlobalAvgPool, std::vec![4], 5),
            node("flat", NodeKind::Flatten, std::vec![5], 6),
            node("fc", NodeKind::Fc { act: Act::None }, std::vec![6], 7),
        ];
        let params = std::vec![
            params(&mut r, 8 * 9 * 3, 8, 0.004),
            params(&mut r, 8 * 9, 8, 0.005),
            params(&mut r, 8 * 8, 8, 0.004),
            None,
            None,
            None,
            params(&mut r, 4 * 8, 4, 0.006),
        ];
        Graph {
            tensors,
            nodes,
            params,
            input: 0,
            output: 7,
            rounding: crate::quant::Rounding::Single,
        }
    }

    fn scheme(g: &Graph, f: impl Fn(usize) -> LayerUpdate) -> Scheme {
        Scheme {
            layers: (0..g.nodes.len())
                .map(|i| {
                    if g.nodes[i].kind.trainable() {
                        f(i)
                    } else {
                        LayerUpdate::default()
                    }
                })
                .collect(),
        }
    }

    fn full(g: &Graph) -> Scheme {
        scheme(g, |_| LayerUpdate {
            bias: true,
            weight_ratio: 1.0,
            axis: ChannelAxis::Output,
        })
    }

    fn settings(reorder: bool, precision: Precision, momentum: bool) -> PlanSettings {
        PlanSettings {
            options: CompileOptions {
                reorder,
                precision,
                momentum,
                loss: LossKind::CrossEntropy,
                accumulate: false,
            },
            seed: 1,
            lr: 0.05,
            momentum: 0.0,
        }
    }

    fn sample(seed: u64) -> Vec<i8> {
        let mut r = Lcg(seed);
        (0..3 * 64).map(|_| r.i8(120)).collect()
    }

    /// The parameter blob copied into u32 words: the executor reads it at 4-byte alignment, as
    /// flash gives it on the device.
    fn word_aligned(bytes: &[u8]) -> Vec<u32> {
        bytes
            .chunks(4)
            .map(|b| {
                let mut a = [0u8; 4];
                a[..b.len()].copy_from_slice(b);
                u32::from_le_bytes(a)
            })
            .collect()
    }

    fn run(
        g: &Graph,
        s: &Scheme,
        st: &PlanSettings,
        steps: usize,
    ) -> (Vec<f32>, usize, usize, Vec<u8>) {
        let c = compile(g, s, st, b"{}").unwrap();
        let params = word_aligned(&c.params);
        let pbytes: &[u8] =
            unsafe { core::slice::from_raw_parts(params.as_ptr() as *const u8, c.params.len()) };
        let mut arena_words = std::vec![0u32; c.memory.arena_bytes / 4 + 1];
        let arena: &mut [u8] = unsafe {
            core::slice::from_raw_parts_mut(
                arena_words.as_mut_ptr() as *mut u8,
                c.memory.arena_bytes,
            )
        };
        let mut ex = Executor::new(&c.plan, pbytes, arena).unwrap();
        ex.init().unwrap();
        let x = sample(3);
        let losses = (0..steps)
            .map(|_| ex.step(&x, Target::Class(2)).unwrap())
            .collect();
        (
            losses,
            ex.high_water(),
            c.memory.arena_bytes,
            ex.state().to_vec(),
        )
    }

    #[test]
    fn init_state_does_not_depend_on_what_the_arena_held() {
        let g = small_graph();
        for p in [
            Precision::StochasticRounding,
            Precision::Residual,
            Precision::FpMaster,
        ] {
            let c = compile(&g, &full(&g), &settings(true, p, false), b"{}").unwrap();
            let params = word_aligned(&c.params);
            let pbytes: &[u8] = unsafe {
                core::slice::from_raw_parts(params.as_ptr() as *const u8, c.params.len())
            };
            let states: Vec<Vec<u8>> = [0x00u32, 0xA5A5_A5A5, u32::MAX]
                .iter()
                .map(|&fill| {
                    let mut words = std::vec![fill; c.memory.arena_bytes / 4 + 1];
                    let arena: &mut [u8] = unsafe {
                        core::slice::from_raw_parts_mut(
                            words.as_mut_ptr() as *mut u8,
                            c.memory.arena_bytes,
                        )
                    };
                    let mut ex = Executor::new(&c.plan, pbytes, arena).unwrap();
                    ex.init().unwrap();
                    ex.state().to_vec()
                })
                .collect();
            assert_eq!(states[0], states[1], "{p:?}");
            assert_eq!(states[0], states[2], "{p:?}");
        }
    }

    #[test]
    fn training_reduces_loss_and_high_water_equals_plan() {
        let g = small_graph();
        for reorder in [true, false] {
            for p in [
                Precision::StochasticRounding,
                Precision::Residual,
                Precision::FpMaster,
            ] {
                let (l, hw, arena, _) = run(&g, &full(&g), &settings(reorder, p, false), 30);
                assert_eq!(hw, arena, "reorder {reorder} precision {p:?}");
                assert!(l[29] < l[0] * 0.7, "loss {} -> {} ({p:?})", l[0], l[29]);
            }
        }
    }

    #[test]
    fn sparse_schemes_run_and_match_the_plan() {
        let g = small_graph();
        let schemes = [
            scheme(&g, |_| LayerUpdate {
                bias: true,
                weight_ratio: 0.0,
                axis: ChannelAxis::Output,
            }),
            scheme(&g, |i| LayerUpdate {
                bias: i >= 2,
                weight_ratio: if i == 2 { 0.5 } else { 0.0 },
                axis: ChannelAxis::Output,
            }),
            scheme(&g, |i| LayerUpdate {
                bias: i == 6,
                weight_ratio: if i == 2 { 0.25 } else { 0.0 },
                axis: ChannelAxis::Input,
            }),
            scheme(&g, |i| LayerUpdate {
                bias: false,
                weight_ratio: if i == 6 { 0.5 } else { 0.0 },
                axis: ChannelAxis::Input,
            }),
            scheme(&g, |i| LayerUpdate {
                bias: false,
                weight_ratio: if i == 1 { 0.5 } else { 0.0 },
                axis: ChannelAxis::Output,
            }),
        ];
        for s in &schemes {
            let (l, hw, arena, _) = run(&g, s, &settings(true, Precision::FpMaster, false), 40);
            assert_eq!(hw, arena);
            assert!(l[39] < l[0], "loss {} -> {}", l[0], l[39]);
        }
    }

    #[test]
    fn reordering_never_costs_memory_and_pruning_saves_it() {
        let g = small_graph();
        let st = |r| settings(r, Precision::StochasticRounding, false);
        let a = compile(&g, &full(&g), &st(false), b"").unwrap().memory;
        let b = compile(&g, &full(&g), &st(true), b"").unwrap().memory;
        assert!(b.arena_bytes <= a.arena_bytes);
        let bias_fc = scheme(&g, |i| LayerUpdate {
            bias: i == 6,
            weight_ratio: 0.0,
            axis: ChannelAxis::Output,
        });
        let c = compile(&g, &bias_fc, &st(true), b"").unwrap();
        assert!(c.memory.arena_bytes < b.arena_bytes);
        // Only the classifier trains: no gradient reaches any conv.
        assert!(c.training.ops.iter().all(|o| o.kind != OpKind::BackInput));
        for m in [&a, &b, &c.memory] {
            assert!(m.lower_bound <= m.arena_bytes);
        }
    }

    /// A compiled plan with its parameter blob and arena in 4-byte aligned storage.
    struct Owned {
        plan: Vec<u8>,
        params: Vec<u32>,
        params_len: usize,
        arena: Vec<u32>,
        arena_len: usize,
    }

    impl Owned {
        fn new(c: &crate::plan::Compiled) -> Owned {
            let params = c
                .params
                .chunks(4)
                .map(|b| {
                    let mut a = [0u8; 4];
                    a[..b.len()].copy_from_slice(b);
                    u32::from_le_bytes(a)
                })
                .collect();
            Owned {
                plan: c.plan.clone(),
                params,
                params_len: c.params.len(),
                arena: std::vec![0u32; c.memory.arena_bytes / 4 + 1],
                arena_len: c.memory.arena_bytes,
            }
        }

        fn ex(&mut self) -> Executor<'_, '_> {
            let pb: &[u8] = unsafe {
                core::slice::from_raw_parts(self.params.as_ptr() as *const u8, self.params_len)
            };
            let arena: &mut [u8] = unsafe {
                core::slice::from_raw_parts_mut(self.arena.as_mut_ptr() as *mut u8, self.arena_len)
            };
            Executor::new(&self.plan, pb, arena).unwrap()
        }
    }

    fn accumulating(mut st: PlanSettings) -> PlanSettings {
        st.options.accumulate = true;
        st
    }

    /// Every layer's current weights and bias (flash + trained).
    fn all_layers(g: &Graph, ex: &mut Executor<'_, '_>) -> Vec<(Vec<i8>, Vec<i32>)> {
        let mut out = Vec::new();
        for (li, p) in g.params.iter().flatten().enumerate() {
            let mut w = std::vec![0i8; p.weight.len()];
            let mut b = std::vec![0i32; p.bias.len()];
            ex.read_layer(li, &mut w, &mut b).unwrap();
            out.push((w, b));
        }
        out
    }

    #[test]
    fn accumulated_batch_of_one_is_the_in_place_step() {
        let g = small_graph();
        let x = sample(3);
        let partial = scheme(&g, |i| LayerUpdate {
            bias: i >= 1,
            weight_ratio: if i == 2 { 0.5 } else { 0.0 },
            axis: ChannelAxis::Input,
        });
        for s in [full(&g), partial] {
            for p in [
                Precision::StochasticRounding,
                Precision::Residual,
                Precision::FpMaster,
            ] {
                let plain = settings(false, p, true);
                let mut a = Owned::new(&compile(&g, &s, &plain, b"").unwrap());
                let mut b = Owned::new(&compile(&g, &s, &accumulating(plain), b"").unwrap());
                let (mut ea, mut eb) = (a.ex(), b.ex());
                ea.init().unwrap();
                eb.init().unwrap();
                ea.momentum = 0.9;
                eb.momentum = 0.9;
                for k in 0..6 {
                    let la = ea.step(&x, Target::Class(k % 4)).unwrap();
                    let lb = eb.step(&x, Target::Class(k % 4)).unwrap();
                    assert_eq!(la, lb, "{p:?} step {k}");
                }
                assert_eq!(all_layers(&g, &mut ea), all_layers(&g, &mut eb), "{p:?}");
                assert_ne!(all_layers(&g, &mut ea), {
                    let mut e = a.ex();
                    e.init().unwrap();
                    all_layers(&g, &mut e)
                });
            }
        }
    }

    #[test]
    fn accumulation_sums_per_sample_gradients_and_updates_once() {
        let g = small_graph();
        let sparse = scheme(&g, |i| LayerUpdate {
            bias: i >= 2,
            weight_ratio: if i == 2 {
                0.5
            } else if i == 6 {
                1.0
            } else {
                0.0
            },
            axis: ChannelAxis::Output,
        });
        let xs: Vec<Vec<i8>> = (0..4).map(|k| sample(20 + k)).collect();
        let ys = [0usize, 2, 1, 3];
        for (s, p, reorder) in [
            (full(&g), Precision::FpMaster, true),
            (sparse, Precision::StochasticRounding, false),
        ] {
            let st = accumulating(settings(reorder, p, false));
            let c = compile(&g, &s, &st, b"").unwrap();
            // The accumulators are persistent state, counted in their own category.
            let plain = compile(&g, &s, &settings(reorder, p, false), b"").unwrap();
            assert!(c.memory.arena_bytes > plain.memory.arena_bytes);
            let bd = crate::planner::breakdown(&c.training.buffers, &c.training.ops, &c.memory);
            assert!(bd[6] > 0);
            assert_eq!(bd.iter().sum::<usize>(), c.memory.arena_bytes);
            let pv = PlanView::parse(&c.plan).unwrap();
            assert!(pv.globals.accumulate);
            let acc: Vec<(usize, usize)> = (0..pv.n_buffers)
                .map(|i| pv.buffer(i).unwrap())
                .filter(|b| b.kind.accumulator())
                .map(|b| (b.offset as usize, b.bytes as usize))
                .collect();
            assert!(!acc.is_empty());
            let read = |state: &[u8]| -> Vec<f32> {
                acc.iter()
                    .flat_map(|&(o, n)| {
                        state[o..o + n]
                            .chunks(4)
                            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                    })
                    .collect()
            };
            let mut o = Owned::new(&c);
            // Each sample's gradient on its own, from the initial weights.
            let mut sum: Vec<f32> = Vec::new();
            for (x, &y) in xs.iter().zip(&ys) {
                let mut ex = o.ex();
                ex.init().unwrap();
                ex.accumulate(x, Target::Class(y)).unwrap();
                let gi = read(ex.state());
                if sum.is_empty() {
                    sum = std::vec![0.0; gi.len()];
                }
                for (s, v) in sum.iter_mut().zip(gi) {
                    *s += v;
                }
            }
            let mut ex = o.ex();
            ex.init().unwrap();
            let before = all_layers(&g, &mut ex);
            for (x, &y) in xs.iter().zip(&ys) {
                ex.accumulate(x, Target::Class(y)).unwrap();
                assert_eq!(
                    all_layers(&g, &mut ex),
                    before,
                    "weights moved inside a batch"
                );
            }
            let batch = read(ex.state());
            assert!(sum.iter().any(|&v| v != 0.0));
            for (b, s) in batch.iter().zip(&sum) {
                assert!((b - s).abs() <= 1e-5 * (1.0 + s.abs()), "{b} vs {s}");
            }
            ex.apply_accumulated(4).unwrap();
            assert_ne!(all_layers(&g, &mut ex), before);
            assert!(read(ex.state()).iter().all(|&v| v == 0.0));
            assert_eq!(ex.high_water(), c.memory.arena_bytes);
            drop(ex);
            // A batch of one sample twice is that sample's step (the mean, not the sum).
            let mut twice = o.ex();
            twice.init().unwrap();
            twice.accumulate(&xs[0], Target::Class(0)).unwrap();
            twice.accumulate(&xs[0], Target::Class(0)).unwrap();
            twice.apply_accumulated(2).unwrap();
            let t = all_layers(&g, &mut twice);
            drop(twice);
            let mut once = o.ex();
            once.init().unwrap();
            once.step(&xs[0], Target::Class(0)).unwrap();
            assert_eq!(all_layers(&g, &mut once), t);
        }
    }

    #[test]
    fn a_non_finite_accumulated_gradient_skips_the_batch() {
        let g = small_graph();
        let st = accumulating(settings(true, Precision::FpMaster, true));
        let c = compile(&g, &full(&g), &st, b"").unwrap();
        let pv = PlanView::parse(&c.plan).unwrap();
        let acc = (0..pv.n_buffers)
            .map(|i| pv.buffer(i).unwrap())
            .find(|b| b.kind == BufKind::AccumWeight)
            .unwrap();
        let mut o = Owned::new(&c);
        let mut ex = o.ex();
        ex.init().unwrap();
        ex.momentum = 0.5;
        ex.step(&sample(1), Target::Class(1)).unwrap();
        let state = ex.state().to_vec();
        ex.accumulate(&sample(2), Target::Class(2)).unwrap();
        let at = acc.offset as usize + 4;
        ex.state_mut()[at..at + 4].copy_from_slice(&f32::NAN.to_le_bytes());
        assert!(matches!(
            ex.apply_accumulated(2),
            Err(Error::NonFinite { .. })
        ));
        // Weights, precision and momentum untouched; the accumulators are clear for the next batch.
        assert_eq!(ex.state(), &state[..]);
        assert!(ex.apply_accumulated(0).is_err());
        // A plain plan has no accumulation phase.
        let mut p = Owned::new(
            &compile(
                &g,
                &full(&g),
                &settings(true, Precision::FpMaster, false),
                b"",
            )
            .unwrap(),
        );
        let mut pe = p.ex();
        pe.init().unwrap();
        assert!(pe.accumulate(&sample(1), Target::Class(1)).is_err());
        assert!(pe.apply_accumulated(1).is_err());
    }

    #[test]
    fn partial_update_forward_matches_whole_update_before_training() {
        // With nothing trained yet, a split layer computes exactly what the frozen layer does.
        let g = small_graph();
        let st = settings(true, Precision::StochasticRounding, false);
        let logits = |s: &Scheme| {
            let c = compile(&g, s, &st, b"").unwrap();
            let pw: Vec<u32> = c
                .params
                .chunks(4)
                .map(|b| {
                    let mut a = [0u8; 4];
                    a[..b.len()].copy_from_slice(b);
                    u32::from_le_bytes(a)
                })
                .collect();
            let pb: &[u8] =
                unsafe { core::slice::from_raw_parts(pw.as_ptr() as *const u8, c.params.len()) };
            let mut aw = std::vec![0u32; c.memory.arena_bytes / 4 + 1];
            let arena: &mut [u8] = unsafe {
                core::slice::from_raw_parts_mut(aw.as_mut_ptr() as *mut u8, c.memory.arena_bytes)
            };
            let mut ex = Executor::new(&c.plan, pb, arena).unwrap();
            ex.init().unwrap();
            ex.forward(&sample(5)).unwrap().to_vec()
        };
        let frozen = logits(&scheme(&g, |_| LayerUpdate::default()));
        for axis in [ChannelAxis::Output, ChannelAxis::Input] {
            let part = logits(&scheme(&g, |i| LayerUpdate {
                bias: false,
                weight_ratio: if i == 2 || i == 6 { 0.5 } else { 0.0 },
                axis,
            }));
            assert_eq!(frozen, part);
        }
    }

    #[test]
    fn truncated_plans_are_errors_naming_a_field() {
        let g = small_graph();
        let c = compile(
            &g,
            &full(&g),
            &settings(true, Precision::Residual, true),
            b"{\"k\":1}",
        )
        .unwrap();
        for n in 0..c.plan.len() {
            match PlanView::parse(&c.plan[..n]) {
                Err(Error::CorruptPlan { field }) => assert!(!field.is_empty()),
                other => panic!("prefix {n}: {other:?}"),
            }
        }
        assert!(PlanView::parse(&c.plan).is_ok());
    }

    /// conv3x3 -> dw3x3/2 -> pw -> dw5x5 -> pw -> gap -> flatten -> fc: a chain a patch stage and
    /// in-place depthwise can cover.
    fn chain_graph() -> Graph {
        let mut r = Lcg(11);
        let tensors = std::vec![
            t(3, 12, 12, 0.02, 0),
            t(6, 12, 12, 0.03, -128),
            t(6, 6, 6, 0.03, -128),
            t(10, 6, 6, 0.05, 3),
            t(10, 6, 6, 0.04, -128),
            t(8, 6, 6, 0.06, -5),
            t(8, 1, 1, 0.04, -7),
            t(8, 1, 1, 0.04, -7),
            t(5, 1, 1, 0.1, 2),
        ];
        let node = |name: &str, kind, i: usize, o: usize| Node {
            name: name.into(),
            kind,
            inputs: std::vec![i],
            output: o,
        };
        let conv = |k, s, p, groups, act| NodeKind::Conv {
            win: win(k, s, p),
            groups,
            act,
        };
        let nodes = std::vec![
            node("c0", conv(3, 1, 1, 1, Act::Relu6), 0, 1),
            node("dw1", conv(3, 2, 1, 6, Act::Relu6), 1, 2),
            node("pw2", conv(1, 1, 0, 1, Act::None), 2, 3),
            node("dw3", conv(5, 1, 2, 10, Act::Relu), 3, 4),
            node("pw4", conv(1, 1, 0, 1, Act::Relu6), 4, 5),
            node("gap", NodeKind::GlobalAvgPool, 5, 6),
            node("flat", NodeKind::Flatten, 6, 7),
            node("fc", NodeKind::Fc { act: Act::None }, 7, 8),
        ];
        let params = std::vec![
            params(&mut r, 6 * 9 * 3, 6, 0.004),
            params(&mut r, 6 * 9, 6, 0.005),
            params(&mut r, 10 * 6, 10, 0.004),
            params(&mut r, 10 * 25, 10, 0.004),
            params(&mut r, 8 * 10, 8, 0.004),
            None,
            None,
            params(&mut r, 5 * 8, 5, 0.006),
        ];
        Graph {
            tensors,
            nodes,
            params,
            input: 0,
            output: 8,
            rounding: crate::quant::Rounding::Single,
        }
    }

    /// Only the chain graph's classifier bias trains: the forward pass sets the peak.
    fn classifier_bias(g: &Graph) -> Scheme {
        scheme(g, |i| LayerUpdate {
            bias: i == 7,
            weight_ratio: 0.0,
            axis: ChannelAxis::Output,
        })
    }

    /// pw2 and pw4 of the chain graph train: the pw2 -> dw3 -> pw4 block runs fused.
    fn block_scheme(g: &Graph) -> Scheme {
        scheme(g, |i| LayerUpdate {
            bias: i >= 2,
            weight_ratio: if i == 2 {
                0.5
            } else if i == 4 {
                0.25
            } else {
                0.0
            },
            axis: ChannelAxis::Output,
        })
    }

    fn run_layout(
        g: &Graph,
        s: &Scheme,
        st: &PlanSettings,
        layout: &crate::autodiff::Layout,
        x: &[i8],
        steps: usize,
    ) -> Option<(Vec<i8>, Vec<f32>, usize, usize)> {
        let tg = crate::autodiff::build_with(g, s, &st.options, layout).ok()?;
        let mp = crate::planner::plan(&tg.buffers, &tg.ops);
        let (plan, params) = crate::plan::encode(g, &tg, &mp, st, b"").unwrap();
        let pw: Vec<u32> = params
            .chunks(4)
            .map(|b| {
                let mut a = [0u8; 4];
                a[..b.len()].copy_from_slice(b);
                u32::from_le_bytes(a)
            })
            .collect();
        let pb: &[u8] =
            unsafe { core::slice::from_raw_parts(pw.as_ptr() as *const u8, params.len()) };
        let mut aw = std::vec![0u32; mp.arena_bytes / 4 + 1];
        let arena: &mut [u8] =
            unsafe { core::slice::from_raw_parts_mut(aw.as_mut_ptr() as *mut u8, mp.arena_bytes) };
        let mut ex = Executor::new(&plan, pb, arena).unwrap();
        ex.init().unwrap();
        let logits = ex.forward(x).unwrap().to_vec();
        let losses = (0..steps)
            .map(|_| ex.step(x, Target::Class(1)).unwrap())
            .collect();
        Some((logits, losses, ex.high_water(), mp.arena_bytes))
    }

    #[test]
    fn layouts_change_memory_not_results() {
        use crate::autodiff::Layout;
        let g = chain_graph();
        let mut rx = Lcg(3);
        let x: Vec<i8> = (0..3 * 144).map(|_| rx.i8(120)).collect();
        let schemes = [
            scheme(&g, |i| LayerUpdate {
                bias: i >= 3,
                weight_ratio: if i == 4 {
                    0.5
                } else if i == 7 {
                    1.0
                } else {
                    0.0
                },
                axis: ChannelAxis::Output,
            }),
            // pw2 trained too: the pw2 -> dw3 -> pw4 block runs fused.
            block_scheme(&g),
            scheme(&g, |i| LayerUpdate {
                bias: i >= 2,
                weight_ratio: if i == 2 || i == 4 { 0.5 } else { 0.0 },
                axis: ChannelAxis::Input,
            }),
        ];
        let mut fused_seen = 0;
        for sch in &schemes {
            let st = settings(true, Precision::FpMaster, false);
            let base = run_layout(&g, sch, &st, &Layout::default(), &x, 15).unwrap();
            let cands = crate::autodiff::patch_candidates(&g, sch).unwrap();
            let mut patches = std::vec![None];
            for &last in &cands {
                patches.extend([1, 2, 3, 5].map(|grid| Some((last, grid))));
            }
            let mut layouts = std::vec![];
            for patch in patches {
                // In place, out of place, and out of place with the block backward fused.
                for (in_place, fuse_blocks) in [(true, false), (false, false), (false, true)] {
                    layouts.push(Layout {
                        patch,
                        in_place,
                        fuse_blocks,
                        ..Default::default()
                    });
                }
            }
            for l in &layouts {
                let tg = crate::autodiff::build_with(&g, sch, &st.options, l).unwrap();
                fused_seen += tg
                    .ops
                    .iter()
                    .filter(|o| o.kind == OpKind::BlockBackward)
                    .count();
                let (logits, losses, hw, arena) = run_layout(&g, sch, &st, l, &x, 15).unwrap();
                assert_eq!(logits, base.0, "{l:?}");
                for (a, b) in losses.iter().zip(&base.1) {
                    assert!(
                        (a - b).abs() <= 1e-4 * b.abs().max(1.0),
                        "{l:?}: {a} vs {b}"
                    );
                }
                assert_eq!(hw, arena, "{l:?}");
            }
            // Reordering (fused row updates) and the conventional order train the same numbers.
            let late = run_layout(
                &g,
                sch,
                &settings(false, Precision::FpMaster, false),
                &Layout::default(),
                &x,
                15,
            )
            .unwrap();
            for (a, b) in late.1.iter().zip(&base.1) {
                assert!((a - b).abs() <= 1e-4 * b.abs().max(1.0), "{a} vs {b}");
            }
        }
        assert!(fused_seen > 0);
        // A streamed input: same numbers, the image no longer in the arena.
        {
            let sch = &schemes[1];
            let st = settings(true, Precision::FpMaster, false);
            let base = run_layout(&g, sch, &st, &Layout::default(), &x, 5).unwrap();
            let resident = Layout {
                patch: Some((1, 3)),
                in_place: true,
                ..Default::default()
            };
            let streamed = Layout {
                stream_input: true,
                ..resident
            };
            let r = run_layout(&g, sch, &st, &resident, &x, 5).unwrap();
            let s2 = run_layout(&g, sch, &st, &streamed, &x, 5).unwrap();
            assert_eq!(s2.0, base.0);
            assert_eq!(s2.1, r.1);
            assert_eq!(s2.2, s2.3);
            assert!(s2.3 <= r.3);
            let no_stage = Layout {
                stream_input: true,
                ..Default::default()
            };
            assert!(crate::autodiff::build_with(&g, sch, &st.options, &no_stage).is_err());
        }
        // A residual add (in place into its branch input) and shrinking pointwise convs in place.
        let gs = small_graph();
        let xs = sample(9);
        let fc_only = scheme(&gs, |i| LayerUpdate {
            bias: i == 6,
            weight_ratio: if i == 6 { 1.0 } else { 0.0 },
            axis: ChannelAxis::Output,
        });
        let partial = scheme(&gs, |i| LayerUpdate {
            bias: i >= 2,
            weight_ratio: if i == 2 { 0.5 } else { 0.0 },
            axis: ChannelAxis::Input,
        });
        for (k, sch) in [full(&gs), partial, fc_only].into_iter().enumerate() {
            let st = settings(true, Precision::FpMaster, false);
            let base = run_layout(&gs, &sch, &st, &Layout::default(), &xs, 10).unwrap();
            for shrink_in_place in [false, true] {
                let l = Layout {
                    patch: None,
                    in_place: true,
                    shrink_in_place,
                    ..Default::default()
                };
                let tg = crate::autodiff::build_with(&gs, &sch, &st.options, &l).unwrap();
                let add_in_place = tg.ops.iter().any(|o| {
                    o.kind == OpKind::Forward
                        && o.arg & IN_PLACE != 0
                        && gs.nodes[o.node as usize].kind == (NodeKind::Add { act: Act::None })
                });
                // Adds run in place only in the forward-only prefix (here: when only fc trains).
                assert_eq!(add_in_place, shrink_in_place && k == 2);
                let (logits, losses, hw, arena) = run_layout(&gs, &sch, &st, &l, &xs, 10).unwrap();
                assert_eq!(logits, base.0);
                for (a, b) in losses.iter().zip(&base.1) {
                    assert!(
                        (a - b).abs() <= 1e-4 * b.abs().max(1.0),
                        "{l:?}: {a} vs {b}"
                    );
                }
                assert_eq!(hw, arena);
            }
        }
        let st = settings(true, Precision::FpMaster, false);
        // When only the classifier trains, the forward pass sets the peak: patches cut it.
        let fc_only = classifier_bias(&g);
        let whole = run_layout(&g, &fc_only, &st, &Layout::default(), &x, 1)
            .unwrap()
            .3;
        let patched = run_layout(
            &g,
            &fc_only,
            &st,
            &Layout {
                patch: Some((2, 3)),
                in_place: true,
                shrink_in_place: false,
                ..Default::default()
            },
            &x,
            1,
        )
        .unwrap();
        assert!(patched.3 < whole, "{} vs {whole}", patched.3);
        assert_eq!(patched.2, patched.3);
    }

    /// Forward MACs of the chain graph run with a patch stage `0..=last` on a `grid` x `grid`
    /// grid, counted the slow way: every patch's output rows (columns) walked back through each
    /// window one row at a time, each node computing the span of rows the next one reads.
    fn brute_patch_macs(g: &Graph, last: usize, grid: usize) -> u64 {
        let per_px = |j: usize| g.params[j].as_ref().map_or(0, |p| p.weight.len()) as u64;
        let span = |vertical: bool, o0: usize, o1: usize| -> Vec<usize> {
            // Rows (or columns) of each chain node's output this patch computes.
            let mut counts = std::vec![0usize; last + 1];
            let (mut lo, mut hi) = (o0, o1);
            for j in (0..=last).rev() {
                counts[j] = hi - lo;
                let NodeKind::Conv { win, .. } = g.nodes[j].kind else {
                    unreachable!()
                };
                let t = g.tensors[g.nodes[j].inputs[0]];
                let (k, s, p, n) = if vertical {
                    (win.kh, win.sh, win.pt, t.h as u16)
                } else {
                    (win.kw, win.sw, win.pl, t.w as u16)
                };
                let mut need = std::collections::BTreeSet::new();
                for o in lo..hi {
                    for tap in 0..k {
                        let i = (o * s as usize + tap as usize) as isize - p as isize;
                        if (0..n as isize).contains(&i) {
                            need.insert(i as usize);
                        }
                    }
                }
                lo = *need.first().unwrap();
                hi = *need.last().unwrap() + 1;
            }
            counts
        };
        let out = g.tensors[g.nodes[last].output];
        let mut total = 0u64;
        for py in 0..grid {
            let (y0, y1) = patch_bounds(out.h as usize, grid, py);
            for px in 0..grid {
                let (x0, x1) = patch_bounds(out.w as usize, grid, px);
                if y1 <= y0 || x1 <= x0 {
                    continue;
                }
                let (rows, cols) = (span(true, y0, y1), span(false, x0, x1));
                for j in 0..=last {
                    total += per_px(j) * (rows[j] * cols[j]) as u64;
                }
            }
        }
        total
    }

    #[test]
    fn plans_report_executed_macs_with_recomputed_halos() {
        use crate::autodiff::Layout;
        let g = chain_graph();
        let model: u64 = g
            .nodes
            .iter()
            .zip(&g.params)
            .map(|(n, p)| {
                let w = p.as_ref().map_or(0, |p| p.weight.len()) as u64;
                let o = g.tensors[n.output];
                match n.kind {
                    NodeKind::Conv { .. } => w * o.h as u64 * o.w as u64,
                    _ => w,
                }
            })
            .sum();
        let fc_only = classifier_bias(&g);
        let st = settings(true, Precision::StochasticRounding, false);
        let macs = |l: &Layout| {
            let tg = crate::autodiff::build_with(&g, &fc_only, &st.options, l).unwrap();
            let mp = crate::planner::plan(&tg.buffers, &tg.ops);
            let (plan, _) = crate::plan::encode(&g, &tg, &mp, &st, b"").unwrap();
            PlanView::parse(&plan).unwrap().forward_macs().unwrap()
        };
        let whole = macs(&Layout::default());
        assert_eq!(whole.model, model);
        assert_eq!(whole.executed, model);
        let mut recomputing = 0;
        for last in crate::autodiff::patch_candidates(&g, &fc_only).unwrap() {
            // Up to one output pixel per patch (the stage's outputs are 6x6 or 12x12).
            for grid in 1..=6 {
                let m = macs(&Layout {
                    patch: Some((last, grid)),
                    in_place: true,
                    ..Default::default()
                });
                assert_eq!(m.model, model);
                let stage: u64 = (0..=last)
                    .map(|j| {
                        let o = g.tensors[g.nodes[j].output];
                        g.params[j].as_ref().unwrap().weight.len() as u64 * o.h as u64 * o.w as u64
                    })
                    .sum();
                let want = model - stage + brute_patch_macs(&g, last, grid);
                assert_eq!(m.executed, want, "patch up to {last} on {grid}x{grid}");
                if grid == 1 || last == 0 {
                    assert_eq!(m.executed, model);
                } else if m.executed > model {
                    recomputing += 1;
                }
            }
        }
        // Every multi-conv stage on a real grid recomputes halos (the chain has 3x3 and 5x5 windows).
        assert_eq!(recomputing, 4 * 5);
    }

    #[test]
    fn compute_objective_buys_fewer_macs_with_spare_memory() {
        use crate::autodiff::Layout;
        use crate::plan::{compile_with, Objective, PATCH_GRIDS};
        let g = chain_graph();
        let mut rx = Lcg(3);
        let x: Vec<i8> = (0..3 * 144).map(|_| rx.i8(120)).collect();
        let schemes = [classifier_bias(&g), block_scheme(&g)];
        let st = settings(true, Precision::StochasticRounding, false);
        let executed = |plan: &[u8]| {
            PlanView::parse(plan)
                .unwrap()
                .forward_macs()
                .unwrap()
                .executed
        };
        let run = |c: &crate::plan::Compiled| {
            let mut o = Owned::new(c);
            let mut ex = o.ex();
            ex.init().unwrap();
            let logits = ex.forward(&x).unwrap().to_vec();
            let losses: Vec<u32> = (0..4)
                .map(|_| ex.step(&x, Target::Class(1)).unwrap().to_bits())
                .collect();
            (logits, losses, ex.high_water())
        };
        let mut fewer = 0;
        for (k, sch) in schemes.iter().enumerate() {
            let small = compile(&g, sch, &st, b"").unwrap();
            let base = run(&small);
            // Every layout with a fused block backward the search tries (in place, or out of
            // place with `fuse_blocks`), with its peak and work.
            let mut patches = std::vec![None];
            for last in crate::autodiff::patch_candidates(&g, sch).unwrap() {
                patches.extend(PATCH_GRIDS.map(|grid| Some((last, grid))));
            }
            let mut tried = std::vec![];
            for patch in patches {
                for (in_place, shrink_in_place) in [(true, false), (true, true), (false, false)] {
                    let l = Layout {
                        patch,
                        in_place,
                        shrink_in_place,
                        fuse_blocks: !in_place,
                        ..Default::default()
                    };
                    let Ok(tg) = crate::autodiff::build_with(&g, sch, &st.options, &l) else {
                        continue;
                    };
                    let mp = crate::planner::plan(&tg.buffers, &tg.ops);
                    let (plan, _) = crate::plan::encode(&g, &tg, &mp, &st, b"").unwrap();
                    tried.push((mp.arena_bytes, executed(&plan)));
                }
            }
            let mut budgets: Vec<usize> = tried.iter().map(|t| t.0).collect();
            budgets.push(usize::MAX);
            for budget in budgets {
                let c = compile_with(
                    &g,
                    sch,
                    &st,
                    b"",
                    None,
                    false,
                    Objective::Compute { budget },
                )
                .unwrap();
                let fitting = tried.iter().filter(|t| t.0 <= budget);
                assert_eq!(
                    executed(&c.plan),
                    fitting.map(|t| t.1).min().unwrap(),
                    "budget {budget}"
                );
                assert!(c.memory.arena_bytes <= budget);
                assert!(executed(&c.plan) <= executed(&small.plan));
                // The block scheme's pw2 -> dw3 -> pw4 tail runs its backward fused.
                let fused = c
                    .training
                    .ops
                    .iter()
                    .any(|o| o.kind == OpKind::BlockBackward);
                assert_eq!(fused, k == 1);
                if executed(&c.plan) < executed(&small.plan) {
                    fewer += 1;
                }
                let (logits, losses, hw) = run(&c);
                assert_eq!(logits, base.0);
                assert_eq!(losses, base.1);
                assert_eq!(hw, c.memory.arena_bytes);
            }
            // Nothing fits: the smallest peak of the layouts searched (the fused out-of-place ones
            // among them, which the memory objective does not try, may go below its choice).
            let none = compile_with(
                &g,
                sch,
                &st,
                b"",
                None,
                false,
                Objective::Compute { budget: 1 },
            )
            .unwrap();
            let smallest = tried.iter().map(|t| t.0).min().unwrap();
            assert_eq!(
                none.memory.arena_bytes,
                smallest.min(small.memory.arena_bytes)
            );
        }
        assert!(fewer >= 2, "{fewer}");
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(300))]
        #[test]
        fn mutated_plans_never_panic(flips in proptest::collection::vec((0usize..100_000, proptest::prelude::any::<u8>()), 1..6), fix_crc in proptest::prelude::any::<bool>()) {
            let g = small_graph();
            let c = compile(&g, &full(&g), &settings(true, Precision::StochasticRounding, false), b"").unwrap();
            let mut p = c.plan.clone();
            for (at, v) in flips {
                let i = at % p.len();
                p[i] = v;
            }
            if fix_crc && p.len() > crate::plan::HEADER_LEN {
                // Re-seal the body so mutations reach the validation behind the CRC.
                let crc = crate::crc::crc32(&p[crate::plan::HEADER_LEN..]);
                p[12..16].copy_from_slice(&crc.to_le_bytes());
            }
            let pw: Vec<u32> = c.params.chunks(4).map(|b| { let mut a = [0u8; 4]; a[..b.len()].copy_from_slice(b); u32::from_le_bytes(a) }).collect();
            let pb: &[u8] = unsafe { core::slice::from_raw_parts(pw.as_ptr() as *const u8, c.params.len()) };
            let mut aw = std::vec![0u32; 4096];
            let arena: &mut [u8] = unsafe { core::slice::from_raw_parts_mut(aw.as_mut_ptr() as *mut u8, 16384) };
            if let Ok(mut ex) = Executor::new(&p, pb, arena) {
                let _ = ex.init();
                let _ = ex.step(&sample(1), Target::Class(1));
                let _ = ex.predict(&sample(2));
            }
        }

        #[test]
        fn mutated_layout_plans_never_panic(flips in proptest::collection::vec((0usize..100_000, proptest::prelude::any::<u8>()), 1..6), stream in proptest::prelude::any::<bool>()) {
            // Patch stage, in-place ops and the fused block backward behind a re-sealed CRC.
            use crate::autodiff::Layout;
            let g = chain_graph();
            let sch = block_scheme(&g);
            let st = settings(true, Precision::StochasticRounding, false);
            let layout = Layout { patch: Some((1, 3)), in_place: true, shrink_in_place: true, stream_input: stream, ..Default::default() };
            let tg = crate::autodiff::build_with(&g, &sch, &st.options, &layout).unwrap();
            let mp = crate::planner::plan(&tg.buffers, &tg.ops);
            let (plan, params) = crate::plan::encode(&g, &tg, &mp, &st, b"").unwrap();
            let mut p = plan.clone();
            for (at, v) in flips {
                let i = at % p.len();
                p[i] = v;
            }
            let crc = crate::crc::crc32(&p[crate::plan::HEADER_LEN..]);
            p[12..16].copy_from_slice(&crc.to_le_bytes());
            let pw: Vec<u32> = params.chunks(4).map(|b| { let mut a = [0u8; 4]; a[..b.len()].copy_from_slice(b); u32::from_le_bytes(a) }).collect();
            let pb: &[u8] = unsafe { core::slice::from_raw_parts(pw.as_ptr() as *const u8, params.len()) };
            let mut aw = std::vec![0u32; 8192];
            let arena: &mut [u8] = unsafe { core::slice::from_raw_parts_mut(aw.as_mut_ptr() as *mut u8, 32768) };
            let mut rx = Lcg(5);
            let x: Vec<i8> = (0..3 * 144).map(|_| rx.i8(120)).collect();
            if let Ok(mut ex) = Executor::new(&p, pb, arena) {
                let _ = ex.init();
                let _ = ex.step(&x, Target::Class(1));
                let _ = ex.predict(&x);
            }
        }

        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..400)) {
            let _ = PlanView::parse(&bytes);
        }
    }
}

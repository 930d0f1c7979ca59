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
use crate::ir::{BufKind, OpKind, Precision, ACCUMULATE, IN_PLACE, NONE};
use crate::ops::conv::Conv2dGeom;
use crate::ops::geom::Weights;
use crate::ops::pool::Pool2dGeom;
use crate::ops::{ChannelSelection, WeightShape, BIAS_LIMIT};
use crate::plan::{LayerRec, NodeRec, OpRec, PlanView, TensorRec, NODE_ADD, NODE_CONV, NODE_FC};
use crate::qas::XorShift32;
use crate::quant::{activation_range, Activation, QParams, Requant};
use crate::{Error, Result};

mod backward;
mod block;
mod forward;
mod patch;
#[cfg(test)]
mod tests;
mod update;

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

/// What every op of a node starts from: the node, its (first) input and output tensors with
/// their quantization and element counts, its output's activation range and its layer.
#[derive(Clone, Copy)]
struct NodeCtx {
    n: NodeRec,
    inp: TensorRec,
    out: TensorRec,
    in_q: QParams,
    out_q: QParams,
    amin: i8,
    amax: i8,
    ni: usize,
    no: usize,
    layer: Option<LayerRec>,
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
            if let Some(l) = self.run_op(i, op, target, input)? {
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
                self.run_op(i, op, Target::Class(0), input)?;
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
    /// Runs op `index` of the plan: the family file of its kind does the work. The large
    /// handlers stay separate functions and the small ones are inlined here (their
    /// `#[inline]` attributes): of the splits tried, the one whose firmware is closest to the
    /// single-function executor's flash (MCUNet-5FPS's firmware is within 2 KB of 1 MB).
    fn run_op(
        &mut self,
        index: usize,
        op: OpRec,
        target: Target<'_>,
        input: &[i8],
    ) -> Result<Option<f32>> {
        let OpRec {
            kind,
            node,
            arg,
            bufs,
        } = op;
        let cx = self.node_ctx(node)?;
        let in_place = arg & IN_PLACE != 0;
        match kind {
            OpKind::Forward if in_place && cx.n.kind == NODE_ADD => {
                self.add_in_place(&cx, arg, bufs)?
            }
            OpKind::Forward if in_place => self.conv_in_place(&cx, bufs)?,
            OpKind::Forward => self.forward_node(&cx, bufs)?,
            OpKind::PatchStage => self.patch_stage(node as usize, arg, bufs, input)?,
            OpKind::BlockOperands => {}
            OpKind::BlockBackward => self.block_backward(index, node as usize, arg, bufs)?,
            OpKind::WeightStep => self.weight_step(&cx, bufs)?,
            OpKind::SaveChannels => self.save_channels(&cx, bufs)?,
            OpKind::Mask => self.mask(&cx, bufs)?,
            OpKind::Loss => return self.loss(&cx, arg, bufs, target).map(Some),
            OpKind::ApplyMask => self.apply_mask(&cx, bufs)?,
            OpKind::BackInput if in_place => self.back_input_in_place(&cx, bufs)?,
            OpKind::BackInput => self.back_input(&cx, arg, bufs)?,
            OpKind::BackWeight => self.back_weight(&cx, arg, bufs)?,
            OpKind::BackBias => self.back_bias(&cx, arg, bufs)?,
            OpKind::Update => self.update(&cx, bufs)?,
        }
        Ok(None)
    }

    /// What every op of `node` starts from.
    fn node_ctx(&self, node: u32) -> Result<NodeCtx> {
        let pv = self.plan;
        let n = pv.node(node as usize)?;
        let (inp, out) = self.io(&n)?;
        let (in_q, out_q) = (qp(&inp), qp(&out));
        let (amin, amax) = activation_range(act_of(n.act), out_q);
        let layer = if n.layer != NONE {
            Some(pv.layer(n.layer as usize)?)
        } else {
            None
        };
        Ok(NodeCtx {
            n,
            inp,
            out,
            in_q,
            out_q,
            amin,
            amax,
            ni: inp.numel(),
            no: out.numel(),
            layer,
        })
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

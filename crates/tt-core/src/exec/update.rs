//! The SGD update: a layer's whole update (`Update`), the fused weight step that updates each
//! trained row as soon as its gradient exists (`WeightStep`), the update phase of an
//! accumulation plan, and the one cursor that hands every updated row its learned state.
use super::{view, view_mut, Executor, NodeCtx, Target, ALL};
use crate::ir::{OpKind, Precision, ACCUMULATE, NONE};
use crate::ops::split::weight_grad_row;
use crate::ops::{ChannelSelection, WeightShape};
use crate::qas::{sgd_update_bias, sgd_update_weights, SgdConfig, UpdateState, XorShift32};
use crate::{Error, Result};

/// The learned state of one layer's trained weights, handed out row after row in weight order:
/// each row's momentum (when the update uses it) and the precision state the plan keeps (its
/// residual, its fp32 master copy, or the layer-shared stochastic-rounding generator, loaded
/// from and written back to the plan's generator bytes by [`Self::finish`]).
pub(super) struct PrecisionCursor<'s> {
    precision: Precision,
    momentum: Option<&'s mut [f32]>,
    residual: &'s mut [i8],
    master: &'s mut [f32],
    rng: XorShift32,
    rng_bytes: &'s mut [u8],
}

impl<'s> PrecisionCursor<'s> {
    /// Views a layer's precision state `sp`, momentum `mw` and generator bytes `rb`. With
    /// `active` false (no trained row) nothing is viewed; a missing generator is an error
    /// naming `rng_field` only when an active stochastic-rounding update needs it.
    pub(super) fn new(
        precision: Precision,
        with_momentum: bool,
        active: bool,
        [sp, mw, rb]: [&'s mut [u8]; 3],
        rng_field: &'static str,
    ) -> Result<Self> {
        let momentum = if with_momentum && active {
            Some(view_mut(mw, "momentum")?)
        } else {
            None
        };
        let (mut residual, mut master): (&mut [i8], &mut [f32]) = (&mut [], &mut []);
        if active {
            match precision {
                Precision::Residual => residual = view_mut(sp, "residual")?,
                Precision::FpMaster => master = view_mut(sp, "master copy")?,
                Precision::StochasticRounding => {}
            }
        }
        let rng = match rb.get(..4) {
            Some(b) => XorShift32 {
                state: u32::from_le_bytes([b[0], b[1], b[2], b[3]]),
            },
            None if active && precision == Precision::StochasticRounding => {
                return Err(Error::CorruptPlan { field: rng_field })
            }
            None => XorShift32::new(1),
        };
        Ok(PrecisionCursor {
            precision,
            momentum,
            residual,
            master,
            rng,
            rng_bytes: rb,
        })
    }

    /// The state of the next `n` weights (`usize::MAX`: all that are left).
    pub(super) fn next(&mut self, n: usize) -> (Option<&'s mut [f32]>, UpdateState<'_>) {
        fn take<'s, T>(s: &mut &'s mut [T], n: usize) -> &'s mut [T] {
            let k = n.min(s.len());
            let (a, rest) = core::mem::take(s).split_at_mut(k);
            *s = rest;
            a
        }
        let momentum = self.momentum.as_mut().map(|m| take(m, n));
        let state = match self.precision {
            Precision::StochasticRounding => UpdateState::StochasticRounding(&mut self.rng),
            Precision::Residual => UpdateState::Residual(take(&mut self.residual, n)),
            Precision::FpMaster => UpdateState::FpMaster(take(&mut self.master, n)),
        };
        (momentum, state)
    }

    /// Writes the generator back (when the plan has one), whether or not the rows' updates
    /// succeeded: the draws already made are spent.
    pub(super) fn finish(self) {
        if let Some(b) = self.rng_bytes.get_mut(..4) {
            b.copy_from_slice(&self.rng.state.to_le_bytes());
        }
    }
}

/// The momentum buffer of a bias update, when the update uses momentum.
pub(super) fn bias_momentum(with_momentum: bool, mb: &mut [u8]) -> Result<Option<&mut [f32]>> {
    Ok(if with_momentum {
        Some(view_mut(mb, "momentum")?)
    } else {
        None
    })
}

impl Executor<'_, '_> {
    /// The SGD hyper-parameters of this step.
    pub(super) fn sgd(&self) -> SgdConfig {
        SgdConfig {
            lr: self.lr,
            momentum: self.momentum,
            qas: self.qas,
        }
    }

    /// Whether the update uses momentum; an error when it should but the plan has no buffers.
    pub(super) fn with_momentum(&self) -> Result<bool> {
        let with_m = self.momentum != 0.0;
        if with_m && !self.plan.globals.momentum_buffers {
            return Err(Error::InvalidParameter {
                what: "executor: momentum > 0 needs a plan compiled with momentum buffers",
            });
        }
        Ok(with_m)
    }

    /// A layer's weight gradient, row by row, each row updated as soon as it exists: the whole
    /// gradient is never stored.
    #[inline(never)]
    pub(super) fn weight_step(&mut self, cx: &NodeCtx, bufs: [u32; 4]) -> Result<()> {
        let NodeCtx {
            n,
            inp,
            out,
            in_q,
            no,
            layer,
            ..
        } = *cx;
        let pv = self.plan;
        let cfg = self.sgd();
        let l = layer.ok_or(Error::CorruptPlan {
            field: "nodes.layer",
        })?;
        let (_, _, ws, _) = self.frozen(&l)?;
        let g = Self::conv_geom(&n, &inp, &out)?;
        let (shape, _, rows) = Self::trained_shape(&g, &l);
        let with_m = self.with_momentum()?;
        let xc = if l.axis == 0 {
            g.in_c
        } else {
            l.channels as usize
        };
        let xn = g.in_h * g.in_w * xc;
        let [go, x, row, sw, sp, mw, rb] = self.carve_t(
            [
                bufs[0],
                bufs[1],
                bufs[2],
                l.st_weight,
                l.st_precision,
                l.st_momentum_w,
                pv.globals.rng,
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
        let mut cursor = PrecisionCursor::new(
            pv.globals.precision,
            with_m,
            true,
            [sp, mw, rb],
            "globals.rng",
        )?;
        let row_shape = WeightShape {
            out_c: 1,
            taps: shape.taps,
            in_per_group: shape.in_per_group,
            groups: 1,
        };
        let mut result = Ok(());
        for o in 0..rows {
            weight_grad_row(&g, l.axis, o, go, x, xc, in_q, row);
            let (m, state) = cursor.next(per_row);
            result = sgd_update_weights(
                &mut w[o * per_row..][..per_row],
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
        cursor.finish();
        result
    }

    /// A layer's whole update from its stored weight and bias gradients.
    #[inline(never)]
    pub(super) fn update(&mut self, cx: &NodeCtx, bufs: [u32; 4]) -> Result<()> {
        let NodeCtx {
            n,
            inp,
            out,
            in_q,
            layer,
            ..
        } = *cx;
        let pv = self.plan;
        let cfg = self.sgd();
        let l = layer.ok_or(Error::CorruptPlan {
            field: "nodes.layer",
        })?;
        let (_, _, ws, _) = self.frozen(&l)?;
        let g = Self::conv_geom(&n, &inp, &out)?;
        let with_m = self.with_momentum()?;
        let [gw, gb, sw, sb, sp, mw, mb, rb] = self.carve([
            bufs[0],
            bufs[1],
            l.st_weight,
            l.st_bias,
            l.st_precision,
            l.st_momentum_w,
            l.st_momentum_b,
            if bufs[0] != NONE {
                pv.globals.rng
            } else {
                NONE
            },
        ])?;
        if bufs[0] != NONE {
            let (shape, sel, rows) = Self::trained_shape(&g, &l);
            let w: &mut [i8] = view_mut(sw, "trained weights")?;
            let gw: &[f32] = view(gw, "weight gradient")?;
            let scales = ws.get(..rows).ok_or(Error::CorruptPlan {
                field: "layers.channels",
            })?;
            let mut cursor = PrecisionCursor::new(
                pv.globals.precision,
                with_m,
                true,
                [sp, mw, rb],
                "buffers.bytes (rng)",
            )?;
            let (m, state) = cursor.next(usize::MAX);
            let r = sgd_update_weights(w, &shape, scales, sel, gw, &cfg, m, state);
            cursor.finish();
            r?;
        }
        if bufs[1] != NONE {
            let b: &mut [i32] = view_mut(sb, "trained bias")?;
            let gb: &[f32] = view(gb, "bias gradient")?;
            sgd_update_bias(b, ws, in_q.scale, gb, &cfg, bias_momentum(with_m, mb)?)?;
        }
        Ok(())
    }

    pub(super) fn update_phase(&mut self, scale: f32) -> Result<()> {
        // Every accumulator is checked before any weight moves: a skipped batch leaves them all.
        for i in 0..self.plan.n_ops {
            let op = self.plan.op(i)?;
            if op.kind == OpKind::Update && op.arg & ACCUMULATE != 0 {
                let [a, b] = self.carve([op.bufs[0], op.bufs[1]])?;
                let (a, b): (&[f32], &[f32]) = (view(a, "accumulator")?, view(b, "accumulator")?);
                if !(crate::quant::all_finite(a) && crate::quant::all_finite(b)) {
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
                self.run_op(i, op, Target::Class(0), &[])?;
            }
        }
        Ok(())
    }

    pub(super) fn zero_accumulated(&mut self) -> Result<()> {
        for i in 0..self.plan.n_buffers {
            if self.plan.buffer(i)?.kind.accumulator() {
                let [a] = self.carve([i as u32])?;
                a.fill(0);
            }
        }
        Ok(())
    }
}

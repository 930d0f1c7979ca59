//! Backward ops: saved input channels, activation masks, the loss, and the input, weight and
//! bias gradients of every node kind (in place for depthwise convs).
use super::{view, view_mut, Executor, NodeCtx, Target, ALL};
use crate::ir::{LossKind, ACCUMULATE, NONE};
use crate::ops::act::{clamp_mask_apply_bits, clamp_mask_pack};
use crate::ops::conv::{conv2d_backward_bias, conv2d_backward_input, conv2d_backward_weight};
use crate::ops::fc::{fc_backward_bias, fc_backward_input, fc_backward_weight, FcGeom};
use crate::ops::geom::Weights;
use crate::ops::inplace::dw_backward_in_place;
use crate::ops::loss::{mse, softmax_cross_entropy};
use crate::ops::pool::{avgpool_backward, global_avgpool_backward};
use crate::ops::save_input_channels;
use crate::ops::split::split_backward_input;
use crate::plan::{NODE_ADD, NODE_AVGPOOL, NODE_CONV, NODE_FC, NODE_GAP};
use crate::{Error, Result};

impl Executor<'_, '_> {
    /// The first `l.channels` input channels of a trained layer, kept for its weight gradient.
    #[inline(always)]
    pub(super) fn save_channels(&mut self, cx: &NodeCtx, bufs: [u32; 4]) -> Result<()> {
        let NodeCtx {
            n, inp, ni, layer, ..
        } = *cx;
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
        Ok(())
    }

    /// The packed clamp mask of an output, kept for the backward instead of the output.
    #[inline(always)]
    pub(super) fn mask(&mut self, cx: &NodeCtx, bufs: [u32; 4]) -> Result<()> {
        let NodeCtx { amin, amax, no, .. } = *cx;
        let [y, m] = self.carve_t([bufs[0], bufs[1]], [no, ALL])?;
        clamp_mask_pack(view(y, "masked output")?, amin, amax, m)?;
        Ok(())
    }

    /// The loss of the output against `target` and its gradient.
    #[inline(never)]
    pub(super) fn loss(
        &mut self,
        cx: &NodeCtx,
        arg: u32,
        bufs: [u32; 4],
        target: Target<'_>,
    ) -> Result<f32> {
        let NodeCtx { out_q, no, .. } = *cx;
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
        Ok(l)
    }

    /// A gradient through a stored clamp mask.
    #[inline(always)]
    pub(super) fn apply_mask(&mut self, cx: &NodeCtx, bufs: [u32; 4]) -> Result<()> {
        let NodeCtx { no, .. } = *cx;
        let [gr, m] = self.carve_t([bufs[0], bufs[1]], [4 * no, ALL])?;
        clamp_mask_apply_bits(m, view_mut(gr, "gradient")?)?;
        Ok(())
    }

    /// A depthwise conv's input gradient written over its output gradient.
    #[inline(always)]
    pub(super) fn back_input_in_place(&mut self, cx: &NodeCtx, bufs: [u32; 4]) -> Result<()> {
        let NodeCtx {
            n, inp, out, layer, ..
        } = *cx;
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
        Ok(())
    }

    /// The input gradient of node input `arg & 0xFF` (added to it with `ACCUMULATE`).
    #[inline(never)]
    pub(super) fn back_input(&mut self, cx: &NodeCtx, arg: u32, bufs: [u32; 4]) -> Result<()> {
        let NodeCtx {
            n,
            inp,
            out,
            ni,
            no,
            layer,
            ..
        } = *cx;
        let pv = self.plan;
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
            return Ok(());
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
            NODE_GAP => {
                global_avgpool_backward(inp.h as usize, inp.w as usize, inp.c as usize, go, dst)?
            }
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
        Ok(())
    }

    /// The weight gradient of the trained channels (zeroed first unless `ACCUMULATE`).
    #[inline(always)]
    pub(super) fn back_weight(&mut self, cx: &NodeCtx, arg: u32, bufs: [u32; 4]) -> Result<()> {
        let NodeCtx {
            n,
            inp,
            out,
            in_q,
            ni,
            no,
            layer,
            ..
        } = *cx;
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
        Ok(())
    }

    /// The bias gradient (zeroed first unless `ACCUMULATE`).
    #[inline(always)]
    pub(super) fn back_bias(&mut self, cx: &NodeCtx, arg: u32, bufs: [u32; 4]) -> Result<()> {
        let NodeCtx {
            n, inp, out, no, ..
        } = *cx;
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
        Ok(())
    }
}

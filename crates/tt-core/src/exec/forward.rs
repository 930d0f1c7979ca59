//! Forward ops: convs and fully connected layers (weights whole, in SRAM or split), residual
//! adds, pools, and the in-place forms that write a layer's output over its input.
use super::{qp, view, view_mut, Executor, NodeCtx, ALL};
use crate::ir::NONE;
use crate::ops::add::{requant_each, AddParams, AddTerms};
use crate::ops::conv::{conv2d_depthwise_in_place_plane, conv2d_forward};
use crate::ops::fc::{fc_forward, FcGeom};
use crate::ops::geom::Weights;
use crate::ops::inplace::pw_forward_in_place;
use crate::ops::pool::{avgpool_forward, global_avgpool_forward, maxpool_forward};
use crate::ops::split::split_forward;
use crate::plan::{NODE_ADD, NODE_AVGPOOL, NODE_CONV, NODE_FC, NODE_GAP, NODE_MAXPOOL};
use crate::{Error, Result};

impl Executor<'_, '_> {
    /// The in-place add: the output overwrites input `arg & 1`, element by element.
    #[inline(never)]
    pub(super) fn add_in_place(&mut self, cx: &NodeCtx, arg: u32, bufs: [u32; 4]) -> Result<()> {
        let NodeCtx {
            n,
            in_q,
            out_q,
            amin,
            amax,
            ni,
            no,
            ..
        } = *cx;
        let pv = self.plan;
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
        Ok(())
    }

    /// A depthwise or pointwise conv whose output overwrites its input.
    #[inline(always)]
    pub(super) fn conv_in_place(&mut self, cx: &NodeCtx, bufs: [u32; 4]) -> Result<()> {
        let NodeCtx {
            n,
            inp,
            out,
            in_q,
            out_q,
            amin,
            amax,
            layer,
            ..
        } = *cx;
        let l = layer.ok_or(Error::CorruptPlan {
            field: "nodes.layer",
        })?;
        let (fw, fb, _, rq) = self.frozen(&l)?;
        let g = Self::conv_geom(&n, &inp, &out)?;
        if n.kind != NODE_CONV
            || !(g.is_depthwise() || g.is_pointwise())
            || bufs[0] != bufs[2]
            || (g.is_depthwise() && l.st_weight != NONE)
        {
            return Err(Error::CorruptPlan {
                field: "ops (in-place forward of this conv)",
            });
        }
        let [buf, plane, sb, sw] = self.carve([bufs[0], bufs[3], l.st_bias, l.st_weight])?;
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
        Ok(())
    }

    /// The forward of one node into its own output buffer.
    #[inline(never)]
    pub(super) fn forward_node(&mut self, cx: &NodeCtx, bufs: [u32; 4]) -> Result<()> {
        let NodeCtx {
            n,
            inp,
            out,
            in_q,
            out_q,
            amin,
            amax,
            ni,
            no,
            layer,
        } = *cx;
        let pv = self.plan;
        match n.kind {
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
        }
        Ok(())
    }
}

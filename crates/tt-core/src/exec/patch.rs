//! The patch stage: a chain of frozen convs at the network's start run patch by patch.
use super::{act_of, qp, view, view_mut, Executor, ALL};
use crate::ir::{patch_bounds, patch_ranges, MAX_PATCH_CHAIN, MAX_PATCH_GRID, NONE};
use crate::ops::conv::{conv2d_forward, Conv2dGeom};
use crate::quant::activation_range;
use crate::{Error, Result};

impl Executor<'_, '_> {
    /// Runs nodes `first..=last` (a chain of frozen convs) patch by patch: each output patch is
    /// computed from its receptive field, halos recomputed, through two small ping-pong buffers,
    /// so only the stage's input and output tensors are ever whole.
    #[inline(never)]
    pub(super) fn patch_stage(
        &mut self,
        first: usize,
        arg: u32,
        bufs: [u32; 4],
        input: &[i8],
    ) -> Result<()> {
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

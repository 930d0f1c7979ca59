//! The fused backward of an inverted-residual tail (pw1 -> depthwise -> pw2), one expanded
//! channel at a time, with pw1's trained rows updated as their gradients appear.
use super::update::{bias_momentum, PrecisionCursor};
use super::{view, view_mut, Executor, ALL};
use crate::ir::{OpKind, NONE};
use crate::ops::inplace::dw_plane_input_grad;
use crate::ops::{ChannelSelection, WeightShape};
use crate::plan::NODE_CONV;
use crate::qas::{sgd_update_bias, sgd_update_weights};
use crate::{Error, Result};

/// Weights per block the fused block backward stages as f32 (1 KB of stack).
const STAGE_F32: usize = 256;

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

impl Executor<'_, '_> {
    /// Backward of an inverted-residual tail pw1 -> depthwise -> pw2, one expanded channel at a
    /// time: pw2's input gradient for channel c, the depthwise mask, bias gradient and input
    /// gradient, pw1's mask and bias gradient, pw1's input gradient (with the weights before this
    /// step's update) and pw1's weight row c, updated at once. The expanded tensors' fp32
    /// gradients never exist whole; the numbers are those of the unfused ops.
    #[inline(never)]
    pub(super) fn block_backward(
        &mut self,
        index: usize,
        pw2: usize,
        arg: u32,
        bufs: [u32; 4],
    ) -> Result<()> {
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
        if !g1.is_pointwise() || !g2.is_pointwise() || !gd.is_depthwise() || ld.st_weight != NONE {
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
        let with_m = self.with_momentum()?;
        let cfg = self.sgd();
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
        let mut cursor = PrecisionCursor::new(
            pv.globals.precision,
            with_m,
            rows > 0,
            [sp, mw1, rb],
            "globals.rng",
        )?;
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
                let (mslice, state) = cursor.next(cols);
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
        cursor.finish();
        result?;
        if ld.st_bias != NONE {
            let mom = bias_momentum(with_m, mbd)?;
            sgd_update_bias(view_mut(bd, "trained bias")?, wsd, t1.scale, dbg, &cfg, mom)?;
        }
        if l1.st_bias != NONE {
            let mom = bias_momentum(with_m, mb1)?;
            sgd_update_bias(view_mut(b1, "trained bias")?, ws1, t0.scale, b1g, &cfg, mom)?;
        }
        Ok(())
    }
}

//! Straightforward references for the kernel tests: integer references for forward ops (i64
//! accumulation, exact rational requantization) and f64 float references for backward ops.
//! Written for clarity, not speed, and independently of the kernels' loop structure.
#![allow(dead_code)]
use proptest::prelude::*;
use tt_core::ops::conv::Conv2dGeom;
use tt_core::quant::{Requant, Rounding};

/// Deterministic data from a proptest-chosen seed (splitmix64).
pub struct Seeded(pub u64);

impl Seeded {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    pub fn i8s(&mut self, n: usize, lo: i32, hi: i32) -> Vec<i8> {
        (0..n).map(|_| self.int(lo, hi) as i8).collect()
    }
    pub fn int(&mut self, lo: i32, hi: i32) -> i32 {
        lo + (self.next() % (hi - lo + 1) as u64) as i32
    }
    pub fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
    pub fn f32s(&mut self, n: usize, lo: f64, hi: f64) -> Vec<f32> {
        (0..n)
            .map(|_| (lo + (hi - lo) * self.unit()) as f32)
            .collect()
    }
}

/// `round(acc * m * 2^(shift - 31))`, half away from zero, computed exactly in i128.
/// `round(acc * m)` as `rq`'s rounding mode defines it.
pub fn ref_requant(acc: i64, rq: Requant) -> i64 {
    if rq.mode() == Rounding::Double {
        return ref_requant_gemmlowp(acc, rq);
    }
    let num = acc as i128 * rq.multiplier as i128;
    let den = 1i128 << (31 - rq.shift);
    let r = (2 * num.abs() + den) / (2 * den);
    if num < 0 {
        -(r as i64)
    } else {
        r as i64
    }
}

/// gemmlowp's double rounding, spelled differently from tt-core: its high multiply (nudge, then
/// truncating division) is `floor((x * m + 2^30) / 2^31)`, i.e. ties towards +inf; the shift
/// that follows rounds ties away from zero. An int32 left shift saturates.
pub fn ref_requant_gemmlowp(acc: i64, rq: Requant) -> i64 {
    let shift = rq.shift as i32;
    let x = (acc << shift.max(0)).clamp(i32::MIN as i64, i32::MAX as i64) as i128;
    let high = (x * rq.multiplier as i128 + (1 << 30)).div_euclid(1 << 31);
    let right = -shift.min(0);
    let d = 1i128 << right;
    let r = (2 * high.abs() + d) / (2 * d);
    (if high < 0 { -r } else { r }) as i64
}

pub fn ref_finish(v: i64, out_zp: i32, lo: i8, hi: i8) -> i8 {
    (v + out_zp as i64).clamp(lo as i64, hi as i64) as i8
}

/// Input pixel index for output position `o`, tap `k`, or None when it falls in the padding.
pub fn src(o: usize, k: usize, stride: usize, pad: usize, n: usize) -> Option<usize> {
    let i = (o * stride + k) as i64 - pad as i64;
    if i >= 0 && (i as usize) < n {
        Some(i as usize)
    } else {
        None
    }
}

/// Integer conv: `acc[oy][ox][oc] = bias + sum (x - x_zp) * (w - w_zp)`, padding excluded.
pub fn ref_conv_acc(
    g: &Conv2dGeom,
    x: &[i8],
    x_zp: i32,
    w: &[i8],
    w_zp: &[i32],
    bias: &[i32],
) -> Vec<i64> {
    let (icg, ocg) = (g.in_c / g.groups, g.out_c / g.groups);
    let mut out = Vec::new();
    for oy in 0..g.out_h() {
        for ox in 0..g.out_w() {
            for oc in 0..g.out_c {
                let grp = oc / ocg;
                let wz = if w_zp.len() == 1 { w_zp[0] } else { w_zp[oc] } as i64;
                let mut acc = if bias.is_empty() { 0 } else { bias[oc] as i64 };
                for ky in 0..g.kh {
                    for kx in 0..g.kw {
                        let (Some(iy), Some(ix)) = (
                            src(oy, ky, g.stride_h, g.pad_top, g.in_h),
                            src(ox, kx, g.stride_w, g.pad_left, g.in_w),
                        ) else {
                            continue;
                        };
                        for ic in 0..icg {
                            let xv = x[(iy * g.in_w + ix) * g.in_c + grp * icg + ic] as i64;
                            let wv = w[((oc * g.kh + ky) * g.kw + kx) * icg + ic] as i64;
                            acc += (xv - x_zp as i64) * (wv - wz);
                        }
                    }
                }
                out.push(acc);
            }
        }
    }
    out
}

/// Float conv on real values (no bias): `y = sum x * w`.
pub fn ref_conv_f64(g: &Conv2dGeom, x: &[f64], w: &[f64]) -> Vec<f64> {
    let (icg, ocg) = (g.in_c / g.groups, g.out_c / g.groups);
    let mut out = vec![0.0; g.out_h() * g.out_w() * g.out_c];
    for oy in 0..g.out_h() {
        for ox in 0..g.out_w() {
            for oc in 0..g.out_c {
                let grp = oc / ocg;
                let mut acc = 0.0;
                for ky in 0..g.kh {
                    for kx in 0..g.kw {
                        let (Some(iy), Some(ix)) = (
                            src(oy, ky, g.stride_h, g.pad_top, g.in_h),
                            src(ox, kx, g.stride_w, g.pad_left, g.in_w),
                        ) else {
                            continue;
                        };
                        for ic in 0..icg {
                            acc += x[(iy * g.in_w + ix) * g.in_c + grp * icg + ic]
                                * w[((oc * g.kh + ky) * g.kw + kx) * icg + ic];
                        }
                    }
                }
                out[(oy * g.out_w() + ox) * g.out_c + oc] = acc;
            }
        }
    }
    out
}

pub fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Central difference of `f` at `x` along every coordinate in `idx`.
pub fn numeric_grad(x: &[f64], idx: &[usize], h: f64, f: impl Fn(&[f64]) -> f64) -> Vec<f64> {
    let mut x = x.to_vec();
    idx.iter()
        .map(|&i| {
            let v = x[i];
            x[i] = v + h;
            let up = f(&x);
            x[i] = v - h;
            let down = f(&x);
            x[i] = v;
            (up - down) / (2.0 * h)
        })
        .collect()
}

/// `||a - b|| / max(||b||, floor)`: the relative error the backward tests state.
pub fn rel_err(a: &[f32], b: &[f64], floor: f64) -> f64 {
    let num: f64 = a
        .iter()
        .zip(b)
        .map(|(x, y)| (*x as f64 - y).powi(2))
        .sum::<f64>()
        .sqrt();
    let den: f64 = b.iter().map(|y| y * y).sum::<f64>().sqrt();
    num / den.max(floor)
}

pub fn general_geom() -> impl Strategy<Value = Conv2dGeom> {
    (
        (1usize..=8, 1usize..=8, 1usize..=3, 1usize..=4, 1usize..=4),
        (1usize..=4, 1usize..=4, 1usize..=3, 1usize..=3),
        (0usize..=2, 0usize..=2, 0usize..=2, 0usize..=2),
    )
        .prop_filter_map(
            "valid geometry",
            |((h, w, gr, icg, ocg), (kh, kw, sh, sw), (pt, pl, pb, pr))| {
                Conv2dGeom::new(h, w, gr * icg, gr * ocg, kh, kw, sh, sw, pt, pl, pb, pr, gr).ok()
            },
        )
}

pub fn depthwise_geom() -> impl Strategy<Value = Conv2dGeom> {
    (
        (1usize..=9, 1usize..=9, 1usize..=40),
        prop_oneof![4 => 1usize..=5, 1 => Just(9usize)],
        prop_oneof![4 => 1usize..=5, 1 => Just(9usize)],
        (1usize..=2, 1usize..=2),
        (0usize..=2, 0usize..=2, 0usize..=2, 0usize..=2),
    )
        .prop_filter_map(
            "valid geometry",
            |((h, w, c), kh, kw, (sh, sw), (pt, pl, pb, pr))| {
                Conv2dGeom::new(h, w, c, c, kh, kw, sh, sw, pt, pl, pb, pr, c).ok()
            },
        )
}

pub fn pointwise_geom() -> impl Strategy<Value = Conv2dGeom> {
    (1usize..=6, 1usize..=6, 1usize..=48, 1usize..=48).prop_map(|(h, w, ci, co)| {
        Conv2dGeom::new(h, w, ci, co, 1, 1, 1, 1, 0, 0, 0, 0, 1).unwrap()
    })
}

pub fn any_geom() -> impl Strategy<Value = Conv2dGeom> {
    prop_oneof![general_geom(), depthwise_geom(), pointwise_geom()]
}

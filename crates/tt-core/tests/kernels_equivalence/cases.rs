//! Every kernel with a DSP path against its portable twin (`tt_core::ops::portable`), on random
//! geometries and quantizations: the outputs must be equal bit for bit. One source, two runners:
//! the host test `tests/kernels_equivalence.rs` (where both sides are the same code, so it
//! checks that the suite builds and runs) and the QEMU firmware
//! `tt-mcu/examples/qemu-mps2-an386/src/bin/kernel_equivalence.rs` (Cortex-M4F, where the
//! dispatchers take their DSP paths). `no_std`, no allocation: the runner owns the buffers.
// A mismatch carries its geometry by value: the firmware runner has no allocator to box it.
#![allow(clippy::result_large_err)]

use tt_core::ops::act::clamp_mask_pack;
use tt_core::ops::add::{add_forward, AddParams};
use tt_core::ops::conv::{conv2d_depthwise_in_place_plane, conv2d_forward, Conv2dGeom};
use tt_core::ops::geom::Weights;
use tt_core::ops::inplace::pw_forward_in_place;
use tt_core::ops::portable;
use tt_core::ops::split::split_forward;
use tt_core::qas::XorShift32;
use tt_core::quant::{QParams, Requant, Rounding};
use tt_core::Error;

/// Largest tensor of a random geometry.
pub const RX: usize = 8 * 8 * 32;
/// Largest weight tensor of a random geometry.
pub const RW: usize = 32 * 9 * 32;
/// Output channels of a random geometry, at most: depthwise ones take more than one channel
/// block of the DSP path (48).
pub const RC: usize = 64;
/// The in-place depthwise map large enough that its plane holds the pending pixels.
const MAP_SIDE: usize = 48;
const MAP_C: usize = 8;
pub const MAP: usize = MAP_SIDE * MAP_SIDE * MAP_C;

/// The suite's working memory (about 70 KB), owned by the runner (`.bss` on the device).
pub struct Buffers {
    x: [i8; MAP],
    w: [i8; RW],
    sram: [i8; RW],
    bias: [i32; RC],
    rq: [Requant; RC],
    y: [i8; MAP],
    y_twin: [i8; MAP],
    plane: [i8; MAP_SIDE * MAP_SIDE],
    bits: [u8; RX / 8],
    bits_twin: [u8; RX / 8],
}

impl Buffers {
    pub const fn new() -> Buffers {
        let rq = Requant {
            multiplier: 0,
            shift: 0,
            rounding: 0,
        };
        Buffers {
            x: [0; MAP],
            w: [0; RW],
            sram: [0; RW],
            bias: [0; RC],
            rq: [rq; RC],
            y: [0; MAP],
            y_twin: [0; MAP],
            plane: [0; MAP_SIDE * MAP_SIDE],
            bits: [0; RX / 8],
            bits_twin: [0; RX / 8],
        }
    }
}

impl Default for Buffers {
    fn default() -> Self {
        Buffers::new()
    }
}

/// Why the suite stopped.
#[derive(Debug)]
pub enum Failure {
    /// A dispatcher's output differs from its portable twin's on case `case` of `kernel`.
    Mismatch {
        kernel: &'static str,
        case: u32,
        geometry: Option<Conv2dGeom>,
    },
    /// A kernel refused the buffers the suite built (a bug of the suite or of the kernel).
    Kernel(Error),
}

impl core::fmt::Display for Failure {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Failure::Mismatch {
                kernel,
                case,
                geometry: Some(g),
            } => write!(
                f,
                "{kernel} differs from its portable twin on case {case}: {g:?}"
            ),
            Failure::Mismatch { kernel, case, .. } => {
                write!(f, "{kernel} differs from its portable twin on case {case}")
            }
            Failure::Kernel(e) => write!(f, "a kernel refused the suite's buffers: {e}"),
        }
    }
}

impl From<Error> for Failure {
    fn from(e: Error) -> Failure {
        Failure::Kernel(e)
    }
}

type Outcome = Result<u32, Failure>;

/// One family of cases: how many it checked.
type Family = fn(&mut Buffers, &mut XorShift32) -> Outcome;

/// Runs every family from `seed`, telling `report(kernel, cases)` after each.
pub fn run_all(
    b: &mut Buffers,
    seed: u32,
    mut report: impl FnMut(&'static str, u32),
) -> Result<(), Failure> {
    let mut rng = XorShift32::new(seed);
    let families: [(&'static str, Family); 7] = [
        ("conv2d_forward", |b, r| conv_forward(b, r, false)),
        ("conv2d_forward (depthwise 3x3)", |b, r| {
            conv_forward(b, r, true)
        }),
        ("conv2d_depthwise_in_place_plane", in_place_depthwise),
        ("split_forward", |b, r| split_weights(b, r, false)),
        ("pw_forward_in_place", |b, r| split_weights(b, r, true)),
        ("add_forward", adds),
        ("clamp_mask_pack", masks),
    ];
    for (name, family) in families {
        let n = family(b, &mut rng)?;
        report(name, n);
    }
    Ok(())
}

fn same(kernel: &'static str, case: u32, g: Option<Conv2dGeom>, a: &[i8], b: &[i8]) -> Outcome {
    if a == b {
        Ok(1)
    } else {
        Err(Failure::Mismatch {
            kernel,
            case,
            geometry: g,
        })
    }
}

/// A draw in `0..n`.
fn draw(rng: &mut XorShift32, n: u32) -> u32 {
    rng.next_u32() % n
}

/// Random int8 data, the weights in `[-127, 127]`.
fn fill(rng: &mut XorShift32, x: &mut [i8], w: &mut [i8]) {
    for v in x.iter_mut() {
        *v = draw(rng, 256) as i8;
    }
    for v in w.iter_mut() {
        *v = (draw(rng, 255) as i32 - 127) as i8;
    }
}

/// Biases and requantization records of `n` channels from one of the epilogue's scale families:
/// typical layer scales, exact powers of two (ties at every other sum), [1/4, 1/2) (its
/// shortest shift) and >= 1/2 (records it hands to the generic path); double rounding with
/// `double`, as TFLite rounds.
fn channels(b: &mut Buffers, rng: &mut XorShift32, n: usize, double: bool) -> Result<(), Error> {
    let family = draw(rng, 4);
    let mode = if double {
        Rounding::Double
    } else {
        Rounding::Single
    };
    for o in 0..n {
        b.bias[o] = draw(rng, 4001) as i32 - 2000;
        let scale = match family {
            0 => 0.0005 + 0.0001 * draw(rng, 50) as f64,
            1 => 1.0 / (1u32 << (1 + draw(rng, 20))) as f64,
            2 => 0.25 + draw(rng, 1000) as f64 / 4000.0,
            _ => 0.5 + draw(rng, 1000) as f64 / 1000.0,
        };
        b.rq[o] = Requant::from_scale(scale)?.with_rounding(mode);
    }
    Ok(())
}

/// Activation bounds: the whole int8 range every `whole`-th case (the epilogue's SSAT-only
/// form), else narrowed.
fn bounds(rng: &mut XorShift32, case: u32, whole: u32) -> (i8, i8) {
    if case.is_multiple_of(whole) {
        (i8::MIN, i8::MAX)
    } else {
        (-128 + draw(rng, 20) as i8, 127 - draw(rng, 20) as i8)
    }
}

/// An input zero point: a wide one (outside int8) every tenth case.
fn zero_point(rng: &mut XorShift32, case: u32) -> i32 {
    if case % 10 == 9 {
        200
    } else {
        draw(rng, 256) as i32 - 128
    }
}

/// `conv2d_forward` on random geometries (pointwise, grouped, general and depthwise, odd
/// channel counts, paddings, strides, wide zero points); with `dw3`, depthwise 3x3 only, the
/// channels in fours up to two DSP channel blocks (that path's own copy for 3x3).
fn conv_forward(b: &mut Buffers, rng: &mut XorShift32, dw3: bool) -> Outcome {
    let mut checked = 0;
    for case in 0..200 {
        let k = [1, 2, 3, 1, 2, 3, 5, 7][draw(rng, 8) as usize];
        let (kh, kw) = match (dw3, draw(rng, 4)) {
            (true, _) => (3, 3),
            (false, 0) => (k, 1 + draw(rng, 3) as usize),
            _ => (k, k),
        };
        let (in_h, in_w) = (kh + draw(rng, 6) as usize, kw + draw(rng, 6) as usize);
        let (in_c, out_c, groups) = if dw3 {
            // Up to RC channels, fewer where the output (up to two pixels wider and taller
            // than the input) would not fit RX.
            let c = (4 * (1 + draw(rng, RC as u32 / 4)) as usize)
                .min((RX / ((in_h + 2) * (in_w + 2))) & !3);
            (c, c, c)
        } else {
            match draw(rng, 3) {
                0 => {
                    let c = 1 + draw(rng, 32) as usize;
                    (c, c, c)
                }
                1 => {
                    let gr = 1 + draw(rng, 4) as usize;
                    let (i, o) = (1 + draw(rng, 8) as usize, 1 + draw(rng, 8) as usize);
                    (gr * i, gr * o, gr)
                }
                _ => (1 + draw(rng, 32) as usize, 1 + draw(rng, 32) as usize, 1),
            }
        };
        let (sh, sw) = (1 + draw(rng, 2) as usize, 1 + draw(rng, 2) as usize);
        let p = [kh, kw, kh, kw].map(|k| draw(rng, k as u32) as usize);
        let Ok(g) = Conv2dGeom::new(
            in_h, in_w, in_c, out_c, kh, kw, sh, sw, p[0], p[1], p[2], p[3], groups,
        ) else {
            continue;
        };
        if g.input_len() > RX || g.output_len() > RX || g.weight_len() > RW {
            continue;
        }
        let x_zp = zero_point(rng, case);
        fill(rng, &mut b.x[..g.input_len()], &mut b.w[..g.weight_len()]);
        channels(b, rng, out_c, case % 3 == 1)?;
        let (lo, hi) = bounds(rng, case, 5);
        let y_zp = draw(rng, 41) as i32 - 20;
        let (x, w) = (&b.x[..g.input_len()], &b.w[..g.weight_len()]);
        let (bias, rq, n) = (&b.bias[..out_c], &b.rq[..out_c], g.output_len());
        conv2d_forward(&g, x, x_zp, w, bias, rq, y_zp, lo, hi, &mut b.y[..n])?;
        portable::conv2d_forward(&g, x, x_zp, w, bias, rq, y_zp, lo, hi, &mut b.y_twin[..n])?;
        checked += same("conv2d_forward", case, Some(g), &b.y[..n], &b.y_twin[..n])?;
    }
    Ok(checked)
}

/// The executor's in-place depthwise (output over its input, one output plane of scratch) on
/// random geometries: channels in fours (the four-channel path, whose pending pixels must fit
/// the plane) or not, kernels 1x1 to 7x7, strides 1-2, paddings, zero points in and outside
/// int8 range; then a map large enough that the plane holds the pending pixels.
fn in_place_depthwise(b: &mut Buffers, rng: &mut XorShift32) -> Outcome {
    let mut checked = 0;
    for case in 0..201 {
        let g = if case == 200 {
            let (s, c) = (MAP_SIDE, MAP_C);
            Conv2dGeom::new(s, s, c, c, 3, 3, 1, 1, 1, 1, 1, 1, c)?
        } else {
            let c = if draw(rng, 4) == 0 {
                1 + draw(rng, 32) as usize
            } else {
                4 * (1 + draw(rng, 8) as usize)
            };
            let k = [1, 3, 3, 3, 5, 7][draw(rng, 6) as usize];
            let (in_h, in_w) = (1 + draw(rng, 10) as usize, 1 + draw(rng, 10) as usize);
            let (sh, sw) = (1 + draw(rng, 2) as usize, 1 + draw(rng, 2) as usize);
            let p = [k; 4].map(|k| draw(rng, k as u32) as usize);
            let Ok(g) = Conv2dGeom::new(in_h, in_w, c, c, k, k, sh, sw, p[0], p[1], p[2], p[3], c)
            else {
                continue;
            };
            g
        };
        let len = g.input_len().max(g.output_len());
        let opix = g.out_h() * g.out_w();
        if len > MAP || opix == 0 || opix > b.plane.len() || g.weight_len() > RW {
            continue;
        }
        let x_zp = zero_point(rng, case);
        fill(rng, &mut b.x[..g.input_len()], &mut b.w[..g.weight_len()]);
        channels(b, rng, g.in_c, false)?;
        let (lo, hi) = bounds(rng, case, 2);
        let y_zp = draw(rng, 41) as i32 - 20;
        let (w, bias, rq) = (&b.w[..g.weight_len()], &b.bias[..g.in_c], &b.rq[..g.in_c]);
        let plane = &mut b.plane[..opix];
        b.y[..g.input_len()].copy_from_slice(&b.x[..g.input_len()]);
        b.y_twin[..g.input_len()].copy_from_slice(&b.x[..g.input_len()]);
        conv2d_depthwise_in_place_plane(
            &g,
            &mut b.y[..len],
            x_zp,
            w,
            bias,
            rq,
            y_zp,
            lo,
            hi,
            plane,
        )?;
        portable::conv2d_depthwise_in_place_plane(
            &g,
            &mut b.y_twin[..len],
            x_zp,
            w,
            bias,
            rq,
            y_zp,
            lo,
            hi,
            plane,
        )?;
        let n = g.output_len();
        let name = "conv2d_depthwise_in_place_plane";
        checked += same(name, case, Some(g), &b.y[..n], &b.y_twin[..n])?;
    }
    Ok(checked)
}

/// The kernels over weights split between flash and SRAM (`split_forward` on random
/// geometries; with `pointwise`, `pw_forward_in_place` on 1x1 layers): whole weights, the
/// first `k` output channels trained (the DSP path's rows) or the first `k` input channels
/// (the portable loops on every build).
fn split_weights(b: &mut Buffers, rng: &mut XorShift32, pointwise: bool) -> Outcome {
    let mut checked = 0;
    for case in 0..200 {
        let k = if pointwise {
            1
        } else {
            [1, 3, 3, 5][draw(rng, 4) as usize]
        };
        let (in_h, in_w) = (k + draw(rng, 6) as usize, k + draw(rng, 6) as usize);
        let (in_c, out_c) = (1 + draw(rng, 32) as usize, 1 + draw(rng, 32) as usize);
        let groups =
            if !pointwise && draw(rng, 4) == 0 && in_c.is_multiple_of(2) && out_c.is_multiple_of(2)
            {
                2
            } else {
                1
            };
        let (s, p) = if pointwise {
            (1, 0)
        } else {
            (1 + draw(rng, 2) as usize, draw(rng, k as u32) as usize)
        };
        let Ok(g) = Conv2dGeom::new(in_h, in_w, in_c, out_c, k, k, s, s, p, p, p, p, groups) else {
            continue;
        };
        let len = g.input_len().max(g.output_len());
        if len > RX || g.weight_len() > RW {
            continue;
        }
        let x_zp = zero_point(rng, case);
        fill(rng, &mut b.x[..g.input_len()], &mut b.w[..g.weight_len()]);
        let taps = g.kh * g.kw;
        // axis 0: rows of `taps * icg`; axis 1 (ungrouped layers only): columns.
        let axis = if groups == 1 {
            draw(rng, 3) as u8
        } else {
            draw(rng, 2) as u8 * 2
        };
        let (kc, sram_len) = match axis {
            0 => {
                let kc = draw(rng, out_c as u32 + 1) as usize;
                (kc, kc * taps * g.in_per_group())
            }
            1 => {
                let kc = draw(rng, in_c as u32 + 1) as usize;
                (kc, out_c * taps * kc)
            }
            _ => (0, 0),
        };
        for v in b.sram[..sram_len].iter_mut() {
            *v = (draw(rng, 255) as i32 - 127) as i8;
        }
        channels(b, rng, out_c, case % 3 == 1)?;
        let flash = &b.w[..g.weight_len()];
        let w = match axis {
            0 | 1 => Weights::Split {
                flash,
                sram: &b.sram[..sram_len],
                axis,
                k: kc,
            },
            _ => Weights::Whole(flash),
        };
        let (lo, hi) = bounds(rng, case, 5);
        let y_zp = draw(rng, 41) as i32 - 20;
        let (bias, rq) = (&b.bias[..out_c], &b.rq[..out_c]);
        let x = &b.x[..g.input_len()];
        let n = g.output_len();
        if pointwise {
            let (px, twin_px) = b.plane.split_at_mut(out_c);
            b.y[..g.input_len()].copy_from_slice(x);
            b.y_twin[..g.input_len()].copy_from_slice(x);
            let (y, yt) = (&mut b.y[..len], &mut b.y_twin[..len]);
            pw_forward_in_place(&g, y, x_zp, w, bias, rq, y_zp, lo, hi, px)?;
            let twin_px = &mut twin_px[..out_c];
            portable::pw_forward_in_place(&g, yt, x_zp, w, bias, rq, y_zp, lo, hi, twin_px)?;
        } else {
            split_forward(&g, x, x_zp, w, bias, rq, y_zp, lo, hi, &mut b.y[..n])?;
            portable::split_forward(&g, x, x_zp, w, bias, rq, y_zp, lo, hi, &mut b.y_twin[..n])?;
        }
        let name = if pointwise {
            "pw_forward_in_place"
        } else {
            "split_forward"
        };
        checked += same(name, case, Some(g), &b.y[..n], &b.y_twin[..n])?;
    }
    Ok(checked)
}

/// Residual adds (whose requantization takes the convs' DSP epilogue): random scales and zero
/// points, both rounding modes, whole-range and narrowed clamps.
fn adds(b: &mut Buffers, rng: &mut XorShift32) -> Outcome {
    let n = RX;
    for case in 0..100 {
        let mut q = || {
            let scale = [
                0.001 + 0.001 * draw(rng, 100) as f32,
                1.0 / (1u32 << draw(rng, 12)) as f32,
            ][draw(rng, 2) as usize];
            QParams::new(scale, draw(rng, 256) as i32 - 128)
        };
        let (qa, qb, qo) = (q()?, q()?, q()?);
        let (lo, hi) = bounds(rng, case, 2);
        let rounding = if case % 3 == 0 {
            Rounding::Double
        } else {
            Rounding::Single
        };
        let p = AddParams::new(qa, qb, qo, lo, hi, rounding)?;
        let (xa, xb) = b.x[..2 * n].split_at_mut(n);
        fill(rng, xa, xb);
        add_forward(&p, xa, xb, &mut b.y[..n])?;
        portable::add_forward(&p, xa, xb, &mut b.y_twin[..n])?;
        same("add_forward", case, None, &b.y[..n], &b.y_twin[..n])?;
    }
    Ok(100)
}

/// `clamp_mask_pack` on random lengths (full bytes and tails), values and bounds, the int8
/// range's edges included.
fn masks(b: &mut Buffers, rng: &mut XorShift32) -> Outcome {
    for case in 0..200 {
        let n = 1 + draw(rng, RX as u32) as usize;
        let edges = [i8::MIN, i8::MIN + 1, 0, i8::MAX - 1, i8::MAX];
        let (a, c) = if case % 4 == 0 {
            (edges[draw(rng, 5) as usize], edges[draw(rng, 5) as usize])
        } else {
            (draw(rng, 256) as u8 as i8, draw(rng, 256) as u8 as i8)
        };
        let (lo, hi) = (a.min(c), a.max(c));
        for v in b.x[..n].iter_mut() {
            *v = if draw(rng, 4) == 0 {
                [lo, hi][draw(rng, 2) as usize]
            } else {
                draw(rng, 256) as u8 as i8
            };
        }
        let (bits, twin) = (
            &mut b.bits[..n.div_ceil(8)],
            &mut b.bits_twin[..n.div_ceil(8)],
        );
        clamp_mask_pack(&b.x[..n], lo, hi, bits)?;
        portable::clamp_mask_pack(&b.x[..n], lo, hi, twin)?;
        if bits != twin {
            return Err(Failure::Mismatch {
                kernel: "clamp_mask_pack",
                case,
                geometry: None,
            });
        }
    }
    Ok(200)
}

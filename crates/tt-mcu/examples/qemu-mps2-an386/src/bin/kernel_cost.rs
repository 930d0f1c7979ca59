//! Cost of one training step of a representative layer, measured in instructions (QEMU
//! mps2-an386 under `-icount shift=0`; exits 0 when every kernel ran): a 1x1
//! (pointwise) conv 8x8x96 -> 96 with ReLU6, the kind of late layer the paper's sparse schemes
//! update. Forward, clamp-mask backward, weight gradient of 1/4 of the output channels, input
//! gradient, bias gradient, and the QAS SGD update with stochastic rounding. Then the forward of
//! the other layer kinds (depthwise 3x3, first-layer 3x3 stride 2) against plain reference loops,
//! and the forward kernels against those loops on random geometries (exact equality: on thumbv7em
//! the kernels take their DSP paths, which must match the portable semantics bit for bit).
#![no_std]
#![no_main]

#[path = "../board.rs"]
#[macro_use]
mod board;

use cortex_m_rt::entry;
use tt_core::ops::act::{clamp_mask_backward, clamp_mask_pack};
use tt_core::ops::add::{add_forward, AddParams};
use tt_core::ops::conv::{
    conv2d_backward_bias, conv2d_backward_input, conv2d_backward_weight,
    conv2d_depthwise_in_place_plane, conv2d_forward, Conv2dGeom,
};
use tt_core::ops::ChannelSelection;
use tt_core::qas::{sgd_update_bias, sgd_update_weights, SgdConfig, UpdateState, XorShift32};
use tt_core::quant::{QParams, Requant, Rounding};

use board::{clock_start, exit, instructions, stack_paint, stack_peak, stack_reserve};

const H: usize = 8;
const W: usize = 8;
const C: usize = 96;
const SEL: usize = C / 4;

/// Forward-only layers: depthwise 3x3 16x16x96 and a first layer 3x3 stride 2, 32x32x3 -> 16.
const DW_H: usize = 16;
const DW_C: usize = 96;
const FL_H: usize = 32;
const FL_OC: usize = 16;
/// Largest random geometry of the equality check.
const RX: usize = 8 * 8 * 32;
const RW: usize = 32 * 9 * 32;
/// Output channels of a random geometry, at most: depthwise ones take more than one channel
/// block of the DSP path (48).
const RC: usize = 64;

struct Buffers {
    x: [i8; H * W * C],
    w: [i8; C * C],
    b: [i32; C],
    rq: [Requant; C],
    ws: [f32; C],
    y: [i8; H * W * C],
    y_ref: [i8; H * W * C],
    gy: [f32; H * W * C],
    gx: [f32; H * W * C],
    gw: [f32; SEL * C],
    gb: [f32; C],
    dx: [i8; DW_H * DW_H * DW_C],
    dy: [i8; DW_H * DW_H * DW_C],
    dy_ref: [i8; DW_H * DW_H * DW_C],
    fx: [i8; FL_H * FL_H * 3],
    rx: [i8; RX],
    rw: [i8; RW],
    rb: [i32; RC],
    rrq: [Requant; RC],
    ry: [i8; RX],
    ry_ref: [i8; RX],
}

/// In .bss, so the linker's SRAM figure includes them.
static mut BUF: Buffers = Buffers {
    x: [0; H * W * C],
    w: [0; C * C],
    b: [0; C],
    // SAFETY (both): all-zero is a valid Requant (integer fields); every entry is set before use.
    rq: unsafe { core::mem::zeroed() },
    ws: [0.0; C],
    y: [0; H * W * C],
    y_ref: [0; H * W * C],
    gy: [0.0; H * W * C],
    gx: [0.0; H * W * C],
    gw: [0.0; SEL * C],
    gb: [0.0; C],
    dx: [0; DW_H * DW_H * DW_C],
    dy: [0; DW_H * DW_H * DW_C],
    dy_ref: [0; DW_H * DW_H * DW_C],
    fx: [0; FL_H * FL_H * 3],
    rx: [0; RX],
    rw: [0; RW],
    rb: [0; RC],
    rrq: unsafe { core::mem::zeroed() },
    ry: [0; RX],
    ry_ref: [0; RX],
};

fn per_mac(instr: u64, macs: u64) -> (u64, u64) {
    let centi = instr * 100 / macs.max(1);
    (centi / 100, centi % 100)
}

/// The plain reference (TF-Lite-reference style: one MAC per inner iteration, requantize per
/// output): the oracle the optimized kernel must match on the device, and the baseline of its
/// speed-up.
#[allow(clippy::too_many_arguments)]
fn reference_pointwise(
    x: &[i8],
    x_zp: i32,
    w: &[i8],
    b: &[i32],
    rq: &[Requant],
    y_zp: i32,
    lo: i8,
    hi: i8,
    y: &mut [i8],
) {
    for p in 0..H * W {
        for o in 0..C {
            let mut acc = b[o];
            for i in 0..C {
                acc += (x[p * C + i] as i32 - x_zp) * w[o * C + i] as i32;
            }
            let v = rq[o].apply(acc) + y_zp;
            y[p * C + o] = v.clamp(lo as i32, hi as i32) as i8;
        }
    }
}

/// The plain reference for any geometry: one MAC per inner iteration, padding skipped.
#[allow(clippy::too_many_arguments)]
fn reference_conv(
    g: &Conv2dGeom,
    x: &[i8],
    x_zp: i32,
    w: &[i8],
    b: &[i32],
    rq: &[Requant],
    y_zp: i32,
    lo: i8,
    hi: i8,
    y: &mut [i8],
) {
    let (icg, ocg) = (g.in_per_group(), g.out_per_group());
    for oy in 0..g.out_h() {
        for ox in 0..g.out_w() {
            for o in 0..g.out_c {
                let grp = o / ocg;
                let mut acc = b[o];
                for ky in 0..g.kh {
                    let iy = (oy * g.stride_h + ky) as isize - g.pad_top as isize;
                    for kx in 0..g.kw {
                        let ix = (ox * g.stride_w + kx) as isize - g.pad_left as isize;
                        if iy < 0 || ix < 0 || iy >= g.in_h as isize || ix >= g.in_w as isize {
                            continue;
                        }
                        let xp = ((iy as usize * g.in_w + ix as usize) * g.in_c) + grp * icg;
                        let wp = ((o * g.kh + ky) * g.kw + kx) * icg;
                        for i in 0..icg {
                            acc = acc.wrapping_add(
                                (x[xp + i] as i32)
                                    .wrapping_sub(x_zp)
                                    .wrapping_mul(w[wp + i] as i32),
                            );
                        }
                    }
                }
                let v = rq[o].apply(acc) as i64 + y_zp as i64;
                y[(oy * g.out_w() + ox) * g.out_c + o] = v.clamp(lo as i64, hi as i64) as i8;
            }
        }
    }
}

/// Forward cost of one layer against the plain reference on the same data; the outputs must
/// be equal.
#[allow(clippy::too_many_arguments)]
fn forward_vs_plain(
    name: &str,
    g: &Conv2dGeom,
    x: &[i8],
    x_zp: i32,
    w: &[i8],
    bias: &[i32],
    rq: &[Requant],
    y: &mut [i8],
    y_ref: &mut [i8],
) -> Result<(), tt_core::Error> {
    let (lo, hi) = (-128i8, -68i8);
    let t0 = instructions();
    conv2d_forward(g, x, x_zp, w, bias, rq, -128, lo, hi, y)?;
    let t_fwd = instructions() - t0;
    let r0 = instructions();
    reference_conv(g, x, x_zp, w, bias, rq, -128, lo, hi, y_ref);
    let t_ref = instructions() - r0;
    if y != y_ref {
        return Err(tt_core::Error::InvalidParameter {
            what: "conv forward differs from the plain reference on the device",
        });
    }
    let (f, r) = (per_mac(t_fwd, g.macs()), per_mac(t_ref, g.macs()));
    let speedup = t_ref * 100 / t_fwd.max(1);
    say!(
        "  {name:<16} {:>9} instr  {:>7} MACs  {}.{:02} instr/MAC  (plain {}.{:02}; {}.{:02}x faster, same outputs)",
        t_fwd,
        g.macs(),
        f.0,
        f.1,
        r.0,
        r.1,
        speedup / 100,
        speedup % 100
    );
    Ok(())
}

fn other_layers(b: &mut Buffers, rng: &mut XorShift32) -> Result<(), tt_core::Error> {
    for v in b.dx.iter_mut().chain(b.fx.iter_mut()) {
        *v = rng.next_u32() as i8;
    }
    for v in b.w.iter_mut() {
        *v = (rng.next_u32() % 255) as i8;
    }
    say!("forward of other layer kinds (ReLU6):");
    let g = Conv2dGeom::new(DW_H, DW_H, DW_C, DW_C, 3, 3, 1, 1, 1, 1, 1, 1, DW_C)?;
    let rq = [Requant::from_scale(0.004)?; C];
    forward_vs_plain(
        "dw3x3 16x16x96",
        &g,
        &b.dx,
        5,
        &b.w[..g.weight_len()],
        &b.b,
        &rq,
        &mut b.dy,
        &mut b.dy_ref,
    )?;
    let g = Conv2dGeom::new(FL_H, FL_H, 3, FL_OC, 3, 3, 2, 2, 0, 0, 1, 1, 1)?;
    let n = g.output_len();
    forward_vs_plain(
        "3x3 s2 32x32x3>16",
        &g,
        &b.fx,
        -7,
        &b.w[..g.weight_len()],
        &b.b[..FL_OC],
        &rq[..FL_OC],
        &mut b.dy[..n],
        &mut b.dy_ref[..n],
    )?;
    // The narrow expansions of the first blocks: few MACs per output, so the per-output
    // epilogue (requantization) weighs most.
    let g = Conv2dGeom::new(DW_H, DW_H, 8, 48, 1, 1, 1, 1, 0, 0, 0, 0, 1)?;
    let n = g.output_len();
    forward_vs_plain(
        "1x1 16x16x8>48",
        &g,
        &b.dx[..g.input_len()],
        -3,
        &b.w[..g.weight_len()],
        &b.b[..48],
        &rq[..48],
        &mut b.dy[..n],
        &mut b.dy_ref[..n],
    )
}

/// Random geometries (pointwise, grouped, general and depthwise, odd channel counts, paddings,
/// strides, wide zero points): the kernels must equal the plain reference exactly. With `dw3`,
/// depthwise 3x3 only, channels in fours up to two blocks (the DSP path's own copy for 3x3,
/// which the mixed draw reaches a few times at most).
fn random_geometries(
    b: &mut Buffers,
    rng: &mut XorShift32,
    dw3: bool,
) -> Result<u32, tt_core::Error> {
    let mut r = |n: u32| rng.next_u32() % n;
    let mut checked = 0;
    for case in 0..200 {
        let k = [1, 2, 3, 1, 2, 3, 5, 7][r(8) as usize];
        let (kh, kw) = if r(4) == 0 {
            (k, 1 + r(3) as usize)
        } else {
            (k, k)
        };
        let kind = r(3);
        let (in_c, out_c, groups) = match kind {
            0 => {
                let c = 1 + r(32) as usize;
                (c, c, c)
            }
            1 => {
                let gr = 1 + r(4) as usize;
                (gr * (1 + r(8) as usize), gr * (1 + r(8) as usize), gr)
            }
            _ => (1 + r(32) as usize, 1 + r(32) as usize, 1),
        };
        let (kh, kw) = if dw3 { (3, 3) } else { (kh, kw) };
        let (in_h, in_w) = (kh + r(6) as usize, kw + r(6) as usize);
        let (in_c, out_c, groups) = if dw3 {
            // Up to RC channels, fewer where the output (up to two pixels wider and taller
            // than the input) would not fit RX.
            let c = (4 * (1 + r(RC as u32 / 4)) as usize).min(RX / ((in_h + 2) * (in_w + 2)) & !3);
            (c, c, c)
        } else {
            (in_c, out_c, groups)
        };
        let (sh, sw) = (1 + r(2) as usize, 1 + r(2) as usize);
        let pads = [r(kh as u32) as usize, r(kw as u32) as usize];
        let pads2 = [r(kh as u32) as usize, r(kw as u32) as usize];
        let g = Conv2dGeom::new(
            in_h, in_w, in_c, out_c, kh, kw, sh, sw, pads[0], pads[1], pads2[0], pads2[1], groups,
        )?;
        if g.input_len() > RX || g.output_len() > RX || g.weight_len() > RW {
            continue;
        }
        let x_zp = if case % 10 == 9 {
            200
        } else {
            r(256) as i32 - 128
        };
        for v in b.rx[..g.input_len()].iter_mut() {
            *v = r(256) as i8;
        }
        for v in b.rw[..g.weight_len()].iter_mut() {
            *v = (r(255) as i32 - 127) as i8;
        }
        // Scale families of the epilogue's cases: typical layer scales, exact powers of two
        // (ties at every other sum), [1/4, 1/2) (its shortest shift) and >= 1/2 (records it
        // hands to the generic path, as it does a third of the cases rounding as TFLite does).
        let family = r(4);
        for o in 0..out_c {
            b.rb[o] = r(4001) as i32 - 2000;
            let mode = if case % 3 == 1 {
                Rounding::Double
            } else {
                Rounding::Single
            };
            let scale = match family {
                0 => 0.0005 + 0.0001 * r(50) as f64,
                1 => 1.0 / (1u32 << (1 + r(20))) as f64,
                2 => 0.25 + r(1000) as f64 / 4000.0,
                _ => 0.5 + r(1000) as f64 / 1000.0,
            };
            b.rrq[o] = Requant::from_scale(scale)?.with_rounding(mode);
        }
        // Every fifth case clamps to the whole int8 range (the epilogue's SSAT-only form).
        let (lo, hi) = if case % 5 == 0 {
            (i8::MIN, i8::MAX)
        } else {
            (-128 + r(20) as i8, 127 - r(20) as i8)
        };
        let y_zp = r(41) as i32 - 20;
        let n = g.output_len();
        let (w, bias, rq) = (&b.rw[..g.weight_len()], &b.rb[..out_c], &b.rrq[..out_c]);
        conv2d_forward(
            &g,
            &b.rx[..g.input_len()],
            x_zp,
            w,
            bias,
            rq,
            y_zp,
            lo,
            hi,
            &mut b.ry[..n],
        )?;
        reference_conv(
            &g,
            &b.rx[..g.input_len()],
            x_zp,
            w,
            bias,
            rq,
            y_zp,
            lo,
            hi,
            &mut b.ry_ref[..n],
        );
        if b.ry[..n] != b.ry_ref[..n] {
            say!("mismatch: {g:?} x_zp {x_zp}");
            return Err(tt_core::Error::InvalidParameter {
                what: "conv forward differs from the plain reference on a random geometry",
            });
        }
        checked += 1;
    }
    Ok(checked)
}

fn run() -> Result<(), tt_core::Error> {
    // SAFETY: single-threaded firmware, the only reference to BUF.
    let b = unsafe { &mut *core::ptr::addr_of_mut!(BUF) };
    let mut rng = XorShift32::new(7);
    for v in b.x.iter_mut() {
        *v = rng.next_u32() as i8;
    }
    for v in b.w.iter_mut() {
        *v = (rng.next_u32() % 255) as i8;
    }
    let (x_q, y_q) = (QParams::new(0.05, -3)?, QParams::new(0.1, -128)?);
    for o in 0..C {
        b.ws[o] = 0.002 + 0.0001 * o as f32;
        b.b[o] = (rng.next_u32() % 2001) as i32 - 1000;
        b.rq[o] = Requant::from_scale((x_q.scale * b.ws[o] / y_q.scale) as f64)?;
    }
    let g = Conv2dGeom::new(H, W, C, C, 1, 1, 1, 1, 0, 0, 0, 0, 1)?;
    let (lo, hi) = (-128i8, (-128 + 60) as i8); // ReLU6 at scale 0.1, zero point -128
    let sel = ChannelSelection::output(SEL);
    let cfg = SgdConfig {
        lr: 0.01,
        momentum: 0.0,
        qas: true,
    };
    let macs = g.macs();

    let t0 = instructions();
    conv2d_forward(
        &g,
        &b.x,
        x_q.zero_point,
        &b.w,
        &b.b,
        &b.rq,
        y_q.zero_point,
        lo,
        hi,
        &mut b.y,
    )?;
    let t_fwd = instructions() - t0;
    let r0 = instructions();
    reference_pointwise(
        &b.x,
        x_q.zero_point,
        &b.w,
        &b.b,
        &b.rq,
        y_q.zero_point,
        lo,
        hi,
        &mut b.y_ref,
    );
    let t_ref = instructions() - r0;
    if b.y_ref != b.y {
        return Err(tt_core::Error::InvalidParameter {
            what: "optimized conv forward differs from the reference on the device",
        });
    }
    let t1 = instructions();
    for (gy, &y) in b.gy.iter_mut().zip(b.y.iter()) {
        *gy = (y as i32 + 100) as f32 * 0.001;
    }
    clamp_mask_backward(&b.y, lo, hi, &mut b.gy)?;
    let t2 = instructions();
    b.gw.fill(0.0);
    conv2d_backward_weight(&g, &b.x, x_q, &b.gy, sel, &mut b.gw)?;
    let t3 = instructions();
    conv2d_backward_input(&g, &b.gy, &b.w, &b.ws, &mut b.gx)?;
    let t4 = instructions();
    b.gb.fill(0.0);
    conv2d_backward_bias(&g, &b.gy, &mut b.gb)?;
    let shape = g.weight_shape();
    sgd_update_weights(
        &mut b.w,
        &shape,
        &b.ws,
        sel,
        &b.gw,
        &cfg,
        None,
        UpdateState::StochasticRounding(&mut rng),
    )?;
    sgd_update_bias(&mut b.b, &b.ws, x_q.scale, &b.gb, &cfg, None)?;
    let t5 = instructions();

    let wmacs = (H * W * SEL * C) as u64;
    let f = per_mac(t_fwd, macs);
    let bw = per_mac(t3 - t2, wmacs);
    let bi = per_mac(t4 - t3, macs);
    say!("kernel layer: conv 1x1 {H}x{W}x{C} -> {C}, ReLU6, weight update on {SEL}/{C} output channels");
    say!(
        "  forward          {:>9} instr  {:>7} MACs  {}.{:02} instr/MAC",
        t_fwd,
        macs,
        f.0,
        f.1
    );
    let r = per_mac(t_ref, macs);
    let speedup = t_ref * 100 / t_fwd.max(1);
    say!(
        "  forward, plain   {:>9} instr  {:>7} MACs  {}.{:02} instr/MAC  (reference loops; the kernel is {}.{:02}x faster, same outputs)",
        t_ref, macs, r.0, r.1, speedup / 100, speedup % 100
    );
    say!("  loss grad + mask {:>9} instr", t2 - t1);
    say!(
        "  weight gradient  {:>9} instr  {:>7} MACs  {}.{:02} instr/MAC",
        t3 - t2,
        wmacs,
        bw.0,
        bw.1
    );
    say!(
        "  input gradient   {:>9} instr  {:>7} MACs  {}.{:02} instr/MAC",
        t4 - t3,
        macs,
        bi.0,
        bi.1
    );
    say!("  bias grad + SGD  {:>9} instr", t5 - t4);
    let all = macs * 2 + wmacs;
    // The step without the reference run in the middle of it.
    let step = t5 - t0 - t_ref;
    let s = per_mac(step, all);
    say!(
        "  step             {:>9} instr  {:>7} MACs  {}.{:02} instr/MAC",
        step,
        all,
        s.0,
        s.1
    );
    other_layers(b, &mut rng)?;
    let n = random_geometries(b, &mut rng, false)?;
    say!("forward kernels equal the plain reference on {n} random geometries");
    let n = random_geometries(b, &mut rng, true)?;
    say!("depthwise 3x3 forward equals the plain reference on {n} random geometries");
    let n = random_in_place_depthwise(b, &mut rng)?;
    say!("in-place depthwise equals the plain reference on {n} random geometries");
    let n = random_adds(b, &mut rng)?;
    say!("residual adds equal the plain reference on {n} random quantizations");
    let n = random_masks(b, &mut rng)?;
    say!("packed activation masks equal the plain reference on {n} random tensors");
    Ok(())
}

/// `clamp_mask_pack` (four lanes a comparison on the DSP build) on random lengths (full bytes and
/// tails), values and bounds, the int8 range's edges included: every bit as `lo < q < hi` says.
fn random_masks(b: &mut Buffers, rng: &mut XorShift32) -> Result<u32, tt_core::Error> {
    let mut r = |n: u32| rng.next_u32() % n;
    let mut bits = [0u8; RX / 8];
    for case in 0..200 {
        let n = 1 + r(RX as u32) as usize;
        let edges = [i8::MIN, i8::MIN + 1, 0, i8::MAX - 1, i8::MAX];
        let (a, c) = if case % 4 == 0 {
            (edges[r(5) as usize], edges[r(5) as usize])
        } else {
            (r(256) as u8 as i8, r(256) as u8 as i8)
        };
        let (lo, hi) = (a.min(c), a.max(c));
        for v in b.rx[..n].iter_mut() {
            *v = if r(4) == 0 { [lo, hi][r(2) as usize] } else { r(256) as u8 as i8 };
        }
        let used = &mut bits[..n.div_ceil(8)];
        clamp_mask_pack(&b.rx[..n], lo, hi, used)?;
        let same = b.rx[..n]
            .iter()
            .enumerate()
            .all(|(i, &q)| (used[i / 8] >> (i % 8) & 1 == 1) == (q > lo && q < hi));
        if !same {
            say!("mismatch: {n} outputs, bounds {lo} {hi}");
            return Err(tt_core::Error::InvalidParameter {
                what: "packed activation mask differs from the plain reference",
            });
        }
    }
    Ok(200)
}

/// Residual adds (`add_forward`, whose requantization takes the convs' DSP epilogue) against
/// `AddParams::apply` element by element (the portable fixed-point path): random scales and
/// zero points, both rounding modes, whole-range and narrowed clamps.
fn random_adds(b: &mut Buffers, rng: &mut XorShift32) -> Result<u32, tt_core::Error> {
    let mut r = |n: u32| rng.next_u32() % n;
    let n = RX;
    for case in 0..100 {
        let mut q = || {
            let scale =
                [0.001 + 0.001 * r(100) as f32, 1.0 / (1u32 << r(12)) as f32][r(2) as usize];
            QParams::new(scale, r(256) as i32 - 128)
        };
        let (qa, qb, qo) = (q()?, q()?, q()?);
        let (lo, hi) = if case % 2 == 0 {
            (i8::MIN, i8::MAX)
        } else {
            (-128 + r(20) as i8, 127 - r(20) as i8)
        };
        let rounding = if case % 3 == 0 {
            Rounding::Double
        } else {
            Rounding::Single
        };
        let p = AddParams::new(qa, qb, qo, lo, hi, rounding)?;
        for v in b.rx[..n].iter_mut().chain(b.ry_ref[..n].iter_mut()) {
            *v = r(256) as i8;
        }
        add_forward(&p, &b.rx[..n], &b.ry_ref[..n], &mut b.ry[..n])?;
        let same = b.ry[..n]
            .iter()
            .zip(b.rx[..n].iter().zip(&b.ry_ref[..n]))
            .all(|(&y, (&x, &z))| y == p.apply(x, z));
        if !same {
            say!("mismatch: {p:?}");
            return Err(tt_core::Error::InvalidParameter {
                what: "residual add differs from the plain reference",
            });
        }
    }
    Ok(100)
}

/// The executor's in-place depthwise (output over its input, one output plane of scratch) on
/// random geometries: channels in fours (the four-channel path, whose pending pixels must fit
/// the plane) or not, kernels 1x1 to 7x7, strides 1-2, paddings, zero points in and outside
/// int8 range, the epilogue's scale families. Output must equal the plain reference.
fn random_in_place_depthwise(b: &mut Buffers, rng: &mut XorShift32) -> Result<u32, tt_core::Error> {
    let mut r = |n: u32| rng.next_u32() % n;
    let mut checked = 0;
    for case in 0..200 {
        let c = if r(4) == 0 {
            1 + r(32) as usize
        } else {
            4 * (1 + r(8) as usize)
        };
        let k = [1, 3, 3, 3, 5, 7][r(6) as usize];
        let (in_h, in_w) = (1 + r(10) as usize, 1 + r(10) as usize);
        let (sh, sw) = (1 + r(2) as usize, 1 + r(2) as usize);
        let p = [r(k as u32) as usize, r(k as u32) as usize, r(k as u32) as usize, r(k as u32) as usize];
        let Ok(g) = Conv2dGeom::new(in_h, in_w, c, c, k, k, sh, sw, p[0], p[1], p[2], p[3], c)
        else {
            continue;
        };
        let len = g.input_len().max(g.output_len());
        let opix = g.out_h() * g.out_w();
        if len > RX || opix == 0 || opix > b.dy.len() {
            continue;
        }
        let x_zp = if case % 10 == 9 { 200 } else { r(256) as i32 - 128 };
        for v in b.rx[..g.input_len()].iter_mut() {
            *v = r(256) as i8;
        }
        for v in b.rw[..g.weight_len()].iter_mut() {
            *v = (r(255) as i32 - 127) as i8;
        }
        let family = r(3);
        for o in 0..c {
            b.rb[o] = r(4001) as i32 - 2000;
            let scale = match family {
                0 => 0.001 + 0.001 * r(50) as f64,
                1 => 1.0 / (1u32 << (1 + r(20))) as f64,
                _ => 0.25 + r(1000) as f64 / 4000.0,
            };
            b.rrq[o] = Requant::from_scale(scale)?;
        }
        let (lo, hi) = if case % 2 == 0 {
            (i8::MIN, i8::MAX)
        } else {
            (-128 + r(20) as i8, 127 - r(20) as i8)
        };
        let y_zp = r(41) as i32 - 20;
        let (w, bias, rq) = (&b.rw[..g.weight_len()], &b.rb[..c], &b.rrq[..c]);
        let n = g.output_len();
        reference_conv(&g, &b.rx[..g.input_len()], x_zp, w, bias, rq, y_zp, lo, hi, &mut b.ry_ref[..n]);
        b.ry[..g.input_len()].copy_from_slice(&b.rx[..g.input_len()]);
        let plane = &mut b.dy[..opix];
        conv2d_depthwise_in_place_plane(&g, &mut b.ry[..len], x_zp, w, bias, rq, y_zp, lo, hi, plane)?;
        if b.ry[..n] != b.ry_ref[..n] {
            say!("mismatch: {g:?} x_zp {x_zp}");
            return Err(tt_core::Error::InvalidParameter {
                what: "in-place depthwise differs from the plain reference on a random geometry",
            });
        }
        checked += 1;
    }
    // A map large enough that the plane itself (48 x 48 pixels) holds the pending pixels.
    let g = Conv2dGeom::new(48, 48, 8, 8, 3, 3, 1, 1, 1, 1, 1, 1, 8)?;
    let (li, opix) = (g.input_len(), g.out_h() * g.out_w());
    for v in b.dx[..li].iter_mut() {
        *v = r(256) as i8;
    }
    for o in 0..8 {
        b.rb[o] = r(4001) as i32 - 2000;
        b.rrq[o] = Requant::from_scale(0.001 + 0.001 * r(50) as f64)?;
    }
    let (w, bias, rq) = (&b.rw[..g.weight_len()], &b.rb[..8], &b.rrq[..8]);
    reference_conv(&g, &b.dx[..li], -3, w, bias, rq, 5, -128, 127, &mut b.dy_ref[..li]);
    b.dy[..li].copy_from_slice(&b.dx[..li]);
    conv2d_depthwise_in_place_plane(&g, &mut b.dy[..li], -3, w, bias, rq, 5, -128, 127, &mut b.y[..opix])?;
    if b.dy[..li] != b.dy_ref[..li] {
        return Err(tt_core::Error::InvalidParameter {
            what: "in-place depthwise differs from the plain reference on a 48x48 map",
        });
    }
    Ok(checked + 1)
}

#[entry]
fn main() -> ! {
    stack_paint();
    clock_start();
    match run() {
        Ok(()) => {
            say!(
                "stack peak {} B of {} B reserved",
                stack_peak(),
                stack_reserve()
            );
            exit(if stack_peak() <= stack_reserve() {
                0
            } else {
                1
            })
        }
        Err(e) => {
            say!("FAIL: kernel error: {e}");
            exit(1)
        }
    }
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    say!("panic: {info}");
    exit(101)
}

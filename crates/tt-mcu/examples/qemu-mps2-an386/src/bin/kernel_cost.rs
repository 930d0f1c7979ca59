//! Cost of one training step of a representative layer, measured in instructions (QEMU
//! mps2-an386 under `-icount shift=0`; exits 0 when every kernel ran): a 1x1
//! (pointwise) conv 8x8x96 -> 96 with ReLU6, the kind of late layer the paper's sparse schemes
//! update. Forward, clamp-mask backward, weight gradient of 1/4 of the output channels, input
//! gradient, bias gradient, and the QAS SGD update with stochastic rounding. Then the forward of
//! the other layer kinds (depthwise 3x3, first-layer 3x3 stride 2, a narrow expansion), each
//! beside its portable twin (`tt_core::ops::portable`, what the plain build runs). That the
//! two agree bit for bit is checked by `kernel_equivalence`, not here: this binary measures.
#![no_std]
#![no_main]

#[path = "../board.rs"]
#[macro_use]
mod board;

use cortex_m_rt::entry;
use tt_core::ops::act::clamp_mask_backward;
use tt_core::ops::conv::{
    conv2d_backward_bias, conv2d_backward_input, conv2d_backward_weight, conv2d_forward,
    Conv2dGeom,
};
use tt_core::ops::{portable, ChannelSelection};
use tt_core::qas::{sgd_update_bias, sgd_update_weights, SgdConfig, UpdateState, XorShift32};
use tt_core::quant::{QParams, Requant};

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
}

/// In .bss, so the linker's SRAM figure includes them.
static mut BUF: Buffers = Buffers {
    x: [0; H * W * C],
    w: [0; C * C],
    b: [0; C],
    // SAFETY: all-zero is a valid Requant (integer fields); every entry is set before use.
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
};

fn per_mac(instr: u64, macs: u64) -> (u64, u64) {
    let centi = instr * 100 / macs.max(1);
    (centi / 100, centi % 100)
}

/// Forward cost of one layer beside its portable twin on the same data (the plain build's
/// kernel).
#[allow(clippy::too_many_arguments)]
fn forward_vs_portable(
    name: &str,
    g: &Conv2dGeom,
    x: &[i8],
    x_zp: i32,
    w: &[i8],
    bias: &[i32],
    rq: &[Requant],
    y: &mut [i8],
    y_portable: &mut [i8],
) -> Result<(), tt_core::Error> {
    let (lo, hi) = (-128i8, -68i8);
    let t0 = instructions();
    conv2d_forward(g, x, x_zp, w, bias, rq, -128, lo, hi, y)?;
    let t_fwd = instructions() - t0;
    let r0 = instructions();
    portable::conv2d_forward(g, x, x_zp, w, bias, rq, -128, lo, hi, y_portable)?;
    let t_ref = instructions() - r0;
    let (f, r) = (per_mac(t_fwd, g.macs()), per_mac(t_ref, g.macs()));
    let speedup = t_ref * 100 / t_fwd.max(1);
    say!(
        "  {name:<16} {:>9} instr  {:>7} MACs  {}.{:02} instr/MAC  (portable {}.{:02}; {}.{:02}x faster)",
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
    forward_vs_portable(
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
    forward_vs_portable(
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
    forward_vs_portable(
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
    portable::conv2d_forward(
        &g,
        &b.x,
        x_q.zero_point,
        &b.w,
        &b.b,
        &b.rq,
        y_q.zero_point,
        lo,
        hi,
        &mut b.y_ref,
    )?;
    let t_ref = instructions() - r0;
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
        "  forward, portable {:>8} instr  {:>7} MACs  {}.{:02} instr/MAC  (the plain build's kernel; {}.{:02}x slower)",
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
    // The step without the portable run in the middle of it.
    let step = t5 - t0 - t_ref;
    let s = per_mac(step, all);
    say!(
        "  step             {:>9} instr  {:>7} MACs  {}.{:02} instr/MAC",
        step,
        all,
        s.0,
        s.1
    );
    other_layers(b, &mut rng)
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

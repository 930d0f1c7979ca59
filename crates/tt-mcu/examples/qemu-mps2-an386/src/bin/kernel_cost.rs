//! Cost of one training step of a representative layer, measured in instructions (QEMU
//! mps2-an386 under `-icount shift=0`; exits 0 when every kernel ran): a 1x1
//! (pointwise) conv 8x8x96 -> 96 with ReLU6, the kind of late layer the paper's sparse schemes
//! update. Forward, clamp-mask backward, weight gradient of 1/4 of the output channels, input
//! gradient, bias gradient, and the QAS SGD update with stochastic rounding.
#![no_std]
#![no_main]

#[path = "../board.rs"]
#[macro_use]
mod board;

use cortex_m_rt::entry;
use tt_core::ops::act::clamp_mask_backward;
use tt_core::ops::conv::{
    conv2d_backward_bias, conv2d_backward_input, conv2d_backward_weight, conv2d_forward, Conv2dGeom,
};
use tt_core::ops::ChannelSelection;
use tt_core::qas::{sgd_update_bias, sgd_update_weights, SgdConfig, UpdateState, XorShift32};
use tt_core::quant::{QParams, Requant};

use board::{clock_start, exit, instructions, stack_paint, stack_peak, stack_reserve};

const H: usize = 8;
const W: usize = 8;
const C: usize = 96;
const SEL: usize = C / 4;

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
}

/// In .bss, so the linker's SRAM figure includes them.
static mut BUF: Buffers = Buffers {
    x: [0; H * W * C],
    w: [0; C * C],
    b: [0; C],
    rq: [Requant {
        multiplier: 0,
        shift: 0,
    }; C],
    ws: [0.0; C],
    y: [0; H * W * C],
    y_ref: [0; H * W * C],
    gy: [0.0; H * W * C],
    gx: [0.0; H * W * C],
    gw: [0.0; SEL * C],
    gb: [0.0; C],
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
    Ok(())
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

//! Int8 conv throughput on MobileNetV2-style layer shapes (3x3 depthwise and 1x1 pointwise at
//! 48x48-64x64, 16-96 channels): forward, input gradient and weight gradient, in MAC/s on one
//! core of the host. `cargo bench -p tt-core` prints a table; nothing is asserted.
use std::hint::black_box;
use std::time::{Duration, Instant};

use tt_core::ops::conv::*;
use tt_core::ops::ChannelSelection;
use tt_core::quant::{QParams, Requant};

struct Shape {
    name: &'static str,
    g: Conv2dGeom,
}

fn dw(name: &'static str, hw: usize, c: usize, stride: usize) -> Shape {
    Shape {
        name,
        g: Conv2dGeom::new(hw, hw, c, c, 3, 3, stride, stride, 1, 1, 1, 1, c).unwrap(),
    }
}

fn pw(name: &'static str, hw: usize, ci: usize, co: usize) -> Shape {
    Shape {
        name,
        g: Conv2dGeom::new(hw, hw, ci, co, 1, 1, 1, 1, 0, 0, 0, 0, 1).unwrap(),
    }
}

/// CPU time of the calling thread in seconds (`CLOCK_THREAD_CPUTIME_ID`), so that other
/// processes sharing the machine do not inflate the figures; wall time on other systems.
#[cfg(all(target_os = "linux", target_pointer_width = "64"))]
fn thread_seconds() -> Option<f64> {
    #[repr(C)]
    struct Timespec {
        sec: i64,
        nsec: i64,
    }
    extern "C" {
        fn clock_gettime(clock: i32, tp: *mut Timespec) -> i32;
    }
    const CLOCK_THREAD_CPUTIME_ID: i32 = 3;
    let mut t = Timespec { sec: 0, nsec: 0 };
    // SAFETY: `t` is a valid, writable timespec; glibc/musl define this ABI on 64-bit Linux.
    let rc = unsafe { clock_gettime(CLOCK_THREAD_CPUTIME_ID, &mut t) };
    (rc == 0).then_some(t.sec as f64 + t.nsec as f64 * 1e-9)
}

#[cfg(not(all(target_os = "linux", target_pointer_width = "64")))]
fn thread_seconds() -> Option<f64> {
    None
}

/// Runs `f` repeatedly for at least `min` and returns the best time of one run.
fn time(min: Duration, mut f: impl FnMut()) -> f64 {
    f();
    let start = Instant::now();
    let mut best = f64::MAX;
    while start.elapsed() < min {
        let (t, c) = (Instant::now(), thread_seconds());
        f();
        let dt = match (c, thread_seconds()) {
            (Some(a), Some(b)) if b > a => b - a,
            _ => t.elapsed().as_secs_f64(),
        };
        best = best.min(dt);
    }
    best
}

fn fill(n: usize, seed: u32) -> Vec<i8> {
    let mut s = seed | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            (s >> 24) as i8
        })
        .collect()
}

fn main() {
    // `cargo bench` passes `--bench`; a filter argument selects shapes by name.
    let filter: Option<String> = std::env::args().skip(1).find(|a| !a.starts_with("--"));
    let shapes = [
        dw("dw3x3 64x64x16 s1", 64, 16, 1),
        dw("dw3x3 64x64x48 s2", 64, 48, 2),
        dw("dw3x3 48x48x48 s1", 48, 48, 1),
        dw("dw3x3 48x48x96 s1", 48, 96, 1),
        pw("pw1x1 64x64 16->48", 64, 16, 48),
        pw("pw1x1 64x64 48->16", 64, 48, 16),
        pw("pw1x1 48x48 48->96", 48, 48, 96),
        pw("pw1x1 48x48 96->24", 48, 96, 24),
    ];
    let min = Duration::from_millis(300);
    println!(
        "{:<22} {:>10} {:>14} {:>14} {:>14}",
        "int8 conv (1 sample)", "MMAC", "fwd GMAC/s", "bwd-in GMAC/s", "bwd-w GMAC/s"
    );
    for s in &shapes {
        if let Some(f) = &filter {
            if !s.name.contains(f.as_str()) {
                continue;
            }
        }
        let g = &s.g;
        let x = fill(g.input_len(), 1);
        let w: Vec<i8> = fill(g.weight_len(), 2)
            .into_iter()
            .map(|v| v.max(-127))
            .collect();
        let bias = vec![100i32; g.out_c];
        let rq = vec![Requant::from_scale(0.0037).unwrap(); g.out_c];
        let ws = vec![0.01f32; g.out_c];
        let mut out = vec![0i8; g.output_len()];
        // A ReLU-masked gradient: about half the entries are zero, as after a real clamp.
        let go: Vec<f32> = fill(g.output_len(), 3)
            .iter()
            .map(|&v| if v < 0 { 0.0 } else { v as f32 * 1e-3 })
            .collect();
        let mut gi = vec![0f32; g.input_len()];
        let mut gw = vec![0f32; g.weight_len()];
        let q = QParams {
            scale: 0.02,
            zero_point: -3,
        };
        let t_f = time(min, || {
            conv2d_forward(g, &x, -3, &w, &bias, &rq, 5, -128, 127, &mut out).unwrap();
            black_box(&out);
        });
        let t_i = time(min, || {
            conv2d_backward_input(g, &go, &w, &ws, &mut gi).unwrap();
            black_box(&gi);
        });
        let t_w = time(min, || {
            conv2d_backward_weight(g, &x, q, &go, ChannelSelection::output(g.out_c), &mut gw)
                .unwrap();
            black_box(&gw);
        });
        let macs = g.macs() as f64;
        println!(
            "{:<22} {:>10.2} {:>14.2} {:>14.2} {:>14.2}",
            s.name,
            macs / 1e6,
            macs / t_f / 1e9,
            macs / t_i / 1e9,
            macs / t_w / 1e9
        );
    }
    println!("(thread CPU time, best of repeated runs; backward inputs are ReLU-masked: ~50% zero");
    println!(" gradients, which the general backward path skips)");
}

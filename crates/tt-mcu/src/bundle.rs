//! Host side (feature `host`): the files a firmware includes, and the host run every firmware
//! run is compared with.
//!
//! A bundle directory holds, all written by the export (nothing to hand-edit):
//!
//! ```text
//! plan.bin      the plan (tt-core's format)              -> flash
//! params.bin    the frozen parameter blob it was compiled with -> flash, 4-byte aligned
//! train_x.bin   int8 training samples, back to back (the plan's input layout)
//! train_y.bin   one u8 class label per training sample
//! test_x.bin    int8 held-out samples
//! test_y.bin    their labels
//! lr.bin        the learning rate to train with: one f32, little-endian (optional: without it,
//!               the plan's own rate); the firmware sets it with `Trainer::set_lr`
//! ```
//!
//! [`Bundle::demo`] builds a small self-contained one (random frozen features, a texture task),
//! so the firmware builds and trains without Python; `TT_MCU_BUNDLE=dir` makes the firmware
//! include an exported one instead.
extern crate std;

use std::path::Path;
use std::vec::Vec;
use std::{format, fs, io, string::String, vec};

use tt_core::compile::{compile, PlanSettings};
use tt_core::exec::{Executor, Target};
use tt_core::graph::{Graph, LayerParams, Node, NodeKind, TensorInfo, Window};
use tt_core::ir::{CompileOptions, LossKind, Precision};
use tt_core::plan::PlanView;
use tt_core::quant::Activation;
use tt_core::sparse::{ChannelAxis, LayerUpdate, Scheme};

#[derive(Clone, Debug, PartialEq)]
pub struct Bundle {
    pub plan: Vec<u8>,
    pub params: Vec<u8>,
    pub train_x: Vec<i8>,
    pub train_y: Vec<u8>,
    pub test_x: Vec<i8>,
    pub test_y: Vec<u8>,
    /// The rate the firmware trains with (`lr.bin`; the plan's own when the bundle has none).
    pub lr: f32,
}

/// What a training run did: the loss of every step in order, accuracy on the test samples before
/// and after, and the final learned state. The firmware reproduces exactly this.
#[derive(Clone, Debug, PartialEq)]
pub struct Run {
    pub losses: Vec<f32>,
    pub correct_before: usize,
    pub correct_after: usize,
    pub state: Vec<u8>,
}

fn as_u8(x: &[i8]) -> Vec<u8> {
    x.iter().map(|&v| v as u8).collect()
}

fn as_i8(x: &[u8]) -> Vec<i8> {
    x.iter().map(|&v| v as i8).collect()
}

fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

impl Bundle {
    pub fn write(&self, dir: &Path) -> io::Result<()> {
        fs::create_dir_all(dir)?;
        for (name, bytes) in [
            ("plan.bin", self.plan.clone()),
            ("params.bin", self.params.clone()),
            ("train_x.bin", as_u8(&self.train_x)),
            ("train_y.bin", self.train_y.clone()),
            ("test_x.bin", as_u8(&self.test_x)),
            ("test_y.bin", self.test_y.clone()),
            ("lr.bin", self.lr.to_le_bytes().to_vec()),
        ] {
            // Write then rename: a reader never sees a half-written file.
            let tmp = dir.join(format!(".{name}.tmp"));
            fs::write(&tmp, bytes)?;
            fs::rename(tmp, dir.join(name))?;
        }
        Ok(())
    }

    /// Reads and checks a bundle: the plan parses, the blob belongs to it, and the samples are
    /// whole inputs with one label each.
    pub fn read(dir: &Path) -> io::Result<Bundle> {
        let rd = |n: &str| {
            fs::read(dir.join(n))
                .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", dir.join(n).display())))
        };
        let plan = rd("plan.bin")?;
        let lr = match fs::read(dir.join("lr.bin")) {
            Ok(bytes) => f32::from_le_bytes(bytes.as_slice().try_into().map_err(|_| {
                invalid(format!(
                    "lr.bin holds {} bytes, expected one f32 (4)",
                    bytes.len()
                ))
            })?),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                PlanView::parse(&plan)
                    .map_err(|e| invalid(format!("plan.bin: {e}")))?
                    .globals
                    .lr
            }
            Err(e) => {
                return Err(io::Error::new(
                    e.kind(),
                    format!("{}: {e}", dir.join("lr.bin").display()),
                ))
            }
        };
        let b = Bundle {
            plan,
            params: rd("params.bin")?,
            train_x: as_i8(&rd("train_x.bin")?),
            train_y: rd("train_y.bin")?,
            test_x: as_i8(&rd("test_x.bin")?),
            test_y: rd("test_y.bin")?,
            lr,
        };
        b.check().map_err(invalid)?;
        Ok(b)
    }

    pub fn input_len(&self) -> Result<usize, String> {
        let pv = PlanView::parse(&self.plan).map_err(|e| format!("plan.bin: {e}"))?;
        Ok(pv
            .tensor(pv.globals.input as usize)
            .map_err(|e| format!("plan.bin: {e}"))?
            .numel())
    }

    pub fn arena_bytes(&self) -> Result<usize, String> {
        Ok(PlanView::parse(&self.plan)
            .map_err(|e| format!("plan.bin: {e}"))?
            .arena_bytes)
    }

    pub fn check(&self) -> Result<(), String> {
        let pv = PlanView::parse(&self.plan).map_err(|e| format!("plan.bin: {e}"))?;
        if pv.params_len != self.params.len() || tt_core::crc::crc32(&self.params) != pv.params_crc
        {
            return Err("params.bin does not belong to plan.bin (length or CRC)".into());
        }
        let n = self.input_len()?;
        for (x, y, what) in [
            (&self.train_x, &self.train_y, "train"),
            (&self.test_x, &self.test_y, "test"),
        ] {
            if x.len() != y.len() * n {
                return Err(format!(
                    "{what}_x.bin holds {} bytes, expected {} labels x {n} inputs",
                    x.len(),
                    y.len()
                ));
            }
        }
        if self.train_y.is_empty() {
            return Err("train_y.bin: no training samples".into());
        }
        if !(self.lr.is_finite() && self.lr >= 0.0) {
            return Err(format!(
                "lr.bin: the learning rate {} is not a finite number >= 0",
                self.lr
            ));
        }
        Ok(())
    }

    /// The reference run at the bundle's rate: accuracy on the test samples, `epochs` passes over
    /// the training samples in order (one step each), accuracy again.
    pub fn run(&self, epochs: usize) -> Result<Run, String> {
        self.check()?;
        let n = self.input_len()?;
        let mut arena = vec![0u32; self.arena_bytes()?.div_ceil(4)];
        // The executor wants 4-byte aligned parameters, as they are in flash.
        let mut params = vec![0u32; self.params.len().div_ceil(4)];
        let params = as_bytes_mut(&mut params);
        params[..self.params.len()].copy_from_slice(&self.params);
        let params = &params[..self.params.len()];
        let arena = as_bytes_mut(&mut arena);
        let mut ex = Executor::new(&self.plan, params, arena).map_err(|e| format!("{e}"))?;
        ex.init().map_err(|e| format!("{e}"))?;
        ex.lr = self.lr;
        let correct = |ex: &mut Executor| -> Result<usize, String> {
            let mut c = 0;
            for (x, &y) in self.test_x.chunks_exact(n).zip(&self.test_y) {
                c += (ex.predict(x).map_err(|e| format!("{e}"))? == y as usize) as usize;
            }
            Ok(c)
        };
        let correct_before = correct(&mut ex)?;
        let mut losses = Vec::new();
        for _ in 0..epochs {
            for (x, &y) in self.train_x.chunks_exact(n).zip(&self.train_y) {
                losses.push(
                    ex.step(x, Target::Class(y as usize))
                        .map_err(|e| format!("{e}"))?,
                );
            }
        }
        let correct_after = correct(&mut ex)?;
        Ok(Run {
            losses,
            correct_before,
            correct_after,
            state: ex.state().to_vec(),
        })
    }

    /// A small demo: 12x12 grey images of four textures (horizontal, vertical, diagonal stripes,
    /// checkerboard; random period, phase, contrast and noise), a conv-dw-pw-gap-fc network
    /// whose frozen features are random, and a sparse scheme training the classifier and half of
    /// the last pointwise conv's output channels plus its bias.
    pub fn demo() -> Bundle {
        let g = demo_graph();
        let mut layers = vec![LayerUpdate::default(); g.nodes.len()];
        layers[2] = LayerUpdate {
            bias: true,
            weight_ratio: 0.5,
            axis: ChannelAxis::Output,
        };
        layers[5] = LayerUpdate {
            bias: true,
            weight_ratio: 1.0,
            axis: ChannelAxis::Output,
        };
        let settings = PlanSettings {
            options: CompileOptions {
                reorder: true,
                precision: Precision::StochasticRounding,
                momentum: false,
                loss: LossKind::CrossEntropy,
                accumulate: false,
            },
            seed: 1,
            lr: 0.1,
            momentum: 0.0,
        };
        let c = compile(
            &g,
            &Scheme { layers },
            &settings,
            br#"{"model":"tt-mcu demo textures"}"#,
        )
        .expect("the demo graph compiles");
        let mut r = Lcg(2024);
        let (train_x, train_y) = textures(&mut r, 48);
        let (test_x, test_y) = textures(&mut r, 32);
        Bundle {
            plan: c.plan,
            params: c.params,
            train_x,
            train_y,
            test_x,
            test_y,
            lr: settings.lr,
        }
    }
}

fn as_bytes_mut(w: &mut [u32]) -> &mut [u8] {
    // SAFETY: u8 has no alignment or validity requirements; the length covers the same bytes.
    unsafe { core::slice::from_raw_parts_mut(w.as_mut_ptr() as *mut u8, w.len() * 4) }
}

struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> u32 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) as u32
    }

    fn int(&mut self, lo: i32, hi: i32) -> i32 {
        lo + (self.next() % (hi - lo + 1) as u32) as i32
    }
}

const SIDE: usize = 12;
pub const DEMO_CLASSES: usize = 4;

/// `n` samples, classes in rotation, quantized with the input's scale 1/64 and zero point 0.
fn textures(r: &mut Lcg, n: usize) -> (Vec<i8>, Vec<u8>) {
    let mut xs = Vec::with_capacity(n * SIDE * SIDE);
    let mut ys = Vec::with_capacity(n);
    for i in 0..n {
        let class = i % DEMO_CLASSES;
        let period = r.int(3, 5);
        let phase = r.int(0, period - 1);
        let amp = r.int(40, 64);
        for y in 0..SIDE as i32 {
            for x in 0..SIDE as i32 {
                let t = match class {
                    0 => y,
                    1 => x,
                    2 => x + y,
                    _ => (x / 2 + y / 2) * (period - 1),
                };
                let on = (t + phase).rem_euclid(period) < period / 2 + (period & 1);
                let v = if on { amp } else { -amp } + r.int(-16, 16);
                xs.push(v.clamp(-128, 127) as i8);
            }
        }
        ys.push(class as u8);
    }
    (xs, ys)
}

fn tensor(c: u32, h: u32, w: u32, scale: f32, zero_point: i32) -> TensorInfo {
    TensorInfo {
        c,
        h,
        w,
        scale,
        zero_point,
    }
}

fn window(k: u16, s: u16, p: u16) -> Window {
    Window {
        kh: k,
        kw: k,
        sh: s,
        sw: s,
        pt: p,
        pl: p,
        pb: p,
        pr: p,
    }
}

fn layer(r: &mut Lcg, n: usize, out: usize, ws: f32) -> Option<LayerParams> {
    Some(LayerParams {
        weight: (0..n).map(|_| r.int(-100, 100) as i8).collect(),
        bias: vec![0; out],
        weight_scale: vec![ws; out],
    })
}

fn demo_graph() -> Graph {
    let mut r = Lcg(7);
    let relu6 = 6.0 / 255.0;
    let tensors = vec![
        tensor(1, 12, 12, 1.0 / 64.0, 0),
        tensor(8, 12, 12, relu6, -128),
        tensor(8, 6, 6, relu6, -128),
        tensor(16, 6, 6, relu6, -128),
        tensor(16, 1, 1, relu6 / 2.0, -128),
        tensor(16, 1, 1, relu6 / 2.0, -128),
        tensor(4, 1, 1, 0.05, 0),
    ];
    let node = |name: &str, kind, input: usize, output| Node {
        name: name.into(),
        kind,
        inputs: vec![input],
        output,
    };
    let conv = |k, s, p, groups| NodeKind::Conv {
        win: window(k, s, p),
        groups,
        act: Activation::Relu6,
    };
    let nodes = vec![
        node("conv0", conv(3, 1, 1, 1), 0, 1),
        node("dw1", conv(3, 2, 1, 8), 1, 2),
        node("pw2", conv(1, 1, 0, 1), 2, 3),
        node("gap", NodeKind::GlobalAvgPool, 3, 4),
        node("flatten", NodeKind::Flatten, 4, 5),
        node(
            "fc",
            NodeKind::Fc {
                act: Activation::None,
            },
            5,
            6,
        ),
    ];
    let params = vec![
        layer(&mut r, 8 * 9, 8, 0.006),
        layer(&mut r, 8 * 9, 8, 0.006),
        layer(&mut r, 16 * 8, 16, 0.005),
        None,
        None,
        layer(&mut r, 4 * 16, 4, 0.002),
    ];
    Graph {
        tensors,
        nodes,
        params,
        input: 0,
        output: 6,
        rounding: tt_core::quant::Rounding::Single,
    }
}

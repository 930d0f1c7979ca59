//! The compile driver: forward graph + sparse scheme -> training graph (`autodiff`) -> memory
//! plan (`planner`) -> plan bytes and parameter blob, with the search over execution layouts.
//!
//! The writer of the format lives here, above the compiler it drives; the reader
//! ([`PlanView`]) stays in `plan`, below it, so the MCU's parser holds no compiler. Every plan
//! written is parsed back before it is returned: the two cannot drift apart unnoticed.
use alloc::vec::Vec;

use crate::autodiff::{build_with, patch_candidates, Layout, TrainingGraph};
use crate::crc::crc32;
use crate::graph::{Graph, NodeKind};
use crate::ir::{CompileOptions, NONE};
use crate::plan::{
    PlanView, FLAG_ACCUMULATE, FLAG_DOUBLE_ROUNDING, HEADER_LEN, MAGIC, NODE_ADD, NODE_AVGPOOL,
    NODE_CONV, NODE_FC, NODE_FLATTEN, NODE_GAP, NODE_MAXPOOL, VERSION, VERSION_PLAIN,
    VERSION_ROUNDING,
};
use crate::planner::MemoryPlan;
use crate::quant::{Requant, Rounding};
use crate::sparse::Scheme;
use crate::{Error, Result};

/// Everything besides the graph that goes into a plan.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PlanSettings {
    pub options: CompileOptions,
    pub seed: u64,
    pub lr: f32,
    pub momentum: f32,
}

fn u8_fits(v: u16, what: &'static str) -> Result<u8> {
    u8::try_from(v).map_err(|_| Error::InvalidParameter { what })
}

fn u32_of(v: usize, what: &'static str) -> Result<u32> {
    u32::try_from(v).map_err(|_| Error::InvalidParameter { what })
}

/// The parameter blob and each layer's offsets (weight, bias, scale, requant) in it.
pub fn encode_params(g: &Graph) -> Result<(Vec<u8>, Vec<[u32; 4]>)> {
    let mut blob = Vec::new();
    let mut offs = Vec::new();
    for (i, p) in g.params.iter().enumerate() {
        let Some(p) = p else { continue };
        let n = &g.nodes[i];
        let s_in = g.tensors[n.inputs[0]].scale as f64;
        let s_out = g.tensors[n.output].scale as f64;
        let w_off = u32_of(blob.len(), "params too large")?;
        blob.extend(p.weight.iter().map(|&v| v as u8));
        while blob.len() % 4 != 0 {
            blob.push(0);
        }
        let b_off = u32_of(blob.len(), "params too large")?;
        for &b in &p.bias {
            blob.extend_from_slice(&b.to_le_bytes());
        }
        let s_off = u32_of(blob.len(), "params too large")?;
        for &s in &p.weight_scale {
            blob.extend_from_slice(&s.to_le_bytes());
        }
        let r_off = u32_of(blob.len(), "params too large")?;
        for &s in &p.weight_scale {
            let fc = matches!(n.kind, NodeKind::Fc { .. });
            let r = Requant::from_scale(s_in * s as f64 / s_out)?
                .with_rounding(g.rounding.for_layer(fc));
            blob.extend_from_slice(&r.multiplier.to_le_bytes());
            blob.extend_from_slice(&r.shift.to_le_bytes());
            blob.extend_from_slice(&r.rounding.to_le_bytes());
        }
        offs.push([w_off, b_off, s_off, r_off]);
    }
    Ok((blob, offs))
}

/// The result of compiling a graph for training.
#[derive(Clone, Debug)]
pub struct Compiled {
    pub plan: Vec<u8>,
    pub params: Vec<u8>,
    pub training: TrainingGraph,
    pub memory: MemoryPlan,
}

/// Forward graph + scheme -> training graph -> memory plan -> plan bytes, with the execution
/// layout (patch stage, in-place depthwise) that gives the smallest peak.
pub fn compile(
    g: &Graph,
    scheme: &Scheme,
    settings: &PlanSettings,
    meta: &[u8],
) -> Result<Compiled> {
    compile_with(g, scheme, settings, meta, None, false, Objective::Memory)
}

/// Patch grids the layout search tries.
pub const PATCH_GRIDS: [usize; 5] = [2, 3, 4, 6, 8];

/// What the layout search minimizes. Layouts never change the numbers, only the peak and the
/// work: a patch stage cuts the peak by recomputing halos, more of them on finer grids.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Objective {
    /// The smallest peak.
    #[default]
    Memory,
    /// Spare SRAM bought back as speed: among the layouts whose peak is at most `budget`
    /// bytes, one running inverted-residual blocks' backward fused, then the fewest executed
    /// forward MACs ([`ForwardMacs::executed`](crate::ir::ForwardMacs::executed)), then one running the forward out of place,
    /// then the smaller peak. What MACs do not show, measured on the Cortex-M4
    /// (ProxylessNAS-w0.3 @128, whole tensors): op by op, the backward's MACs took 83.4 M
    /// instructions per step instead of 40.8 M fused, and the in-place forward kernels (an
    /// output ring, a reversed pixel walk) 59.8 M instead of 57.3 M out of place. When no
    /// layout fits, the smallest peak (which then does not fit either).
    Compute { budget: usize },
}

/// A layout's rank under an objective: lower is better.
type Rank = (bool, bool, u64, bool, usize);

impl Objective {
    fn key(self, layout: &Layout, peak: usize, macs: u64) -> Rank {
        match self {
            Objective::Memory => (false, false, 0, false, peak),
            Objective::Compute { budget } if peak <= budget => {
                let fused = layout.in_place || layout.fuse_blocks;
                (false, !fused, macs, layout.in_place, peak)
            }
            Objective::Compute { .. } => (true, false, 0, false, peak),
        }
    }
}

/// `compile` with a given layout (`Some`), or searching for the best one under `objective`
/// (`None`).
pub fn compile_with(
    g: &Graph,
    scheme: &Scheme,
    settings: &PlanSettings,
    meta: &[u8],
    fixed: Option<Layout>,
    stream_input: bool,
    objective: Objective,
) -> Result<Compiled> {
    if let Some(layout) = fixed {
        let training = build_with(g, scheme, &settings.options, &layout)?;
        let memory = crate::planner::plan(&training.buffers, &training.ops);
        let (plan, params) = encode(g, &training, &memory, settings, meta)?;
        return Ok(Compiled {
            plan,
            params,
            training,
            memory,
        });
    }
    g.validate()?;
    let mut patches = alloc::vec![];
    if !stream_input {
        patches.push(None);
    }
    for &last in &patch_candidates(g, scheme)? {
        patches.extend(PATCH_GRIDS.map(|grid| Some((last, grid))));
    }
    let mut layouts = alloc::vec![];
    if !stream_input {
        layouts.push(Layout::default());
    }
    for shrink_in_place in [false, true] {
        for &patch in &patches {
            layouts.push(Layout {
                patch,
                in_place: true,
                shrink_in_place,
                stream_input,
                ..Layout::default()
            });
        }
    }
    if let Objective::Compute { .. } = objective {
        for &patch in &patches {
            layouts.push(Layout {
                patch,
                fuse_blocks: true,
                stream_input,
                ..Layout::default()
            });
        }
    }
    let mut best: Option<(TrainingGraph, MemoryPlan, Rank)> = None;
    let mut best_layout = Layout::default();
    for layout in &layouts {
        let Ok(training) = build_with(g, scheme, &settings.options, layout) else {
            if *layout == Layout::default() {
                // The plain layout always builds unless the graph or scheme is invalid.
                build_with(g, scheme, &settings.options, layout)?;
            }
            continue;
        };
        let memory = crate::planner::plan(&training.buffers, &training.ops);
        // The work is read back from the encoded plan: what is chosen on is what the plan
        // reports and the executor runs.
        let macs = match objective {
            Objective::Memory => 0,
            Objective::Compute { .. } => {
                let work = encode(g, &training, &memory, settings, meta)
                    .and_then(|(p, _)| PlanView::parse(&p).and_then(|v| v.forward_macs()));
                // A layout that does not encode is not a candidate (as one that does not
                // build); the chosen one is encoded again below.
                let Ok(work) = work else {
                    continue;
                };
                work.executed
            }
        };
        let key = objective.key(layout, memory.arena_bytes, macs);
        if best.as_ref().is_none_or(|(_, _, k)| key < *k) {
            best = Some((training, memory, key));
            best_layout = *layout;
        }
    }
    let (mut training, mut memory, _) = best.ok_or(Error::InvalidParameter {
        what: "compile: no layout builds (a streamed input needs the first convs to form a patch stage)",
    })?;
    // In-place shrinking is a per-node trade-off: keep each such node out of place when that
    // alone lowers the peak (one greedy pass).
    let mut layout = best_layout;
    if layout.shrink_in_place {
        for (i, n) in g.nodes.iter().enumerate().take(256) {
            let shrinking = match n.kind {
                NodeKind::Add { .. } => true,
                NodeKind::Conv { .. } => {
                    g.tensors[n.output].numel() < g.tensors[n.inputs[0]].numel()
                }
                _ => false,
            };
            if !shrinking {
                continue;
            }
            let mut trial = layout;
            trial.out_of_place[i / 64] |= 1 << (i % 64);
            let Ok(t) = build_with(g, scheme, &settings.options, &trial) else {
                continue;
            };
            let m = crate::planner::plan(&t.buffers, &t.ops);
            if m.arena_bytes < memory.arena_bytes {
                layout = trial;
                training = t;
                memory = m;
            }
        }
    }
    let (plan, params) = encode(g, &training, &memory, settings, meta)?;
    Ok(Compiled {
        plan,
        params,
        training,
        memory,
    })
}

/// Serializes a compiled training graph; returns (plan bytes, parameter blob).
pub fn encode(
    g: &Graph,
    tg: &TrainingGraph,
    mp: &MemoryPlan,
    settings: &PlanSettings,
    meta: &[u8],
) -> Result<(Vec<u8>, Vec<u8>)> {
    let (params, poffs) = encode_params(g)?;
    let mut body = Vec::new();
    let put = |body: &mut Vec<u8>, v: u32| body.extend_from_slice(&v.to_le_bytes());
    for c in [
        g.tensors.len(),
        g.nodes.len(),
        tg.layers.len(),
        tg.buffers.len(),
        tg.ops.len(),
        meta.len(),
    ] {
        put(&mut body, u32_of(c, "plan: count too large")?);
    }
    let o = &settings.options;
    put(&mut body, g.input as u32);
    put(&mut body, g.output as u32);
    body.extend_from_slice(&[
        o.loss as u8,
        o.precision as u8,
        o.reorder as u8,
        o.momentum as u8,
    ]);
    put(&mut body, tg.rng);
    body.extend_from_slice(&settings.seed.to_le_bytes());
    put(&mut body, mp.peak_op as u32);
    body.extend_from_slice(&settings.lr.to_le_bytes());
    body.extend_from_slice(&settings.momentum.to_le_bytes());
    for t in &g.tensors {
        put(&mut body, t.c);
        for d in [t.h, t.w] {
            let d = u16::try_from(d).map_err(|_| Error::InvalidParameter {
                what: "plan: tensor height/width above 65535",
            })?;
            body.extend_from_slice(&d.to_le_bytes());
        }
        body.extend_from_slice(&t.scale.to_le_bytes());
        body.extend_from_slice(&t.zero_point.to_le_bytes());
    }
    let mut layer_of = alloc::vec![NONE; g.nodes.len()];
    for (li, l) in tg.layers.iter().enumerate() {
        layer_of[l.node as usize] = li as u32;
    }
    for (i, n) in g.nodes.iter().enumerate() {
        let (kind, act, win, groups) = match n.kind {
            NodeKind::Conv { win, groups, act } => (NODE_CONV, act as u8, Some(win), groups),
            NodeKind::Fc { act } => (NODE_FC, act as u8, None, 1),
            NodeKind::Add { act } => (NODE_ADD, act as u8, None, 1),
            NodeKind::GlobalAvgPool => (NODE_GAP, 0, None, 1),
            NodeKind::AvgPool { win } => (NODE_AVGPOOL, 0, Some(win), 1),
            NodeKind::MaxPool { win } => (NODE_MAXPOOL, 0, Some(win), 1),
            NodeKind::Flatten => (NODE_FLATTEN, 0, None, 1),
        };
        body.extend_from_slice(&[kind, act, n.inputs.len() as u8, 0]);
        put(&mut body, n.inputs[0] as u32);
        put(&mut body, n.inputs.get(1).map_or(NONE, |&v| v as u32));
        put(&mut body, n.output as u32);
        let w = win.unwrap_or_default();
        for v in [w.kh, w.kw, w.sh, w.sw, w.pt, w.pl, w.pb, w.pr] {
            body.push(u8_fits(v, "plan: kernel/stride/padding above 255")?);
        }
        put(&mut body, groups);
        put(&mut body, layer_of[i]);
    }
    for (li, l) in tg.layers.iter().enumerate() {
        put(&mut body, l.node);
        body.extend_from_slice(&[l.sel.bias as u8, l.sel.axis as u8, 0, 0]);
        put(&mut body, u32_of(l.sel.channels, "plan: channels")?);
        for v in poffs[li] {
            put(&mut body, v);
        }
        for v in [l.weight, l.bias, l.precision, l.momentum_w, l.momentum_b] {
            put(&mut body, v);
        }
    }
    for (b, &off) in tg.buffers.iter().zip(&mp.offsets) {
        put(&mut body, u32_of(off, "plan: arena above 4 GB")?);
        put(&mut body, u32_of(b.bytes, "plan: buffer above 4 GB")?);
        body.extend_from_slice(&[b.kind as u8, 0, 0, 0]);
    }
    for op in &tg.ops {
        body.extend_from_slice(&[op.kind as u8, 0, 0, 0]);
        put(&mut body, op.node);
        put(&mut body, op.arg);
        for v in op.bufs {
            put(&mut body, v);
        }
    }
    body.extend_from_slice(meta);

    let mut out = Vec::with_capacity(HEADER_LEN + body.len());
    out.extend_from_slice(&MAGIC);
    let double = g.rounding == Rounding::Double;
    let version = match (double, o.accumulate) {
        (true, _) => VERSION_ROUNDING,
        (false, true) => VERSION,
        (false, false) => VERSION_PLAIN,
    };
    out.extend_from_slice(&version.to_le_bytes());
    out.extend_from_slice(&(HEADER_LEN as u16).to_le_bytes());
    for v in [
        u32_of(body.len(), "plan too large")?,
        crc32(&body),
        u32_of(params.len(), "params too large")?,
        crc32(&params),
        u32_of(mp.arena_bytes, "arena too large")?,
        u32_of(mp.state_bytes, "state too large")?,
        u32_of(mp.lower_bound, "arena too large")?,
        if o.accumulate { FLAG_ACCUMULATE } else { 0 }
            | if double { FLAG_DOUBLE_ROUNDING } else { 0 },
    ] {
        out.extend_from_slice(&v.to_le_bytes());
    }
    out.extend_from_slice(&body);
    // The encoder and the reader are one definition: a plan that does not parse is a bug
    // here, reported as an error rather than shipped.
    PlanView::parse(&out)?;
    Ok((out, params))
}

//! Compile-time autodiff: forward graph + sparse scheme -> one static list of training ops
//! (forward, loss, backward, update) over named buffers, already pruned.
//!
//! Pruning rules, all decided here so the executor never tests them:
//! - a node gets a backward pass only if some updated layer is at or before it (back-propagation
//!   stops at the earliest updated layer);
//! - weight gradients only for layers whose weights are trained, and only for the selected
//!   channels; input gradients only towards tensors whose producers need one;
//! - an activation outlives the forward pass only if a weight-gradient op reads it (int8, or a
//!   compact int8 copy of the first `k` channels for an input-channel selection); the clamp of a
//!   requantized output is kept as a 1-bit mask.
//!
//! Reordering: with `reorder`, each layer's update directly follows its gradient ops, so the
//! gradient buffers of different layers never coexist; without it every update waits until the
//! whole backward pass is done (the conventional order, for comparison).
//!
//! Accumulation (`CompileOptions::accumulate`): weight and bias gradients add into persistent fp32
//! accumulators and every update moves to a separate update phase at the end of the op list (run
//! once per batch by the executor). No fused gradient-and-update op is used then: the weights
//! must not move between the samples of a batch.
use alloc::vec::Vec;

use crate::graph::{Graph, NodeKind};
use crate::sparse::{ChannelAxis, Scheme, Selection};
use crate::{Error, Result};

pub use crate::plan::{
    BufKind, Buffer, CompileOptions, LossKind, OpKind, Precision, TrainOp, ACCUMULATE, IN_PLACE,
    NONE,
};

/// State buffers of one trainable layer (NONE where not trained).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LayerState {
    pub node: u32,
    pub sel: Selection,
    pub weight: u32,
    pub bias: u32,
    pub precision: u32,
    pub momentum_w: u32,
    pub momentum_b: u32,
    /// Gradient accumulators (accumulation plans only).
    pub accum_w: u32,
    pub accum_b: u32,
}

#[derive(Clone, Debug)]
pub struct TrainingGraph {
    pub buffers: Vec<Buffer>,
    pub ops: Vec<TrainOp>,
    /// One entry per conv/fc node, in node order.
    pub layers: Vec<LayerState>,
    /// Activation buffer of each tensor (a flatten output shares its input's buffer).
    pub act_buf: Vec<u32>,
    pub rng: u32,
}

struct Builder {
    buffers: Vec<Buffer>,
}

impl Builder {
    fn add(&mut self, kind: BufKind, bytes: usize, node: usize) -> u32 {
        self.buffers.push(Buffer {
            kind,
            bytes,
            node: node as u32,
        });
        (self.buffers.len() - 1) as u32
    }
}

/// Bytes of the trained weight slice of a layer.
pub fn trained_weights(g: &Graph, node: usize, sel: &Selection) -> usize {
    let Some(d) = g.weight_dims(node) else {
        return 0;
    };
    match sel.axis {
        ChannelAxis::Output => sel.channels * d.per_out(),
        ChannelAxis::Input => sel.channels * d.out_ch * d.area,
    }
}

/// Execution-layout choices the planner searches over (they change memory, never results).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Layout {
    /// Run nodes `0..=last` (a chain of frozen convs) patch by patch on a `grid` x `grid` grid.
    pub patch: Option<(usize, usize)>,
    /// Depthwise convs overwrite their input in the forward pass and their output gradient in
    /// the backward pass, channel by channel; expanding pointwise convs and adds overwrite an
    /// input read by nothing else.
    pub in_place: bool,
    /// Shrinking pointwise convs and adds also run in place (keeps a large input buffer alive as
    /// long as the small output: a win only when what follows reuses it, so it is searched).
    pub shrink_in_place: bool,
    /// Nodes (bit i of the set) kept out of place although `shrink_in_place` allows it.
    pub out_of_place: [u64; 4],
    /// The input sample is not copied into the arena: the patch stage reads its regions from
    /// where the caller keeps it (a camera frame buffer, flash). Needs a patch stage.
    pub stream_input: bool,
    /// Inverted-residual tails run their backward fused (channel by channel) without `in_place`
    /// (which implies it): the forward then runs out of place.
    pub fuse_blocks: bool,
}

impl Layout {
    fn shrinks(&self, node: usize) -> bool {
        self.shrink_in_place
            && self
                .out_of_place
                .get(node / 64)
                .is_none_or(|w| w & (1 << (node % 64)) == 0)
    }
}

pub fn build(g: &Graph, scheme: &Scheme, opt: &CompileOptions) -> Result<TrainingGraph> {
    build_with(g, scheme, opt, &Layout::default())
}

/// Nodes `0..=j` that can form a patch stage: a chain of convs from the graph input, each output
/// read only by the next conv, none of them needing a backward pass. Returns the candidate `j`s.
pub fn patch_candidates(g: &Graph, scheme: &Scheme) -> Result<Vec<usize>> {
    let sel = scheme.resolve(g)?;
    let mut out = Vec::new();
    let mut t = g.input;
    for (i, n) in g.nodes.iter().enumerate() {
        if i >= crate::plan::MAX_PATCH_CHAIN
            || !matches!(n.kind, NodeKind::Conv { .. })
            || n.inputs[0] != t
            || sel[i].updated()
        {
            break;
        }
        let consumers = g
            .nodes
            .iter()
            .filter(|m| m.inputs.contains(&n.output))
            .count();
        out.push(i);
        if consumers != 1 || n.output == g.output {
            break;
        }
        t = n.output;
    }
    Ok(out)
}

fn is_pointwise(g: &Graph, i: usize) -> bool {
    match g.nodes[i].kind {
        NodeKind::Conv { win, groups, .. } => {
            groups == 1
                && (win.kh, win.kw, win.sh, win.sw) == (1, 1, 1, 1)
                && (win.pt, win.pl, win.pb, win.pr) == (0, 0, 0, 0)
        }
        _ => false,
    }
}

fn is_depthwise(g: &Graph, i: usize) -> bool {
    let n = &g.nodes[i];
    match n.kind {
        NodeKind::Conv { groups, .. } => {
            let (a, b) = (g.tensors[n.inputs[0]].c, g.tensors[n.output].c);
            groups > 1 && groups == a && a == b
        }
        _ => false,
    }
}

/// Per-axis windows of the chain `0..=last` (rows, then columns).
pub fn chain_axes(
    g: &Graph,
    last: usize,
) -> Option<(
    [crate::plan::Axis1; crate::plan::MAX_PATCH_CHAIN],
    [crate::plan::Axis1; crate::plan::MAX_PATCH_CHAIN],
)> {
    let mut rows = [crate::plan::Axis1::default(); crate::plan::MAX_PATCH_CHAIN];
    let mut cols = rows;
    if last >= crate::plan::MAX_PATCH_CHAIN {
        return None;
    }
    for j in 0..=last {
        let n = &g.nodes[j];
        let NodeKind::Conv { win, .. } = n.kind else {
            return None;
        };
        let t = g.tensors[n.inputs[0]];
        rows[j] = crate::plan::Axis1 {
            k: win.kh as usize,
            s: win.sh as usize,
            p: win.pt as usize,
            n: t.h as usize,
        };
        cols[j] = crate::plan::Axis1 {
            k: win.kw as usize,
            s: win.sw as usize,
            p: win.pl as usize,
            n: t.w as usize,
        };
    }
    Some((rows, cols))
}

/// Largest ping and pong buffers (bytes) a patch stage needs over all its patches.
pub fn patch_buffers(g: &Graph, last: usize, grid: usize) -> Option<(usize, usize)> {
    let (rows, cols) = chain_axes(g, last)?;
    let out = g.tensors[g.nodes[last].output];
    let mut rr = [(0, 0, 0, 0); crate::plan::MAX_PATCH_CHAIN];
    let mut cr = rr;
    let mut sizes = [0usize; 2];
    for py in 0..grid {
        for px in 0..grid {
            let (y0, y1) = crate::plan::patch_bounds(out.h as usize, grid, py);
            let (x0, x1) = crate::plan::patch_bounds(out.w as usize, grid, px);
            if !crate::plan::patch_ranges(&rows[..=last], y0, y1, &mut rr)
                || !crate::plan::patch_ranges(&cols[..=last], x0, x1, &mut cr)
            {
                return None;
            }
            // Region j (0 = chain input, j+1 = output of node j) lives in buffer j % 2.
            for j in 0..=last + 1 {
                let (h, w, c) = if j <= last {
                    (
                        rr[j].1 - rr[j].0,
                        cr[j].1 - cr[j].0,
                        g.tensors[g.nodes[j].inputs[0]].c as usize,
                    )
                } else {
                    (y1 - y0, x1 - x0, out.c as usize)
                };
                sizes[j % 2] = sizes[j % 2].max(h * w * c);
            }
        }
    }
    Some((sizes[0], sizes[1]))
}

pub fn build_with(
    g: &Graph,
    scheme: &Scheme,
    opt: &CompileOptions,
    layout: &Layout,
) -> Result<TrainingGraph> {
    g.validate()?;
    let sel = scheme.resolve(g)?;
    let n_nodes = g.nodes.len();
    let mut b = Builder {
        buffers: Vec::new(),
    };

    // Persistent state first: the planner places it at the bottom of the arena.
    let mut layers = Vec::new();
    let mut any_weight = false;
    for (i, s) in sel.iter().enumerate() {
        let Some(d) = g.weight_dims(i) else { continue };
        let mut ls = LayerState {
            node: i as u32,
            sel: *s,
            weight: NONE,
            bias: NONE,
            precision: NONE,
            momentum_w: NONE,
            momentum_b: NONE,
            accum_w: NONE,
            accum_b: NONE,
        };
        if s.channels > 0 {
            let n = trained_weights(g, i, s);
            any_weight = true;
            ls.weight = b.add(BufKind::StateWeight, n, i);
            if opt.precision.extra_bytes() > 0 {
                ls.precision = b.add(BufKind::StatePrecision, n * opt.precision.extra_bytes(), i);
            }
            if opt.momentum {
                ls.momentum_w = b.add(BufKind::StateMomentum, 4 * n, i);
            }
            if opt.accumulate {
                ls.accum_w = b.add(BufKind::AccumWeight, 4 * n, i);
            }
        }
        if s.bias {
            ls.bias = b.add(BufKind::StateBias, 4 * d.out_ch, i);
            if opt.momentum {
                ls.momentum_b = b.add(BufKind::StateMomentum, 4 * d.out_ch, i);
            }
            if opt.accumulate {
                ls.accum_b = b.add(BufKind::AccumBias, 4 * d.out_ch, i);
            }
        }
        layers.push(ls);
    }
    let accum_of = |i: usize| {
        layers
            .iter()
            .find(|l: &&LayerState| l.node as usize == i)
            .map_or((NONE, NONE), |l| (l.accum_w, l.accum_b))
    };
    let rng = if any_weight && opt.precision == Precision::StochasticRounding {
        b.add(BufKind::StateRng, 8, 0)
    } else {
        NONE
    };

    // needs_bwd[n]: node n or something before it is updated, so gradients must reach it.
    let mut needs_bwd = alloc::vec![false; n_nodes];
    for (i, n) in g.nodes.iter().enumerate() {
        let upstream = n
            .inputs
            .iter()
            .any(|&t| g.producer(t).is_some_and(|p| needs_bwd[p]));
        needs_bwd[i] = sel[i].updated() || upstream;
    }
    let grad_needed = |t: usize| g.producer(t).is_some_and(|p| needs_bwd[p]);
    let has_mask = |k: &NodeKind| {
        matches!(
            k,
            NodeKind::Conv { .. } | NodeKind::Fc { .. } | NodeKind::Add { .. }
        )
    };

    // Forward ops.
    let mut act_buf = alloc::vec![NONE; g.tensors.len()];
    if layout.stream_input {
        let readers = g
            .nodes
            .iter()
            .filter(|m| m.inputs.contains(&g.input))
            .count();
        if layout.patch.is_none() || readers != 1 {
            return Err(Error::InvalidParameter {
                what: "autodiff: a streamed input needs a patch stage as its only reader",
            });
        }
    } else {
        act_buf[g.input] = b.add(BufKind::Input, g.tensors[g.input].numel(), 0);
    }
    let mut ops: Vec<TrainOp> = Vec::new();
    let mut masks = alloc::vec![NONE; n_nodes];
    // saved[n]: the buffer the weight gradient of layer n reads.
    let mut saved = alloc::vec![NONE; n_nodes];
    let save_slices =
        |t: usize, src: u32, b: &mut Builder, ops: &mut Vec<TrainOp>, saved: &mut Vec<u32>| {
            for (ci, c) in g.nodes.iter().enumerate() {
                if c.inputs[0] != t || sel[ci].channels == 0 || sel[ci].axis != ChannelAxis::Input {
                    continue;
                }
                let ti = g.tensors[t];
                let pixels = if matches!(c.kind, NodeKind::Fc { .. }) {
                    1
                } else {
                    ti.h as usize * ti.w as usize
                };
                let buf = b.add(BufKind::Saved, sel[ci].channels * pixels, ci);
                ops.push(TrainOp {
                    kind: OpKind::SaveChannels,
                    node: ci as u32,
                    arg: 0,
                    bufs: [src, buf, NONE, NONE],
                });
                saved[ci] = buf;
            }
        };
    if !layout.stream_input {
        save_slices(g.input, act_buf[g.input], &mut b, &mut ops, &mut saved);
    }

    let mut first_node = 0;
    if let Some((last, grid)) = layout.patch {
        let ok = patch_candidates(g, scheme)?.contains(&last) && grid >= 1;
        let bufs = patch_buffers(g, last, grid);
        let (Some((ping, pong)), true) = (bufs, ok) else {
            return Err(Error::InvalidParameter {
                what: "autodiff: nodes cannot run as a patch stage",
            });
        };
        let out_t = g.nodes[last].output;
        let out = b.add(BufKind::Activation, g.tensors[out_t].numel(), last);
        let ping = b.add(BufKind::Scratch, ping, 0);
        let pong = b.add(BufKind::Scratch, pong, 0);
        act_buf[out_t] = out;
        ops.push(TrainOp {
            kind: OpKind::PatchStage,
            node: 0,
            arg: last as u32 | (grid as u32) << 16,
            bufs: [act_buf[g.input], out, ping, pong],
        });
        save_slices(out_t, out, &mut b, &mut ops, &mut saved);
        first_node = last + 1;
    }
    for (i, n) in g.nodes.iter().enumerate().skip(first_node) {
        if matches!(n.kind, NodeKind::MaxPool { .. }) && needs_bwd[i] && grad_needed(n.inputs[0]) {
            return Err(Error::InvalidParameter {
                what: "autodiff: back-propagation through maxpool is not supported; train only layers after it",
            });
        }
        if matches!(n.kind, NodeKind::Flatten) {
            act_buf[n.output] = act_buf[n.inputs[0]];
            save_slices(n.output, act_buf[n.output], &mut b, &mut ops, &mut saved);
            continue;
        }
        let t_in = n.inputs[0];
        // Depthwise convs overwrite their input channel by channel; pointwise convs pixel by
        // pixel (an input pixel is dead once its output pixel exists). Only when nothing else
        // reads the input: one consumer, and no weight gradient needing it whole.
        let dw = is_depthwise(g, i) && sel[i].channels == 0;
        // A shrinking pointwise conv stays out of place: in place, its large input buffer would
        // live as long as its small output.
        let pw = is_pointwise(g, i)
            && !(sel[i].channels > 0 && sel[i].axis == ChannelAxis::Output)
            && ((layout.shrinks(i) && !needs_bwd[i])
                || g.tensors[n.output].numel() >= g.tensors[t_in].numel());
        let in_place = layout.in_place
            && (dw || pw)
            && t_in != g.input
            && (pw || g.tensors[n.output].numel() <= g.tensors[t_in].numel())
            && g.nodes.iter().filter(|m| m.inputs.contains(&t_in)).count() == 1;
        let single = |t: usize| g.nodes.iter().filter(|m| m.inputs.contains(&t)).count() == 1;
        // Only in the forward-only prefix: behind it, outputs are saved for the backward pass.
        let add_into =
            if layout.shrinks(i) && !needs_bwd[i] && matches!(n.kind, NodeKind::Add { .. }) {
                n.inputs
                    .iter()
                    .rposition(|&t| t != g.input && single(t) && n.inputs[0] != n.inputs[1])
            } else {
                None
            };
        if let Some(j) = add_into {
            // The output overwrites input j element by element.
            let buf = act_buf[n.inputs[j]];
            act_buf[n.output] = buf;
            ops.push(TrainOp {
                kind: OpKind::Forward,
                node: i as u32,
                arg: IN_PLACE | j as u32,
                bufs: [act_buf[n.inputs[0]], act_buf[n.inputs[1]], buf, NONE],
            });
        } else if in_place {
            let buf = act_buf[t_in];
            act_buf[n.output] = buf;
            let o = g.tensors[n.output];
            let bb = &mut b.buffers[buf as usize];
            bb.bytes = bb.bytes.max(o.numel());
            let plane = if dw {
                b.add(BufKind::Scratch, o.h as usize * o.w as usize, i)
            } else {
                b.add(BufKind::Scratch, o.c as usize, i)
            };
            ops.push(TrainOp {
                kind: OpKind::Forward,
                node: i as u32,
                arg: IN_PLACE,
                bufs: [buf, NONE, buf, plane],
            });
        } else {
            let out = b.add(BufKind::Activation, g.tensors[n.output].numel(), i);
            act_buf[n.output] = out;
            let in1 = if n.inputs.len() > 1 {
                act_buf[n.inputs[1]]
            } else {
                NONE
            };
            ops.push(TrainOp {
                kind: OpKind::Forward,
                node: i as u32,
                arg: 0,
                bufs: [act_buf[t_in], in1, out, NONE],
            });
        }
        let out = act_buf[n.output];
        if needs_bwd[i] && has_mask(&n.kind) {
            let m = b.add(BufKind::Mask, g.tensors[n.output].numel().div_ceil(8), i);
            ops.push(TrainOp {
                kind: OpKind::Mask,
                node: i as u32,
                arg: 0,
                bufs: [out, m, NONE, NONE],
            });
            masks[i] = m;
        }
        save_slices(n.output, out, &mut b, &mut ops, &mut saved);
    }
    for (i, n) in g.nodes.iter().enumerate() {
        if sel[i].channels > 0 && sel[i].axis == ChannelAxis::Output {
            saved[i] = act_buf[n.inputs[0]];
        }
    }

    // Loss.
    let out_t = g.tensors[g.output];
    let mut grad_buf = alloc::vec![NONE; g.tensors.len()];
    let gl = b.add(BufKind::Grad, 4 * out_t.numel(), n_nodes - 1);
    grad_buf[g.output] = gl;
    ops.push(TrainOp {
        kind: OpKind::Loss,
        node: (n_nodes - 1) as u32,
        arg: opt.loss as u32,
        bufs: [act_buf[g.output], gl, NONE, NONE],
    });

    // Backward, reverse topological order.
    let mut updates: Vec<TrainOp> = Vec::new();
    // Nodes whose backward a fused block op already ran.
    let mut fused = alloc::vec![false; n_nodes];
    let single_consumer = |t: usize| g.nodes.iter().filter(|m| m.inputs.contains(&t)).count() == 1;
    for (i, n) in g.nodes.iter().enumerate().rev() {
        if !needs_bwd[i] || fused[i] {
            continue;
        }
        let go = grad_buf[n.output];
        if go == NONE {
            // The output reaches the loss through no path (a dead branch): nothing to do.
            continue;
        }
        if matches!(n.kind, NodeKind::Flatten) {
            if grad_needed(n.inputs[0]) {
                grad_buf[n.inputs[0]] = go;
            }
            continue;
        }
        if masks[i] != NONE {
            ops.push(TrainOp {
                kind: OpKind::ApplyMask,
                node: i as u32,
                arg: 0,
                bufs: [go, masks[i], NONE, NONE],
            });
        }
        // An inverted-residual tail pw1 -> depthwise -> pw2 (this node) runs backward channel by
        // channel of the expanded tensor: its fp32 gradients never exist whole.
        let fuse = layout.in_place || layout.fuse_blocks;
        let block = if opt.reorder && !opt.accumulate && fuse && is_pointwise(g, i) {
            let t2 = n.inputs[0];
            g.producer(t2)
                .filter(|&d| {
                    is_depthwise(g, d)
                        && sel[d].channels == 0
                        && grad_needed(t2)
                        && grad_buf[t2] == NONE
                        && single_consumer(t2)
                        && masks[d] != NONE
                })
                .and_then(|d| {
                    let t1 = g.nodes[d].inputs[0];
                    g.producer(t1)
                        .filter(|&p1| {
                            is_pointwise(g, p1)
                                && single_consumer(t1)
                                && masks[p1] != NONE
                                && p1 < 4096
                                && d < 4096
                        })
                        .map(|p1| (p1, d))
                })
        } else {
            None
        };
        if let Some((p1, d)) = block {
            let t0 = g.nodes[p1].inputs[0];
            let mut arg = p1 as u32 | (d as u32) << 12;
            let mut gi = NONE;
            if grad_needed(t0) {
                if grad_buf[t0] != NONE {
                    arg |= 1 << 24;
                } else {
                    grad_buf[t0] = b.add(BufKind::Grad, 4 * g.tensors[t0].numel(), p1);
                }
                gi = grad_buf[t0];
            }
            let (t1, t2) = (g.tensors[g.nodes[d].inputs[0]], g.tensors[n.inputs[0]]);
            let m = t1.c as usize;
            let cols = g.weight_dims(p1).map_or(0, |w| w.in_ch);
            let scratch = b.add(
                BufKind::Scratch,
                4 * (t2.h as usize * t2.w as usize + t1.h as usize * t1.w as usize + 2 * m + cols),
                i,
            );
            let x = if sel[p1].channels > 0 {
                saved[p1]
            } else {
                NONE
            };
            ops.push(TrainOp {
                kind: OpKind::BlockOperands,
                node: i as u32,
                arg: 0,
                bufs: [masks[d], masks[p1], x, NONE],
            });
            ops.push(TrainOp {
                kind: OpKind::BlockBackward,
                node: i as u32,
                arg,
                bufs: [go, gi, scratch, NONE],
            });
            fused[d] = true;
            fused[p1] = true;
        }
        let dw_in_place = layout.in_place
            && block.is_none()
            && is_depthwise(g, i)
            && sel[i].channels == 0
            && grad_needed(n.inputs[0])
            && grad_buf[n.inputs[0]] == NONE;
        let (acc_w, acc_b) = accum_of(i);
        // Accumulating gradient ops add into the persistent accumulators; their updates wait
        // for the update phase.
        let acc_arg = if opt.accumulate { ACCUMULATE } else { 0 };
        let mut bg = NONE;
        if sel[i].bias {
            let d = g.weight_dims(i).ok_or(Error::InvalidParameter {
                what: "autodiff: bias on a layer without weights",
            })?;
            bg = if opt.accumulate {
                acc_b
            } else {
                b.add(BufKind::BiasGrad, 4 * d.out_ch, i)
            };
        }
        if dw_in_place {
            // The output gradient is consumed before it is overwritten: bias first.
            if bg != NONE {
                ops.push(TrainOp {
                    kind: OpKind::BackBias,
                    node: i as u32,
                    arg: acc_arg,
                    bufs: [go, bg, NONE, NONE],
                });
            }
            let t = n.inputs[0];
            let (ti, to) = (g.tensors[t], g.tensors[n.output]);
            let buf = &mut b.buffers[go as usize];
            buf.bytes = buf.bytes.max(4 * ti.numel());
            grad_buf[t] = go;
            let planes = b.add(
                BufKind::Scratch,
                4 * (ti.h as usize * ti.w as usize + to.h as usize * to.w as usize),
                i,
            );
            ops.push(TrainOp {
                kind: OpKind::BackInput,
                node: i as u32,
                arg: IN_PLACE,
                bufs: [go, go, planes, NONE],
            });
            if bg != NONE {
                let u = TrainOp {
                    kind: OpKind::Update,
                    node: i as u32,
                    arg: acc_arg,
                    bufs: [NONE, bg, NONE, NONE],
                };
                if opt.reorder && !opt.accumulate {
                    ops.push(u);
                } else {
                    updates.push(u);
                }
            }
            continue;
        }
        for (j, &t) in n.inputs.iter().enumerate() {
            if !grad_needed(t) || block.is_some() {
                continue;
            }
            let accumulate = grad_buf[t] != NONE;
            if !accumulate {
                grad_buf[t] = b.add(BufKind::Grad, 4 * g.tensors[t].numel(), i);
            }
            let scratch = if accumulate && !matches!(n.kind, NodeKind::Add { .. }) {
                b.add(BufKind::Scratch, 4 * g.tensors[t].numel(), i)
            } else {
                NONE
            };
            ops.push(TrainOp {
                kind: OpKind::BackInput,
                node: i as u32,
                arg: j as u32 | if accumulate { ACCUMULATE } else { 0 },
                bufs: [go, grad_buf[t], scratch, NONE],
            });
        }
        let mut wg = NONE;
        if sel[i].channels > 0 {
            if opt.accumulate {
                wg = acc_w;
                ops.push(TrainOp {
                    kind: OpKind::BackWeight,
                    node: i as u32,
                    arg: ACCUMULATE,
                    bufs: [go, saved[i], wg, NONE],
                });
            } else if opt.reorder {
                // Each row of the weight gradient is applied as soon as it exists.
                let d = g.weight_dims(i).ok_or(Error::InvalidParameter {
                    what: "autodiff: weights on a layer without weights",
                })?;
                let cols = match sel[i].axis {
                    ChannelAxis::Output => d.in_ch,
                    ChannelAxis::Input => sel[i].channels,
                };
                let row = b.add(BufKind::WeightGrad, 4 * d.area * cols, i);
                ops.push(TrainOp {
                    kind: OpKind::WeightStep,
                    node: i as u32,
                    arg: 0,
                    bufs: [go, saved[i], row, NONE],
                });
            } else {
                wg = b.add(BufKind::WeightGrad, 4 * trained_weights(g, i, &sel[i]), i);
                ops.push(TrainOp {
                    kind: OpKind::BackWeight,
                    node: i as u32,
                    arg: 0,
                    bufs: [go, saved[i], wg, NONE],
                });
            }
        }
        if bg != NONE {
            ops.push(TrainOp {
                kind: OpKind::BackBias,
                node: i as u32,
                arg: acc_arg,
                bufs: [go, bg, NONE, NONE],
            });
        }
        if wg != NONE || bg != NONE {
            let u = TrainOp {
                kind: OpKind::Update,
                node: i as u32,
                arg: acc_arg,
                bufs: [wg, bg, NONE, NONE],
            };
            if opt.reorder && !opt.accumulate {
                ops.push(u);
            } else {
                updates.push(u);
            }
        }
    }
    ops.extend(updates);

    let mut buffers = b.buffers;
    // An activation some backward op reads is a saved activation, whatever its first use.
    let first_bwd = ops
        .iter()
        .position(|o| o.kind == OpKind::Loss)
        .unwrap_or(ops.len());
    for o in ops.iter().skip(first_bwd + 1) {
        for &x in &o.bufs {
            if let Some(buf) = buffers.get_mut(x as usize) {
                if buf.kind == BufKind::Activation {
                    buf.kind = BufKind::Saved;
                }
            }
        }
    }
    Ok(TrainingGraph {
        buffers,
        ops,
        layers,
        act_buf,
        rng,
    })
}

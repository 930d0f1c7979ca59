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
use alloc::vec::Vec;

use crate::graph::{Graph, NodeKind};
use crate::sparse::{ChannelAxis, Scheme, Selection};
use crate::{Error, Result};

pub use crate::plan::{
    BufKind, Buffer, CompileOptions, LossKind, OpKind, Precision, TrainOp, ACCUMULATE, NONE,
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

pub fn build(g: &Graph, scheme: &Scheme, opt: &CompileOptions) -> Result<TrainingGraph> {
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
        }
        if s.bias {
            ls.bias = b.add(BufKind::StateBias, 4 * d.out_ch, i);
            if opt.momentum {
                ls.momentum_b = b.add(BufKind::StateMomentum, 4 * d.out_ch, i);
            }
        }
        layers.push(ls);
    }
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
    act_buf[g.input] = b.add(BufKind::Input, g.tensors[g.input].numel(), 0);
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
    save_slices(g.input, act_buf[g.input], &mut b, &mut ops, &mut saved);

    for (i, n) in g.nodes.iter().enumerate() {
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
            bufs: [act_buf[n.inputs[0]], in1, out, NONE],
        });
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
    for (i, n) in g.nodes.iter().enumerate().rev() {
        if !needs_bwd[i] {
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
        for (j, &t) in n.inputs.iter().enumerate() {
            if !grad_needed(t) {
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
        let mut bg = NONE;
        if sel[i].channels > 0 {
            wg = b.add(BufKind::WeightGrad, 4 * trained_weights(g, i, &sel[i]), i);
            ops.push(TrainOp {
                kind: OpKind::BackWeight,
                node: i as u32,
                arg: 0,
                bufs: [go, saved[i], wg, NONE],
            });
        }
        if sel[i].bias {
            let d = g.weight_dims(i).ok_or(Error::InvalidParameter {
                what: "autodiff: bias on a layer without weights",
            })?;
            bg = b.add(BufKind::BiasGrad, 4 * d.out_ch, i);
            ops.push(TrainOp {
                kind: OpKind::BackBias,
                node: i as u32,
                arg: 0,
                bufs: [go, bg, NONE, NONE],
            });
        }
        if wg != NONE || bg != NONE {
            let u = TrainOp {
                kind: OpKind::Update,
                node: i as u32,
                arg: 0,
                bufs: [wg, bg, NONE, NONE],
            };
            if opt.reorder {
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

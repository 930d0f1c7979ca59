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
use crate::ir::{
    patch_bounds, patch_ranges, Axis1, BufKind, Buffer, OpKind, TrainOp, ACCUMULATE, IN_PLACE,
    MAX_PATCH_CHAIN, NONE,
};
use crate::sparse::{ChannelAxis, Scheme, Selection};
use crate::{Error, Result};

use crate::ir::{CompileOptions, Precision};

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
        if i >= MAX_PATCH_CHAIN
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
) -> Option<([Axis1; MAX_PATCH_CHAIN], [Axis1; MAX_PATCH_CHAIN])> {
    let mut rows = [Axis1::default(); MAX_PATCH_CHAIN];
    let mut cols = rows;
    if last >= MAX_PATCH_CHAIN {
        return None;
    }
    for j in 0..=last {
        let n = &g.nodes[j];
        let NodeKind::Conv { win, .. } = n.kind else {
            return None;
        };
        let t = g.tensors[n.inputs[0]];
        rows[j] = Axis1 {
            k: win.kh as usize,
            s: win.sh as usize,
            p: win.pt as usize,
            n: t.h as usize,
        };
        cols[j] = Axis1 {
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
    let mut rr = [(0, 0, 0, 0); MAX_PATCH_CHAIN];
    let mut cr = rr;
    let mut sizes = [0usize; 2];
    for py in 0..grid {
        for px in 0..grid {
            let (y0, y1) = patch_bounds(out.h as usize, grid, py);
            let (x0, x1) = patch_bounds(out.w as usize, grid, px);
            if !patch_ranges(&rows[..=last], y0, y1, &mut rr)
                || !patch_ranges(&cols[..=last], x0, x1, &mut cr)
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
    let mut b = Builder::new(g, scheme, opt, layout)?;
    b.state();
    b.mark_backward();
    b.forward()?;
    b.saved_activations();
    b.loss();
    b.backward()?;
    Ok(b.finish())
}

fn has_mask(k: &NodeKind) -> bool {
    matches!(
        k,
        NodeKind::Conv { .. } | NodeKind::Fc { .. } | NodeKind::Add { .. }
    )
}

/// A training graph under construction. `build_with` runs its phases in order; buffers and ops
/// are numbered in the order the phases add them, which is what the planner and the plan see.
struct Builder<'a> {
    g: &'a Graph,
    scheme: &'a Scheme,
    opt: &'a CompileOptions,
    layout: &'a Layout,
    /// What each node trains.
    sel: Vec<Selection>,
    buffers: Vec<Buffer>,
    ops: Vec<TrainOp>,
    layers: Vec<LayerState>,
    rng: u32,
    /// needs_bwd[n]: node n or something before it is updated, so gradients must reach it.
    needs_bwd: Vec<bool>,
    /// The activation buffer of each tensor.
    act_buf: Vec<u32>,
    /// The clamp mask of each node's output.
    masks: Vec<u32>,
    /// saved[n]: the buffer the weight gradient of layer n reads.
    saved: Vec<u32>,
    /// The fp32 gradient buffer of each tensor.
    grad_buf: Vec<u32>,
    /// Updates that wait for the end of the op list.
    updates: Vec<TrainOp>,
    /// Nodes whose backward a fused block op already ran.
    fused: Vec<bool>,
}

impl<'a> Builder<'a> {
    fn new(
        g: &'a Graph,
        scheme: &'a Scheme,
        opt: &'a CompileOptions,
        layout: &'a Layout,
    ) -> Result<Self> {
        let sel = scheme.resolve(g)?;
        let (n_nodes, n_tensors) = (g.nodes.len(), g.tensors.len());
        Ok(Builder {
            g,
            scheme,
            opt,
            layout,
            sel,
            buffers: Vec::new(),
            ops: Vec::new(),
            layers: Vec::new(),
            rng: NONE,
            needs_bwd: alloc::vec![false; n_nodes],
            act_buf: alloc::vec![NONE; n_tensors],
            masks: alloc::vec![NONE; n_nodes],
            saved: alloc::vec![NONE; n_nodes],
            grad_buf: alloc::vec![NONE; n_tensors],
            updates: Vec::new(),
            fused: alloc::vec![false; n_nodes],
        })
    }

    fn add(&mut self, kind: BufKind, bytes: usize, node: usize) -> u32 {
        self.buffers.push(Buffer {
            kind,
            bytes,
            node: node as u32,
        });
        (self.buffers.len() - 1) as u32
    }

    fn op(&mut self, kind: OpKind, node: usize, arg: u32, bufs: [u32; 4]) {
        self.ops.push(TrainOp {
            kind,
            node: node as u32,
            arg,
            bufs,
        });
    }

    /// With `reorder` an update directly follows its gradient ops; otherwise (and always when
    /// accumulating, where it belongs to the update phase) it waits for the end of the op list.
    fn update(&mut self, node: usize, arg: u32, bufs: [u32; 4]) {
        let u = TrainOp {
            kind: OpKind::Update,
            node: node as u32,
            arg,
            bufs,
        };
        if self.opt.reorder && !self.opt.accumulate {
            self.ops.push(u);
        } else {
            self.updates.push(u);
        }
    }

    fn consumers(&self, t: usize) -> usize {
        self.g
            .nodes
            .iter()
            .filter(|m| m.inputs.contains(&t))
            .count()
    }

    fn grad_needed(&self, t: usize) -> bool {
        self.g.producer(t).is_some_and(|p| self.needs_bwd[p])
    }

    /// Phase 1, persistent state first: the planner places it at the bottom of the arena.
    fn state(&mut self) {
        let (g, opt) = (self.g, self.opt);
        let mut any_weight = false;
        for i in 0..self.sel.len() {
            let s = self.sel[i];
            let Some(d) = g.weight_dims(i) else { continue };
            let mut ls = LayerState {
                node: i as u32,
                sel: s,
                weight: NONE,
                bias: NONE,
                precision: NONE,
                momentum_w: NONE,
                momentum_b: NONE,
                accum_w: NONE,
                accum_b: NONE,
            };
            if s.channels > 0 {
                let n = trained_weights(g, i, &s);
                any_weight = true;
                ls.weight = self.add(BufKind::StateWeight, n, i);
                let extra = opt.precision.extra_bytes();
                if extra > 0 {
                    ls.precision = self.add(BufKind::StatePrecision, n * extra, i);
                }
                if opt.momentum {
                    ls.momentum_w = self.add(BufKind::StateMomentum, 4 * n, i);
                }
                if opt.accumulate {
                    ls.accum_w = self.add(BufKind::AccumWeight, 4 * n, i);
                }
            }
            if s.bias {
                ls.bias = self.add(BufKind::StateBias, 4 * d.out_ch, i);
                if opt.momentum {
                    ls.momentum_b = self.add(BufKind::StateMomentum, 4 * d.out_ch, i);
                }
                if opt.accumulate {
                    ls.accum_b = self.add(BufKind::AccumBias, 4 * d.out_ch, i);
                }
            }
            self.layers.push(ls);
        }
        if any_weight && opt.precision == Precision::StochasticRounding {
            self.rng = self.add(BufKind::StateRng, 8, 0);
        }
    }

    /// Phase 2: which nodes gradients must reach (the first updated layer and everything after
    /// it on a path from it).
    fn mark_backward(&mut self) {
        let g = self.g;
        for (i, n) in g.nodes.iter().enumerate() {
            let upstream = n.inputs.iter().any(|&t| self.grad_needed(t));
            self.needs_bwd[i] = self.sel[i].updated() || upstream;
        }
    }

    /// Phase 3, forward ops: the input sample, a patch stage over the first convs, then node by
    /// node, each output's clamp mask and saved channel slices as soon as it exists.
    fn forward(&mut self) -> Result<()> {
        let (g, layout) = (self.g, self.layout);
        if layout.stream_input {
            if layout.patch.is_none() || self.consumers(g.input) != 1 {
                return Err(Error::InvalidParameter {
                    what: "autodiff: a streamed input needs a patch stage as its only reader",
                });
            }
        } else {
            let input = self.add(BufKind::Input, g.tensors[g.input].numel(), 0);
            self.act_buf[g.input] = input;
            self.save_slices(g.input, input);
        }
        let first_node = match layout.patch {
            Some((last, grid)) => {
                self.patch_stage(last, grid)?;
                last + 1
            }
            None => 0,
        };
        for i in first_node..g.nodes.len() {
            self.forward_node(i)?;
        }
        Ok(())
    }

    fn patch_stage(&mut self, last: usize, grid: usize) -> Result<()> {
        let g = self.g;
        let ok = patch_candidates(g, self.scheme)?.contains(&last) && grid >= 1;
        let bufs = patch_buffers(g, last, grid);
        let (Some((ping, pong)), true) = (bufs, ok) else {
            return Err(Error::InvalidParameter {
                what: "autodiff: nodes cannot run as a patch stage",
            });
        };
        let out_t = g.nodes[last].output;
        let out = self.add(BufKind::Activation, g.tensors[out_t].numel(), last);
        let ping = self.add(BufKind::Scratch, ping, 0);
        let pong = self.add(BufKind::Scratch, pong, 0);
        self.act_buf[out_t] = out;
        let input = self.act_buf[g.input];
        self.op(
            OpKind::PatchStage,
            0,
            last as u32 | (grid as u32) << 16,
            [input, out, ping, pong],
        );
        self.save_slices(out_t, out);
        Ok(())
    }

    fn forward_node(&mut self, i: usize) -> Result<()> {
        let (g, layout, sel) = (self.g, self.layout, self.sel[i]);
        let n = &g.nodes[i];
        if matches!(n.kind, NodeKind::MaxPool { .. })
            && self.needs_bwd[i]
            && self.grad_needed(n.inputs[0])
        {
            return Err(Error::InvalidParameter {
                what: "autodiff: back-propagation through maxpool is not supported; train only layers after it",
            });
        }
        if matches!(n.kind, NodeKind::Flatten) {
            let buf = self.act_buf[n.inputs[0]];
            self.act_buf[n.output] = buf;
            self.save_slices(n.output, buf);
            return Ok(());
        }
        let t_in = n.inputs[0];
        // Depthwise convs overwrite their input channel by channel; pointwise convs pixel by
        // pixel (an input pixel is dead once its output pixel exists). Only when nothing else
        // reads the input: one consumer, and no weight gradient needing it whole.
        let dw = is_depthwise(g, i) && sel.channels == 0;
        // A shrinking pointwise conv stays out of place: in place, its large input buffer would
        // live as long as its small output.
        let pw = is_pointwise(g, i)
            && !(sel.channels > 0 && sel.axis == ChannelAxis::Output)
            && ((layout.shrinks(i) && !self.needs_bwd[i])
                || g.tensors[n.output].numel() >= g.tensors[t_in].numel());
        let in_place = layout.in_place
            && (dw || pw)
            && t_in != g.input
            && (pw || g.tensors[n.output].numel() <= g.tensors[t_in].numel())
            && self.consumers(t_in) == 1;
        // Only in the forward-only prefix: behind it, outputs are saved for the backward pass.
        let add_into =
            if layout.shrinks(i) && !self.needs_bwd[i] && matches!(n.kind, NodeKind::Add { .. }) {
                n.inputs.iter().rposition(|&t| {
                    t != g.input && self.consumers(t) == 1 && n.inputs[0] != n.inputs[1]
                })
            } else {
                None
            };
        if let Some(j) = add_into {
            // The output overwrites input j element by element.
            let buf = self.act_buf[n.inputs[j]];
            self.act_buf[n.output] = buf;
            let ins = [self.act_buf[n.inputs[0]], self.act_buf[n.inputs[1]]];
            self.op(
                OpKind::Forward,
                i,
                IN_PLACE | j as u32,
                [ins[0], ins[1], buf, NONE],
            );
        } else if in_place {
            let buf = self.act_buf[t_in];
            self.act_buf[n.output] = buf;
            let o = g.tensors[n.output];
            let bb = &mut self.buffers[buf as usize];
            bb.bytes = bb.bytes.max(o.numel());
            let plane = if dw {
                self.add(BufKind::Scratch, o.h as usize * o.w as usize, i)
            } else {
                self.add(BufKind::Scratch, o.c as usize, i)
            };
            self.op(OpKind::Forward, i, IN_PLACE, [buf, NONE, buf, plane]);
        } else {
            let out = self.add(BufKind::Activation, g.tensors[n.output].numel(), i);
            self.act_buf[n.output] = out;
            let in1 = if n.inputs.len() > 1 {
                self.act_buf[n.inputs[1]]
            } else {
                NONE
            };
            let in0 = self.act_buf[t_in];
            self.op(OpKind::Forward, i, 0, [in0, in1, out, NONE]);
        }
        let out = self.act_buf[n.output];
        if self.needs_bwd[i] && has_mask(&n.kind) {
            let m = self.add(BufKind::Mask, g.tensors[n.output].numel().div_ceil(8), i);
            self.op(OpKind::Mask, i, 0, [out, m, NONE, NONE]);
            self.masks[i] = m;
        }
        self.save_slices(n.output, out);
        Ok(())
    }

    /// Phase 4a: once tensor `t` exists (in buffer `src`), the compact int8 copy of its first
    /// channels each input-channel selection reading it keeps for its weight gradient.
    fn save_slices(&mut self, t: usize, src: u32) {
        let g = self.g;
        for (ci, c) in g.nodes.iter().enumerate() {
            let s = self.sel[ci];
            if c.inputs[0] != t || s.channels == 0 || s.axis != ChannelAxis::Input {
                continue;
            }
            let ti = g.tensors[t];
            let pixels = if matches!(c.kind, NodeKind::Fc { .. }) {
                1
            } else {
                ti.h as usize * ti.w as usize
            };
            let buf = self.add(BufKind::Saved, s.channels * pixels, ci);
            self.op(OpKind::SaveChannels, ci, 0, [src, buf, NONE, NONE]);
            self.saved[ci] = buf;
        }
    }

    /// Phase 4b: an output-channel selection's weight gradient reads its whole layer input.
    fn saved_activations(&mut self) {
        let g = self.g;
        for (i, n) in g.nodes.iter().enumerate() {
            if self.sel[i].channels > 0 && self.sel[i].axis == ChannelAxis::Output {
                self.saved[i] = self.act_buf[n.inputs[0]];
            }
        }
    }

    /// Phase 5: the loss and the gradient of the logits.
    fn loss(&mut self) {
        let g = self.g;
        let last = g.nodes.len() - 1;
        let gl = self.add(BufKind::Grad, 4 * g.tensors[g.output].numel(), last);
        self.grad_buf[g.output] = gl;
        let logits = self.act_buf[g.output];
        self.op(
            OpKind::Loss,
            last,
            self.opt.loss as u32,
            [logits, gl, NONE, NONE],
        );
    }

    /// Phase 6: backward in reverse topological order, then the updates that waited.
    fn backward(&mut self) -> Result<()> {
        for i in (0..self.g.nodes.len()).rev() {
            self.backward_node(i)?;
        }
        let updates = core::mem::take(&mut self.updates);
        self.ops.extend(updates);
        Ok(())
    }

    fn backward_node(&mut self, i: usize) -> Result<()> {
        let (g, opt, sel) = (self.g, self.opt, self.sel[i]);
        let n = &g.nodes[i];
        if !self.needs_bwd[i] || self.fused[i] {
            return Ok(());
        }
        let go = self.grad_buf[n.output];
        if go == NONE {
            // The output reaches the loss through no path (a dead branch): nothing to do.
            return Ok(());
        }
        if matches!(n.kind, NodeKind::Flatten) {
            if self.grad_needed(n.inputs[0]) {
                self.grad_buf[n.inputs[0]] = go;
            }
            return Ok(());
        }
        if self.masks[i] != NONE {
            let mask = self.masks[i];
            self.op(OpKind::ApplyMask, i, 0, [go, mask, NONE, NONE]);
        }
        let block = self.fusable_block(i);
        if let Some((p1, d)) = block {
            self.block_backward(i, go, p1, d);
        }
        let dw_in_place = self.layout.in_place
            && block.is_none()
            && is_depthwise(g, i)
            && sel.channels == 0
            && self.grad_needed(n.inputs[0])
            && self.grad_buf[n.inputs[0]] == NONE;
        let (acc_w, acc_b) = self
            .layers
            .iter()
            .find(|l| l.node as usize == i)
            .map_or((NONE, NONE), |l| (l.accum_w, l.accum_b));
        // Accumulating gradient ops add into the persistent accumulators; their updates wait
        // for the update phase.
        let acc_arg = if opt.accumulate { ACCUMULATE } else { 0 };
        let mut bg = NONE;
        if sel.bias {
            let d = g.weight_dims(i).ok_or(Error::InvalidParameter {
                what: "autodiff: bias on a layer without weights",
            })?;
            bg = if opt.accumulate {
                acc_b
            } else {
                self.add(BufKind::BiasGrad, 4 * d.out_ch, i)
            };
        }
        if dw_in_place {
            self.depthwise_backward_in_place(i, go, bg, acc_arg);
            return Ok(());
        }
        if block.is_none() {
            self.input_grads(i, go);
        }
        let wg = if sel.channels > 0 {
            self.weight_grad(i, go, acc_w)?
        } else {
            NONE
        };
        if bg != NONE {
            self.op(OpKind::BackBias, i, acc_arg, [go, bg, NONE, NONE]);
        }
        if wg != NONE || bg != NONE {
            self.update(i, acc_arg, [wg, bg, NONE, NONE]);
        }
        Ok(())
    }

    /// An inverted-residual tail pw1 -> depthwise -> pw2 (node `i`) runs backward channel by
    /// channel of the expanded tensor: its fp32 gradients never exist whole. `(pw1, depthwise)`
    /// when node `i` ends such a tail that can run so.
    fn fusable_block(&self, i: usize) -> Option<(usize, usize)> {
        let (g, opt, layout) = (self.g, self.opt, self.layout);
        let fuse = layout.in_place || layout.fuse_blocks;
        if !(opt.reorder && !opt.accumulate && fuse && is_pointwise(g, i)) {
            return None;
        }
        let t2 = g.nodes[i].inputs[0];
        g.producer(t2)
            .filter(|&d| {
                is_depthwise(g, d)
                    && self.sel[d].channels == 0
                    && self.grad_needed(t2)
                    && self.grad_buf[t2] == NONE
                    && self.consumers(t2) == 1
                    && self.masks[d] != NONE
            })
            .and_then(|d| {
                let t1 = g.nodes[d].inputs[0];
                g.producer(t1)
                    .filter(|&p1| {
                        is_pointwise(g, p1)
                            && self.consumers(t1) == 1
                            && self.masks[p1] != NONE
                            && p1 < 4096
                            && d < 4096
                    })
                    .map(|p1| (p1, d))
            })
    }

    fn block_backward(&mut self, i: usize, go: u32, p1: usize, d: usize) {
        let g = self.g;
        let t0 = g.nodes[p1].inputs[0];
        let mut arg = p1 as u32 | (d as u32) << 12;
        let mut gi = NONE;
        if self.grad_needed(t0) {
            if self.grad_buf[t0] != NONE {
                arg |= 1 << 24;
            } else {
                self.grad_buf[t0] = self.add(BufKind::Grad, 4 * g.tensors[t0].numel(), p1);
            }
            gi = self.grad_buf[t0];
        }
        let (t1, t2) = (
            g.tensors[g.nodes[d].inputs[0]],
            g.tensors[g.nodes[i].inputs[0]],
        );
        let m = t1.c as usize;
        let cols = g.weight_dims(p1).map_or(0, |w| w.in_ch);
        let scratch = self.add(
            BufKind::Scratch,
            4 * (t2.h as usize * t2.w as usize + t1.h as usize * t1.w as usize + 2 * m + cols),
            i,
        );
        let x = if self.sel[p1].channels > 0 {
            self.saved[p1]
        } else {
            NONE
        };
        let masks = [self.masks[d], self.masks[p1]];
        self.op(OpKind::BlockOperands, i, 0, [masks[0], masks[1], x, NONE]);
        self.op(OpKind::BlockBackward, i, arg, [go, gi, scratch, NONE]);
        self.fused[d] = true;
        self.fused[p1] = true;
    }

    /// A depthwise conv's input gradient overwrites its output gradient channel by channel.
    fn depthwise_backward_in_place(&mut self, i: usize, go: u32, bg: u32, acc_arg: u32) {
        let g = self.g;
        let n = &g.nodes[i];
        // The output gradient is consumed before it is overwritten: bias first.
        if bg != NONE {
            self.op(OpKind::BackBias, i, acc_arg, [go, bg, NONE, NONE]);
        }
        let t = n.inputs[0];
        let (ti, to) = (g.tensors[t], g.tensors[n.output]);
        let buf = &mut self.buffers[go as usize];
        buf.bytes = buf.bytes.max(4 * ti.numel());
        self.grad_buf[t] = go;
        let planes = self.add(
            BufKind::Scratch,
            4 * (ti.h as usize * ti.w as usize + to.h as usize * to.w as usize),
            i,
        );
        self.op(OpKind::BackInput, i, IN_PLACE, [go, go, planes, NONE]);
        if bg != NONE {
            self.update(i, acc_arg, [NONE, bg, NONE, NONE]);
        }
    }

    /// Gradients towards node `i`'s inputs that need one; a second gradient into the same
    /// tensor adds into the first.
    fn input_grads(&mut self, i: usize, go: u32) {
        let g = self.g;
        let n = &g.nodes[i];
        for (j, &t) in n.inputs.iter().enumerate() {
            if !self.grad_needed(t) {
                continue;
            }
            let accumulate = self.grad_buf[t] != NONE;
            if !accumulate {
                self.grad_buf[t] = self.add(BufKind::Grad, 4 * g.tensors[t].numel(), i);
            }
            let scratch = if accumulate && !matches!(n.kind, NodeKind::Add { .. }) {
                self.add(BufKind::Scratch, 4 * g.tensors[t].numel(), i)
            } else {
                NONE
            };
            let arg = j as u32 | if accumulate { ACCUMULATE } else { 0 };
            let gi = self.grad_buf[t];
            self.op(OpKind::BackInput, i, arg, [go, gi, scratch, NONE]);
        }
    }

    /// Layer `i`'s weight gradient: added into its accumulator, applied row by row as each row
    /// exists (`reorder`), or whole into a buffer its update reads. Returns the buffer the
    /// update reads (NONE when the fused op already updated).
    fn weight_grad(&mut self, i: usize, go: u32, acc_w: u32) -> Result<u32> {
        let (g, opt, sel) = (self.g, self.opt, self.sel[i]);
        let saved = self.saved[i];
        if opt.accumulate {
            self.op(OpKind::BackWeight, i, ACCUMULATE, [go, saved, acc_w, NONE]);
            Ok(acc_w)
        } else if opt.reorder {
            let d = g.weight_dims(i).ok_or(Error::InvalidParameter {
                what: "autodiff: weights on a layer without weights",
            })?;
            let cols = match sel.axis {
                ChannelAxis::Output => d.in_ch,
                ChannelAxis::Input => sel.channels,
            };
            let row = self.add(BufKind::WeightGrad, 4 * d.area * cols, i);
            self.op(OpKind::WeightStep, i, 0, [go, saved, row, NONE]);
            Ok(NONE)
        } else {
            let wg = self.add(BufKind::WeightGrad, 4 * trained_weights(g, i, &sel), i);
            self.op(OpKind::BackWeight, i, 0, [go, saved, wg, NONE]);
            Ok(wg)
        }
    }

    /// Phase 7: an activation some backward op reads is a saved activation, whatever its first
    /// use.
    fn finish(mut self) -> TrainingGraph {
        let first_bwd = self
            .ops
            .iter()
            .position(|o| o.kind == OpKind::Loss)
            .unwrap_or(self.ops.len());
        for o in self.ops.iter().skip(first_bwd + 1) {
            for &x in &o.bufs {
                if let Some(buf) = self.buffers.get_mut(x as usize) {
                    if buf.kind == BufKind::Activation {
                        buf.kind = BufKind::Saved;
                    }
                }
            }
        }
        TrainingGraph {
            buffers: self.buffers,
            ops: self.ops,
            layers: self.layers,
            act_buf: self.act_buf,
            rng: self.rng,
        }
    }
}

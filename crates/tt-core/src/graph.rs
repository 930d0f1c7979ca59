//! The forward graph the compiler starts from: one sample, int8 activations, ops in topological
//! order. Front ends (the Python importers) lower into this; nothing here knows where a model
//! came from. Activations are stored channels-last (H, W, C); conv weights are OHWI.
use alloc::{string::String, vec::Vec};

use crate::{Error, Result};

/// The clamp fused into an op's requantization: one enum with the kernels' (`quant`).
pub use crate::quant::Activation;

/// A per-sample activation tensor with its int8 asymmetric quantization.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TensorInfo {
    pub c: u32,
    pub h: u32,
    pub w: u32,
    pub scale: f32,
    pub zero_point: i32,
}

impl TensorInfo {
    pub fn numel(&self) -> usize {
        self.c as usize * self.h as usize * self.w as usize
    }
}

/// Kernel window of a conv or pool: size, stride, padding (top, left, bottom, right).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Window {
    pub kh: u16,
    pub kw: u16,
    pub sh: u16,
    pub sw: u16,
    pub pt: u16,
    pub pl: u16,
    pub pb: u16,
    pub pr: u16,
}

impl Window {
    /// Output size along one axis, or `None` when the window does not fit.
    pub fn out_dim(n: u32, k: u16, s: u16, p0: u16, p1: u16) -> Option<u32> {
        let padded = n + p0 as u32 + p1 as u32;
        if k == 0 || s == 0 || padded < k as u32 {
            return None;
        }
        Some((padded - k as u32) / s as u32 + 1)
    }

    pub fn out_hw(&self, h: u32, w: u32) -> Option<(u32, u32)> {
        Some((
            Self::out_dim(h, self.kh, self.sh, self.pt, self.pb)?,
            Self::out_dim(w, self.kw, self.sw, self.pl, self.pr)?,
        ))
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NodeKind {
    Conv {
        win: Window,
        groups: u32,
        act: Activation,
    },
    Fc {
        act: Activation,
    },
    Add {
        act: Activation,
    },
    GlobalAvgPool,
    AvgPool {
        win: Window,
    },
    MaxPool {
        win: Window,
    },
    Flatten,
}

impl NodeKind {
    pub fn trainable(&self) -> bool {
        matches!(self, NodeKind::Conv { .. } | NodeKind::Fc { .. })
    }
    pub fn arity(&self) -> usize {
        if matches!(self, NodeKind::Add { .. }) {
            2
        } else {
            1
        }
    }
}

#[derive(Clone, Debug)]
pub struct Node {
    pub name: String,
    pub kind: NodeKind,
    pub inputs: Vec<usize>,
    pub output: usize,
}

/// Int8 parameters of one conv/fc layer as the front end hands them over.
#[derive(Clone, Debug, Default)]
pub struct LayerParams {
    /// OHWI (conv) or (O, I) (fc) int8 weights.
    pub weight: Vec<i8>,
    /// Int32 bias, scale = input scale * weight scale per output channel.
    pub bias: Vec<i32>,
    /// Symmetric per-output-channel weight scale.
    pub weight_scale: Vec<f32>,
}

#[derive(Clone, Debug)]
pub struct Graph {
    pub tensors: Vec<TensorInfo>,
    pub nodes: Vec<Node>,
    /// Parallel to `nodes`: `Some` exactly for conv/fc.
    pub params: Vec<Option<LayerParams>>,
    pub input: usize,
    pub output: usize,
    /// How every requantization of this model rounds: that of the runtime it was quantized
    /// for (TFLite's double rounding for an imported `.tflite`), so it runs bit-exactly there.
    pub rounding: crate::quant::Rounding,
}

/// Weight geometry of a trainable node: output channels, input channels seen by one output
/// channel, kernel area, and the element count per output channel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WeightDims {
    pub out_ch: usize,
    pub in_ch: usize,
    pub area: usize,
}

impl WeightDims {
    pub fn per_out(&self) -> usize {
        self.in_ch * self.area
    }
    pub fn numel(&self) -> usize {
        self.out_ch * self.per_out()
    }
}

impl Graph {
    pub fn weight_dims(&self, node: usize) -> Option<WeightDims> {
        let n = self.nodes.get(node)?;
        let out = self.tensors.get(n.output)?;
        let inp = self.tensors.get(*n.inputs.first()?)?;
        match n.kind {
            NodeKind::Conv { win, groups, .. } => Some(WeightDims {
                out_ch: out.c as usize,
                in_ch: inp.c as usize / groups.max(1) as usize,
                area: win.kh as usize * win.kw as usize,
            }),
            NodeKind::Fc { .. } => Some(WeightDims {
                out_ch: out.c as usize,
                in_ch: inp.numel(),
                area: 1,
            }),
            _ => None,
        }
    }

    /// Index of the node producing `tensor`, if any (the graph input has none).
    pub fn producer(&self, tensor: usize) -> Option<usize> {
        self.nodes.iter().position(|n| n.output == tensor)
    }

    /// Checks topological order, arities, shapes and parameter sizes so later stages can index
    /// without further checks.
    pub fn validate(&self) -> Result<()> {
        let bad = |what| Err(Error::InvalidParameter { what });
        if self.params.len() != self.nodes.len() {
            return bad("graph: params not parallel to nodes");
        }
        if self.input >= self.tensors.len() || self.output >= self.tensors.len() {
            return bad("graph: input/output tensor id");
        }
        for t in &self.tensors {
            if t.numel() == 0 || !(t.scale.is_finite() && t.scale > 0.0) {
                return bad("graph: tensor shape or scale");
            }
            if !(-128..=127).contains(&t.zero_point) {
                return bad("graph: tensor zero point");
            }
        }
        let mut defined = alloc::vec![false; self.tensors.len()];
        defined[self.input] = true;
        for (i, n) in self.nodes.iter().enumerate() {
            if n.inputs.len() != n.kind.arity() {
                return bad("graph: node arity");
            }
            for &t in &n.inputs {
                if t >= self.tensors.len() || !defined[t] {
                    return bad("graph: node input not defined before use");
                }
            }
            if n.output >= self.tensors.len() || defined[n.output] {
                return bad("graph: node output id or tensor written twice");
            }
            defined[n.output] = true;
            let inp = self.tensors[n.inputs[0]];
            let out = self.tensors[n.output];
            let ok = match n.kind {
                NodeKind::Conv { win, groups, .. } => {
                    groups > 0
                        && inp.c % groups == 0
                        && out.c % groups == 0
                        && win.out_hw(inp.h, inp.w) == Some((out.h, out.w))
                }
                NodeKind::Fc { .. } => out.h == 1 && out.w == 1,
                NodeKind::Add { .. } => {
                    let b = self.tensors[n.inputs[1]];
                    (inp.c, inp.h, inp.w) == (out.c, out.h, out.w)
                        && (b.c, b.h, b.w) == (out.c, out.h, out.w)
                }
                NodeKind::GlobalAvgPool => out.c == inp.c && out.h == 1 && out.w == 1,
                NodeKind::AvgPool { win } | NodeKind::MaxPool { win } => {
                    out.c == inp.c && win.out_hw(inp.h, inp.w) == Some((out.h, out.w))
                }
                NodeKind::Flatten => out.numel() == inp.numel(),
            };
            if !ok {
                return bad("graph: node shapes inconsistent with its attributes");
            }
            if matches!(n.kind, NodeKind::Flatten)
                && (out.scale != inp.scale || out.zero_point != inp.zero_point)
            {
                return bad("graph: flatten changes quantization");
            }
            match (&self.params[i], self.weight_dims(i)) {
                (Some(p), Some(d)) => {
                    if p.weight.len() != d.numel()
                        || p.bias.len() != d.out_ch
                        || p.weight_scale.len() != d.out_ch
                        || p.weight_scale.iter().any(|s| !(s.is_finite() && *s > 0.0))
                    {
                        return bad("graph: layer parameter sizes or scales");
                    }
                }
                (None, None) => {}
                _ => return bad("graph: parameters on a non-trainable node or missing"),
            }
        }
        if !defined[self.output] || self.producer(self.output).is_none() {
            return bad("graph: output tensor not produced");
        }
        Ok(())
    }
}

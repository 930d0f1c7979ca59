//! Sparse-update schemes: which biases and which weight channels of which layers are trained.
//!
//! A partial weight update trains the *first* `k` channels along the chosen axis (the paper's
//! engine does the same; it reports that picking channels by magnitude or at random is within
//! 0.2% accuracy). `Output` trains `W[:k]` (fewer updated weights, the whole input must be saved);
//! `Input` trains `W[:, :k]` (only those `k` input channels are saved — the cheaper choice for
//! activation memory), allowed for ungrouped convs and fc layers.
use alloc::vec::Vec;

use crate::graph::{Graph, NodeKind};
use crate::{Error, Result};

/// The axis a weight ratio selects channels along: the kernels' own enum (`ops`), which the
/// scheme API hands on.
pub use crate::ops::ChannelAxis;

/// What one node trains. `weight_ratio == 0` freezes the weights.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LayerUpdate {
    pub bias: bool,
    pub weight_ratio: f32,
    pub axis: ChannelAxis,
}

impl Default for LayerUpdate {
    fn default() -> Self {
        LayerUpdate {
            bias: false,
            weight_ratio: 0.0,
            axis: ChannelAxis::Output,
        }
    }
}

/// One [`LayerUpdate`] per graph node (non-trainable nodes must stay at the default).
#[derive(Clone, Debug, Default)]
pub struct Scheme {
    pub layers: Vec<LayerUpdate>,
}

/// A resolved selection: how many channels along `axis` are trained (0 = weights frozen).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Selection {
    pub bias: bool,
    pub channels: usize,
    pub axis: ChannelAxis,
}

impl Selection {
    pub fn updated(&self) -> bool {
        self.bias || self.channels > 0
    }
}

/// Channels trained for a ratio: rounded to nearest, at least one for any positive ratio.
pub fn channels_for_ratio(total: usize, ratio: f32) -> usize {
    if ratio <= 0.0 || total == 0 {
        return 0;
    }
    let k = (ratio as f64 * total as f64).round() as usize;
    k.clamp(1, total)
}

impl Scheme {
    pub fn resolve(&self, g: &Graph) -> Result<Vec<Selection>> {
        if self.layers.len() != g.nodes.len() {
            return Err(Error::InvalidParameter {
                what: "scheme: one entry per node expected",
            });
        }
        let mut out = Vec::with_capacity(g.nodes.len());
        for (i, (u, n)) in self.layers.iter().zip(&g.nodes).enumerate() {
            if !(u.weight_ratio.is_finite() && (0.0..=1.0).contains(&u.weight_ratio)) {
                return Err(Error::InvalidParameter {
                    what: "scheme: weight ratio must be in [0, 1]",
                });
            }
            let Some(d) = g.weight_dims(i) else {
                if u.bias || u.weight_ratio > 0.0 {
                    return Err(Error::InvalidParameter {
                        what: "scheme: only conv and fc layers can be trained",
                    });
                }
                out.push(Selection {
                    bias: false,
                    channels: 0,
                    axis: ChannelAxis::Output,
                });
                continue;
            };
            let grouped = matches!(n.kind, NodeKind::Conv { groups, .. } if groups > 1);
            if u.axis == ChannelAxis::Input && grouped && u.weight_ratio > 0.0 {
                return Err(Error::InvalidParameter {
                    what: "scheme: input-channel selection needs an ungrouped conv",
                });
            }
            let total = match u.axis {
                ChannelAxis::Output => d.out_ch,
                ChannelAxis::Input => d.in_ch,
            };
            let channels = channels_for_ratio(total, u.weight_ratio);
            out.push(Selection {
                bias: u.bias,
                channels,
                // A frozen layer has no selection: keep the one axis every layer supports.
                axis: if channels > 0 {
                    u.axis
                } else {
                    ChannelAxis::Output
                },
            });
        }
        Ok(out)
    }
}

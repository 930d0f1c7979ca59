//! Fully connected (Gemm with a transposed weight): `y[o] = sum_i x[i] * W[o][i] + b[o]`.
//! Int8 forward with per-output-channel requantization, f32 backward; the same semantics as
//! `conv` (an FC layer is a 1x1 convolution over a single pixel).
use super::{ChannelAxis, ChannelSelection, WeightShape};
use crate::error::{Error, Result};
use crate::quant::{check_act, check_len, QParams, Requant};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FcGeom {
    pub in_features: usize,
    pub out_features: usize,
}

impl FcGeom {
    pub fn new(in_features: usize, out_features: usize) -> Result<FcGeom> {
        let g = FcGeom {
            in_features,
            out_features,
        };
        g.validate()?;
        Ok(g)
    }

    pub fn validate(&self) -> Result<()> {
        if self.in_features == 0 || self.out_features == 0 {
            return Err(Error::InvalidParameter {
                what: "fc: zero features",
            });
        }
        super::dims(
            &[self.in_features, self.out_features],
            "fc: weight size overflows",
        )?;
        Ok(())
    }

    pub fn weight_len(&self) -> usize {
        self.in_features * self.out_features
    }

    pub fn macs(&self) -> u64 {
        self.in_features as u64 * self.out_features as u64
    }

    pub fn weight_shape(&self) -> WeightShape {
        WeightShape {
            out_c: self.out_features,
            taps: 1,
            in_per_group: self.in_features,
            groups: 1,
        }
    }
}

#[allow(clippy::too_many_arguments)]
pub fn fc_forward(
    g: &FcGeom,
    input: &[i8],
    in_zp: i32,
    weight: &[i8],
    bias: &[i32],
    requant: &[Requant],
    out_zp: i32,
    act_min: i8,
    act_max: i8,
    output: &mut [i8],
) -> Result<()> {
    g.validate()?;
    check_len("fc_forward: input", g.in_features, input.len())?;
    check_len("fc_forward: weight", g.weight_len(), weight.len())?;
    check_len("fc_forward: bias", g.out_features, bias.len())?;
    check_len("fc_forward: requant", g.out_features, requant.len())?;
    check_len("fc_forward: output", g.out_features, output.len())?;
    check_act(act_min, act_max)?;
    for (o, (w, out)) in weight
        .chunks_exact(g.in_features)
        .zip(output.iter_mut())
        .enumerate()
    {
        let mut s: i32 = 0;
        let mut sw: i32 = 0;
        for (&a, &b) in input.iter().zip(w) {
            s = s.wrapping_add(a as i32 * b as i32);
            sw = sw.wrapping_add(b as i32);
        }
        let acc = bias[o].wrapping_add(s.wrapping_sub(in_zp.wrapping_mul(sw)));
        *out = requant[o].apply_clamp(acc, out_zp, act_min, act_max);
    }
    Ok(())
}

/// Int32 accumulation with a weight zero point (per output or per tensor), for imported models
/// (ONNX MatMulInteger / the accumulation half of QLinearMatMul). `bias` may be empty.
pub fn fc_accumulate(
    g: &FcGeom,
    input: &[i8],
    in_zp: i32,
    weight: &[i8],
    weight_zp: &[i32],
    bias: &[i32],
    acc_out: &mut [i32],
) -> Result<()> {
    g.validate()?;
    check_len("fc_accumulate: input", g.in_features, input.len())?;
    check_len("fc_accumulate: weight", g.weight_len(), weight.len())?;
    if weight_zp.len() != 1 && weight_zp.len() != g.out_features {
        return Err(Error::ShapeMismatch {
            what: "fc_accumulate: weight zero point (per tensor or per output)",
            expected: g.out_features,
            actual: weight_zp.len(),
        });
    }
    if !bias.is_empty() {
        check_len("fc_accumulate: bias", g.out_features, bias.len())?;
    }
    check_len("fc_accumulate: output", g.out_features, acc_out.len())?;
    for (o, (w, out)) in weight
        .chunks_exact(g.in_features)
        .zip(acc_out.iter_mut())
        .enumerate()
    {
        let wzp = if weight_zp.len() == 1 {
            weight_zp[0]
        } else {
            weight_zp[o]
        };
        let mut acc = if bias.is_empty() { 0 } else { bias[o] };
        for (&a, &b) in input.iter().zip(w) {
            acc = acc.wrapping_add(
                (a as i32)
                    .wrapping_sub(in_zp)
                    .wrapping_mul((b as i32).wrapping_sub(wzp)),
            );
        }
        *out = acc;
    }
    Ok(())
}

/// `grad_in[i] = sum_o grad_out[o] * s_w[o] * w[o][i]`; overwrites `grad_in`.
pub fn fc_backward_input(
    g: &FcGeom,
    grad_out: &[f32],
    weight: &[i8],
    weight_scale: &[f32],
    grad_in: &mut [f32],
) -> Result<()> {
    g.validate()?;
    check_len(
        "fc_backward_input: grad_out",
        g.out_features,
        grad_out.len(),
    )?;
    check_len("fc_backward_input: weight", g.weight_len(), weight.len())?;
    check_len(
        "fc_backward_input: weight_scale",
        g.out_features,
        weight_scale.len(),
    )?;
    check_len("fc_backward_input: grad_in", g.in_features, grad_in.len())?;
    grad_in.fill(0.0);
    for (o, w) in weight.chunks_exact(g.in_features).enumerate() {
        let gs = grad_out[o] * weight_scale[o];
        if gs == 0.0 {
            continue;
        }
        for (d, &wv) in grad_in.iter_mut().zip(w) {
            *d += gs * wv as f32;
        }
    }
    Ok(())
}

/// Gradient w.r.t. the real weights for the selected channels, accumulated (`+=`): `[count][in]`
/// for an output-axis selection, `[out][count]` for an input-axis one, where `input` then holds
/// only the first `count` features (what the layer saved).
pub fn fc_backward_weight(
    g: &FcGeom,
    input: &[i8],
    in_q: QParams,
    grad_out: &[f32],
    sel: ChannelSelection,
    grad_w: &mut [f32],
) -> Result<()> {
    g.validate()?;
    let ws = g.weight_shape();
    sel.check(&ws)?;
    check_len(
        "fc_backward_weight: saved input",
        sel.saved_input_channels(g.in_features),
        input.len(),
    )?;
    check_len(
        "fc_backward_weight: grad_out",
        g.out_features,
        grad_out.len(),
    )?;
    check_len(
        "fc_backward_weight: grad_w",
        sel.selected_len(&ws),
        grad_w.len(),
    )?;
    let cols = match sel.axis {
        ChannelAxis::Output => g.in_features,
        ChannelAxis::Input => sel.count,
    };
    if cols == 0 {
        return Ok(());
    }
    let rows = sel.rows(&ws);
    for (o, gw) in grad_w.chunks_exact_mut(cols).take(rows).enumerate() {
        let gs = grad_out[o] * in_q.scale;
        if gs == 0.0 {
            continue;
        }
        for (d, &xv) in gw.iter_mut().zip(input) {
            *d += gs * (xv as i32).wrapping_sub(in_q.zero_point) as f32;
        }
    }
    Ok(())
}

/// Gradient w.r.t. the real bias, accumulated (`+=`).
pub fn fc_backward_bias(g: &FcGeom, grad_out: &[f32], grad_b: &mut [f32]) -> Result<()> {
    g.validate()?;
    check_len("fc_backward_bias: grad_out", g.out_features, grad_out.len())?;
    check_len("fc_backward_bias: grad_b", g.out_features, grad_b.len())?;
    for (b, &v) in grad_b.iter_mut().zip(grad_out) {
        *b += v;
    }
    Ok(())
}

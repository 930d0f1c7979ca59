//! Residual add of two int8 tensors with different quantization, TFLite style: both inputs are
//! shifted left by 20 bits, brought to a common scale (2 * max input scale) by fixed-point
//! multipliers < 1, summed, and requantized to the output scale. With [`Rounding::Double`] all
//! three multiplies round as TFLite's reference ADD does, so the result is bit-exact with it.
use crate::error::{Error, Result};
use crate::quant::{check_act, check_len, finish, QParams, Requant, Rounding};

/// Headroom bits for the int8 inputs (TFLite uses 20 for int8).
pub const ADD_LEFT_SHIFT: i32 = 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AddParams {
    pub a_zp: i32,
    pub b_zp: i32,
    pub out_zp: i32,
    pub a_mult: Requant,
    pub b_mult: Requant,
    pub out_mult: Requant,
    pub act_min: i8,
    pub act_max: i8,
}

impl AddParams {
    pub fn new(
        a: QParams,
        b: QParams,
        out: QParams,
        act_min: i8,
        act_max: i8,
        rounding: Rounding,
    ) -> Result<AddParams> {
        for q in [a, b, out] {
            QParams::new(q.scale, q.zero_point)?;
            if !(-128..=127).contains(&q.zero_point) {
                return Err(Error::InvalidParameter {
                    what: "add: int8 zero point outside [-128, 127]",
                });
            }
        }
        check_act(act_min, act_max)?;
        let twice_max = 2.0 * (a.scale as f64).max(b.scale as f64);
        Ok(AddParams {
            a_zp: a.zero_point,
            b_zp: b.zero_point,
            out_zp: out.zero_point,
            a_mult: Requant::from_scale(a.scale as f64 / twice_max)?.with_rounding(rounding),
            b_mult: Requant::from_scale(b.scale as f64 / twice_max)?.with_rounding(rounding),
            out_mult: Requant::from_scale(
                twice_max / ((1i64 << ADD_LEFT_SHIFT) as f64 * out.scale as f64),
            )?
            .with_rounding(rounding),
            act_min,
            act_max,
        })
    }

    #[inline]
    pub fn apply(&self, a: i8, b: i8) -> i8 {
        let sa = self.a_mult.apply((a as i32 - self.a_zp) << ADD_LEFT_SHIFT);
        let sb = self.b_mult.apply((b as i32 - self.b_zp) << ADD_LEFT_SHIFT);
        finish(
            self.out_mult.apply(sa.wrapping_add(sb)),
            self.out_zp,
            self.act_min,
            self.act_max,
        )
    }
}

/// The scaled input terms of an [`AddParams`] for every int8 value: `apply` evaluated through
/// two table reads (2 KB), built once per tensor instead of two requantizations per element.
pub struct AddTerms {
    a: [i32; 256],
    b: [i32; 256],
}

impl AddTerms {
    pub fn new(p: &AddParams) -> AddTerms {
        let mut t = AddTerms {
            a: [0; 256],
            b: [0; 256],
        };
        for v in i8::MIN..=i8::MAX {
            let i = v as u8 as usize;
            t.a[i] = p.a_mult.apply((v as i32 - p.a_zp) << ADD_LEFT_SHIFT);
            t.b[i] = p.b_mult.apply((v as i32 - p.b_zp) << ADD_LEFT_SHIFT);
        }
        t
    }

    /// `p.apply(a, b)` for the `p` these terms were built from.
    #[inline(always)]
    pub fn apply(&self, p: &AddParams, a: i8, b: i8) -> i8 {
        out(p, self.a(a).wrapping_add(self.b(b)))
    }

    /// Input a's scaled term at value `v`.
    #[inline(always)]
    pub fn a(&self, v: i8) -> i32 {
        self.a[v as u8 as usize]
    }

    /// Input b's scaled term at value `v`.
    #[inline(always)]
    pub fn b(&self, v: i8) -> i32 {
        self.b[v as u8 as usize]
    }
}

/// The add's output for a sum of the two scaled terms.
#[inline(always)]
fn out(p: &AddParams, sum: i32) -> i8 {
    finish(p.out_mult.apply(sum), p.out_zp, p.act_min, p.act_max)
}

/// `out[i]` = the add's output for the sum of terms `sum(i, out[i])` (the current byte, for an
/// add writing over an input). Always inlined into the residual adds' element loops (a call per
/// element cost 0.9 M instructions of MCUNet-5FPS's forward on the Cortex-M4); on the DSP build
/// through the convs' epilogue chosen once per tensor (one `SMLAL` rounding, `SSAT`) instead of
/// 64-bit shifts and clamps per element, the same numbers.
#[inline(always)]
pub fn requant_each(p: &AddParams, o: &mut [i8], sum: impl FnMut(usize, i8) -> i32) {
    dsp_or_portable!(
        super::arm::requant_each(&p.out_mult, p.out_zp, p.act_min, p.act_max, o, sum),
        requant_each_portable(p, o, sum)
    )
}

/// The portable `requant_each`: the fixed-point requantization of every element.
#[inline(always)]
pub(super) fn requant_each_portable(
    p: &AddParams,
    o: &mut [i8],
    mut sum: impl FnMut(usize, i8) -> i32,
) {
    for (i, d) in o.iter_mut().enumerate() {
        *d = out(p, sum(i, *d));
    }
}

pub fn add_forward(p: &AddParams, a: &[i8], b: &[i8], output: &mut [i8]) -> Result<()> {
    check_add_forward(p, a, b, output)?;
    let t = AddTerms::new(p);
    requant_each(p, output, |i, _| t.a(a[i]).wrapping_add(t.b(b[i])));
    Ok(())
}

#[inline(always)]
pub(super) fn check_add_forward(p: &AddParams, a: &[i8], b: &[i8], output: &[i8]) -> Result<()> {
    check_len("add_forward: b", a.len(), b.len())?;
    check_len("add_forward: output", a.len(), output.len())?;
    check_act(p.act_min, p.act_max)?;
    if !(-128..=127).contains(&p.a_zp) || !(-128..=127).contains(&p.b_zp) {
        return Err(Error::InvalidParameter {
            what: "add: int8 zero point outside [-128, 127]",
        });
    }
    Ok(())
}

/// `d(a + b)/da = d(a + b)/db = 1` in real units, masked where the saved output was clamped.
/// Overwrites both input gradients.
pub fn add_backward(
    out_q: &[i8],
    act_min: i8,
    act_max: i8,
    grad_out: &[f32],
    grad_a: &mut [f32],
    grad_b: &mut [f32],
) -> Result<()> {
    check_act(act_min, act_max)?;
    check_len("add_backward: grad_out", out_q.len(), grad_out.len())?;
    check_len("add_backward: grad_a", out_q.len(), grad_a.len())?;
    check_len("add_backward: grad_b", out_q.len(), grad_b.len())?;
    for (i, &q) in out_q.iter().enumerate() {
        let g = if q <= act_min || q >= act_max {
            0.0
        } else {
            grad_out[i]
        };
        grad_a[i] = g;
        grad_b[i] = g;
    }
    Ok(())
}

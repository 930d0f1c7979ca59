//! The update blob: the parameters a sparse scheme trains, as one device sends them to a fleet
//! (a gateway forwards the bytes unchanged to a Flower client) and receives the global ones back.
//! Defined once here; the MCU writes and reads it with the same code as the host.
//!
//! All integers little-endian (docs/fleet-update-format.md has the table):
//!
//! ```text
//! header   magic "TTUP" | version u16 | header_len u16 (24) | total_len u32 (whole blob)
//!          | plan_tag u32 | sample_count u32 | n_sections u32
//! section  layer u16 | kind u8 (0 weight, 1 bias) | dtype u8 (0 int8, 1 int32) | count u32
//!          | count values (int8: 1 byte each; int32: 4 bytes each)
//! trailer  CRC-32 of every byte before it
//! ```
//!
//! The sections are the plan's trained parameters in plan order (layer by layer, its weights
//! before its bias): the int8 weights of the trained channels exactly as the learned state holds
//! them (OHWI over the trained slice: output axis `W[:k]`, input axis `W[:, :k]`) and the int32
//! biases. These are the values inference uses. The extra precision of the update (int8 residual
//! or fp32 master copy) does not travel: the issue asks for int8 weights and int32 biases, and an
//! fp32 master copy would make a blob five times larger. `plan_tag` is the CRC-32 of the plan's
//! header (which holds the CRCs of the plan body and of the frozen parameter blob), the value
//! tt-mcu's checkpoints use, so a blob never lands in another plan or another base model.
//!
//! Applying a blob replaces the trained int8 weights and int32 biases. Where a weight changes,
//! its extra precision is reset to the new value (residual 0, master copy = the int8 value);
//! where it does not, its extra precision is kept, so applying a device's own blob changes
//! nothing. Momentum and the stochastic-rounding state are left as they are.
//!
//! [`write`] fills a buffer; [`write_to`] streams the same bytes to a sink (a radio, a UART)
//! with no buffer at all. [`read`] checks everything (length, CRC, plan tag, every section header
//! against the plan) before any value is used; [`apply`] also checks every target range in the
//! learned state before writing the first byte. Nothing allocates.
//!
//! [`shift`] moves the trained values by a real offset per value, in their own LSB units and in
//! blob order, rounded as the plan's updates are: a fleet's drift correction (SCAFFOLD's
//! `c - c_i`, applied after every SGD step as `-lr * (c - c_i)`) runs on the device with it.
use crate::crc::{crc32, Crc32};
use crate::exec::Executor;
use crate::ir::{BufKind, Precision, NONE};
use crate::plan::{PlanView, NODE_CONV, NODE_FC};
use crate::qas::{residual_step, round_half_away, stochastic_round, XorShift32};
use crate::{Error, Result};

pub const MAGIC: [u8; 4] = *b"TTUP";
pub const VERSION: u16 = 1;
pub const HEADER_LEN: usize = 24;
pub const SECTION_LEN: usize = 8;
pub const CRC_LEN: usize = 4;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum ParamKind {
    Weight = 0,
    Bias = 1,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum DType {
    I8 = 0,
    I32 = 1,
}

impl DType {
    pub fn size(self) -> usize {
        match self {
            DType::I8 => 1,
            DType::I32 => 4,
        }
    }
}

/// One trained parameter of a plan: what its blob section carries and where its values live in
/// the learned state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Section {
    pub layer: u16,
    pub kind: ParamKind,
    pub dtype: DType,
    pub count: usize,
    /// Shape of the values, OHWI: weights `(rows, kh, kw, cols)` (output axis: the first `k`
    /// output channels, all their inputs; input axis: every output channel, the first `k`
    /// inputs), a bias `(out_c, 1, 1, 1)`.
    pub shape: [usize; 4],
    /// The layer is fully connected (its `kh = kw = 1` weights are `(rows, cols)`).
    pub fc: bool,
    state_at: usize,
    /// Learned-state offset of the weights' residual (1 byte each) or master copy (4 bytes).
    precision_at: Option<usize>,
}

impl Section {
    pub fn bytes(&self) -> usize {
        self.count * self.dtype.size()
    }
}

fn corrupt(field: &'static str) -> Error {
    Error::CorruptUpdate { field }
}

fn corrupt_plan(field: &'static str) -> Error {
    Error::CorruptPlan { field }
}

fn section_of(pv: &PlanView<'_>, li: usize, kind: ParamKind) -> Result<Option<Section>> {
    let l = pv.layer(li)?;
    let buf = match kind {
        ParamKind::Weight => l.st_weight,
        ParamKind::Bias => l.st_bias,
    };
    if buf == NONE {
        return Ok(None);
    }
    let layer = u16::try_from(li).map_err(|_| Error::InvalidParameter {
        what: "update blob: a plan with more than 65535 layers",
    })?;
    let n = pv.node(l.node as usize)?;
    let inp = pv.tensor(n.inputs[0] as usize)?;
    let out = pv.tensor(n.output as usize)?;
    let oc = out.c as usize;
    let (kh, kw, icg, fc) = match n.kind {
        NODE_CONV => (
            n.win[0] as usize,
            n.win[1] as usize,
            (inp.c / n.groups.max(1)) as usize,
            false,
        ),
        NODE_FC => (1, 1, inp.numel(), true),
        _ => return Err(corrupt_plan("layers.node (not a conv or fc)")),
    };
    let (shape, dtype, want) = match kind {
        ParamKind::Weight => {
            let k = l.channels as usize;
            let (rows, cols) = if l.axis == 0 { (k, icg) } else { (oc, k) };
            ([rows, kh, kw, cols], DType::I8, BufKind::StateWeight)
        }
        ParamKind::Bias => ([oc, 1, 1, 1], DType::I32, BufKind::StateBias),
    };
    let count = shape
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .ok_or(corrupt_plan("layers.channels"))?;
    let b = pv.buffer(buf as usize)?;
    if b.kind != want || Some(b.bytes as usize) != count.checked_mul(dtype.size()) {
        return Err(corrupt_plan("buffers (trained parameter state)"));
    }
    let extra = match kind {
        ParamKind::Weight => pv.globals.precision.extra_bytes(),
        ParamKind::Bias => 0,
    };
    let precision_at = if extra == 0 {
        None
    } else {
        if l.st_precision == NONE {
            return Err(corrupt_plan("layers.state buffers (update precision)"));
        }
        let p = pv.buffer(l.st_precision as usize)?;
        if p.kind != BufKind::StatePrecision || Some(p.bytes as usize) != count.checked_mul(extra) {
            return Err(corrupt_plan("buffers (update precision state)"));
        }
        Some(p.offset as usize)
    };
    Ok(Some(Section {
        layer,
        kind,
        dtype,
        count,
        shape,
        fc,
        state_at: b.offset as usize,
        precision_at,
    }))
}

/// The plan's trained parameters in blob order; stops after the first error.
pub struct Sections<'p> {
    pv: PlanView<'p>,
    next: usize,
}

impl Iterator for Sections<'_> {
    type Item = Result<Section>;

    fn next(&mut self) -> Option<Result<Section>> {
        while self.next < self.pv.n_layers.saturating_mul(2) {
            let (li, kind) = (
                self.next / 2,
                [ParamKind::Weight, ParamKind::Bias][self.next % 2],
            );
            self.next += 1;
            match section_of(&self.pv, li, kind) {
                Ok(Some(s)) => return Some(Ok(s)),
                Ok(None) => {}
                Err(e) => {
                    self.next = usize::MAX;
                    return Some(Err(e));
                }
            }
        }
        None
    }
}

pub fn sections<'p>(pv: &PlanView<'p>) -> Sections<'p> {
    Sections { pv: *pv, next: 0 }
}

/// Bytes of the plan's update blob (the same for every blob of one plan).
pub fn blob_len(pv: &PlanView<'_>) -> Result<usize> {
    Ok(shape(pv)?.0)
}

/// Blob length and number of sections.
fn shape(pv: &PlanView<'_>) -> Result<(usize, u32)> {
    let too_large = Error::InvalidParameter {
        what: "update blob above 4 GB",
    };
    let (mut len, mut n) = (HEADER_LEN + CRC_LEN, 0u32);
    for s in sections(pv) {
        len = s?
            .bytes()
            .checked_add(SECTION_LEN)
            .and_then(|b| b.checked_add(len))
            .filter(|&l| u32::try_from(l).is_ok())
            .ok_or(too_large)?;
        n += 1;
    }
    Ok((len, n))
}

fn state_slice(state: &[u8], at: usize, len: usize) -> Result<&[u8]> {
    state
        .get(at..at.checked_add(len).ok_or(corrupt_plan("buffers.offset"))?)
        .ok_or(corrupt_plan("buffers.offset (beyond the learned state)"))
}

fn check_state(pv: &PlanView<'_>, state: &[u8]) -> Result<()> {
    if state.len() != pv.state_bytes {
        return Err(Error::ShapeMismatch {
            what: "update blob: learned state bytes",
            expected: pv.state_bytes,
            actual: state.len(),
        });
    }
    Ok(())
}

/// Streams the update blob of `state` (the learned state of an executor running `pv`) to `sink`
/// piece by piece, in order, with no buffer: a device can send it as it is made. Returns its
/// length; an error of `sink` stops the stream and is returned.
pub fn write_to(
    pv: &PlanView<'_>,
    state: &[u8],
    sample_count: u32,
    mut sink: impl FnMut(&[u8]) -> Result<()>,
) -> Result<usize> {
    check_state(pv, state)?;
    let (len, n) = shape(pv)?;
    let mut crc = Crc32::new();
    let mut emit = |b: &[u8]| {
        crc.update(b);
        sink(b)
    };
    emit(&MAGIC)?;
    emit(&VERSION.to_le_bytes())?;
    emit(&(HEADER_LEN as u16).to_le_bytes())?;
    // `shape` keeps the length within u32.
    emit(&(len as u32).to_le_bytes())?;
    emit(&pv.tag.to_le_bytes())?;
    emit(&sample_count.to_le_bytes())?;
    emit(&n.to_le_bytes())?;
    for s in sections(pv) {
        let s = s?;
        emit(&s.layer.to_le_bytes())?;
        emit(&[s.kind as u8, s.dtype as u8])?;
        emit(&(s.count as u32).to_le_bytes())?;
        let src = state_slice(state, s.state_at, s.bytes())?;
        match s.dtype {
            DType::I8 => emit(src)?,
            // The arena holds native-endian i32; the blob is little-endian everywhere.
            DType::I32 => {
                for v in src.chunks_exact(4) {
                    emit(&i32::from_ne_bytes([v[0], v[1], v[2], v[3]]).to_le_bytes())?;
                }
            }
        }
    }
    sink(&crc.finish().to_le_bytes())?;
    Ok(len)
}

/// [`write_to`] into `out`; returns the blob's length. `out` shorter than [`blob_len`] is
/// `OutOfMemory` naming the bytes needed, before anything is written.
pub fn write(pv: &PlanView<'_>, state: &[u8], sample_count: u32, out: &mut [u8]) -> Result<usize> {
    let len = blob_len(pv)?;
    if out.len() < len {
        return Err(Error::OutOfMemory {
            what: "update blob buffer",
            needed: len,
            available: out.len(),
        });
    }
    let mut at = 0;
    write_to(pv, state, sample_count, |b| {
        let end = at + b.len();
        out.get_mut(at..end)
            .ok_or(Error::OutOfMemory {
                what: "update blob buffer",
                needed: end,
                available: len,
            })?
            .copy_from_slice(b);
        at = end;
        Ok(())
    })
}

fn rd_u16(b: &[u8], at: usize, field: &'static str) -> Result<u16> {
    let s = b.get(at..at + 2).ok_or(corrupt(field))?;
    Ok(u16::from_le_bytes([s[0], s[1]]))
}

fn rd_u32(b: &[u8], at: usize, field: &'static str) -> Result<u32> {
    let s = b.get(at..at + 4).ok_or(corrupt(field))?;
    Ok(u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
}

/// A blob checked against its plan: length, CRC, plan tag and every section header.
#[derive(Clone, Copy, Debug)]
pub struct UpdateView<'b> {
    pub plan_tag: u32,
    pub sample_count: u32,
    pub n_sections: usize,
    blob: &'b [u8],
}

/// Validates `blob` against the plan without touching anything.
pub fn read<'b>(pv: &PlanView<'_>, blob: &'b [u8]) -> Result<UpdateView<'b>> {
    if blob.len() < HEADER_LEN + CRC_LEN {
        return Err(corrupt("header (truncated)"));
    }
    if blob[0..4] != MAGIC {
        return Err(corrupt("magic"));
    }
    if rd_u16(blob, 4, "version")? != VERSION {
        return Err(corrupt("version"));
    }
    if rd_u16(blob, 6, "header_len")? as usize != HEADER_LEN {
        return Err(corrupt("header_len"));
    }
    if rd_u32(blob, 8, "total_len")? as usize != blob.len() {
        return Err(corrupt("total_len (truncated or trailing bytes)"));
    }
    let end = blob.len() - CRC_LEN;
    if crc32(&blob[..end]) != rd_u32(blob, end, "crc")? {
        return Err(corrupt("crc"));
    }
    let plan_tag = rd_u32(blob, 12, "plan_tag")?;
    if plan_tag != pv.tag {
        return Err(Error::UpdatePlanMismatch {
            expected: pv.tag,
            found: plan_tag,
        });
    }
    let v = UpdateView {
        plan_tag,
        sample_count: rd_u32(blob, 16, "sample_count")?,
        n_sections: rd_u32(blob, 20, "n_sections")? as usize,
        blob,
    };
    // Biases beyond the bound that keeps the forward's int32 accumulators exact are refused.
    v.for_each(pv, |s, values| {
        let beyond = |b: &[u8]| {
            i32::from_le_bytes([b[0], b[1], b[2], b[3]]).unsigned_abs() > crate::ops::BIAS_LIMIT
        };
        if matches!(s.dtype, DType::I32) && values.chunks_exact(4).any(beyond) {
            return Err(corrupt("section values (a bias beyond +-2^30)"));
        }
        Ok(())
    })?;
    Ok(v)
}

impl<'b> UpdateView<'b> {
    /// Calls `f` with each section and its values (little-endian bytes), in plan order, checking
    /// each section header against the plan before its call.
    pub fn for_each(
        &self,
        pv: &PlanView<'_>,
        mut f: impl FnMut(&Section, &'b [u8]) -> Result<()>,
    ) -> Result<()> {
        let b = self.blob;
        let end = b.len().saturating_sub(CRC_LEN);
        let mut at = HEADER_LEN;
        let mut n = 0usize;
        for s in sections(pv) {
            let s = s?;
            if n >= self.n_sections {
                return Err(corrupt("n_sections (fewer than the plan trains)"));
            }
            if rd_u16(b, at, "section.layer")? != s.layer {
                return Err(corrupt("section.layer"));
            }
            if b.get(at + 2) != Some(&(s.kind as u8)) {
                return Err(corrupt("section.kind"));
            }
            if b.get(at + 3) != Some(&(s.dtype as u8)) {
                return Err(corrupt("section.dtype"));
            }
            if rd_u32(b, at + 4, "section.count")? as usize != s.count {
                return Err(corrupt("section.count"));
            }
            at += SECTION_LEN;
            let values = at
                .checked_add(s.bytes())
                .filter(|&e| e <= end)
                .and_then(|e| b.get(at..e))
                .ok_or(corrupt("section values (truncated)"))?;
            f(&s, values)?;
            at += s.bytes();
            n += 1;
        }
        if n != self.n_sections {
            return Err(corrupt("n_sections (more than the plan trains)"));
        }
        if at != end {
            return Err(corrupt("total_len (sections do not add up)"));
        }
        Ok(())
    }

    /// Writes the blob's values into `state` (the learned state of an executor running `pv`),
    /// after checking every target range.
    pub fn apply(&self, pv: &PlanView<'_>, state: &mut [u8]) -> Result<()> {
        check_state(pv, state)?;
        let extra = pv.globals.precision.extra_bytes();
        self.for_each(pv, |s, _| {
            state_slice(state, s.state_at, s.bytes())?;
            if let Some(p) = s.precision_at {
                state_slice(state, p, s.count * extra)?;
            }
            Ok(())
        })?;
        self.for_each(pv, |s, values| apply_section(pv, s, values, state))
    }
}

fn cell(state: &mut [u8], at: usize, len: usize) -> Result<&mut [u8]> {
    state
        .get_mut(at..at + len)
        .ok_or(corrupt_plan("buffers.offset (beyond the learned state)"))
}

fn apply_section(pv: &PlanView<'_>, s: &Section, values: &[u8], state: &mut [u8]) -> Result<()> {
    match s.dtype {
        DType::I32 => {
            for (j, v) in values.chunks_exact(4).enumerate() {
                let v = i32::from_le_bytes([v[0], v[1], v[2], v[3]]);
                cell(state, s.state_at + 4 * j, 4)?.copy_from_slice(&v.to_ne_bytes());
            }
        }
        DType::I8 => {
            for (j, &v) in values.iter().enumerate() {
                let w = cell(state, s.state_at + j, 1)?;
                if w[0] == v {
                    continue;
                }
                w[0] = v;
                let Some(p) = s.precision_at else { continue };
                match pv.globals.precision {
                    Precision::FpMaster => {
                        cell(state, p + 4 * j, 4)?.copy_from_slice(&(v as i8 as f32).to_ne_bytes())
                    }
                    Precision::Residual => cell(state, p + j, 1)?[0] = 0,
                    Precision::StochasticRounding => {}
                }
            }
        }
    }
    Ok(())
}

/// Number of trained values of the plan (weights and biases, every section): the length of the
/// offsets [`shift`] takes.
pub fn trained_values(pv: &PlanView<'_>) -> Result<usize> {
    let mut n = 0usize;
    for s in sections(pv) {
        n = n
            .checked_add(s?.count)
            .ok_or(corrupt_plan("layers (trained values)"))?;
    }
    Ok(n)
}

/// Moves every trained value of `state` by `factor * offsets[k]`, `k` counting the values in blob
/// order, in the value's own LSB units: an int8 weight as the plan's SGD updates round (stochastic
/// rounding with the plan's generator, one draw per weight; the int8 residual or the fp32 master
/// copy otherwise), saturating at +-127; an int32 bias to nearest, saturating at +-2^30. Nothing
/// changes unless `offsets` has one finite value per trained value and `factor` is finite.
pub fn shift(pv: &PlanView<'_>, state: &mut [u8], offsets: &[f32], factor: f32) -> Result<()> {
    check_state(pv, state)?;
    let n = trained_values(pv)?;
    if offsets.len() != n {
        return Err(Error::ShapeMismatch {
            what: "shift: offsets (one per trained value)",
            expected: n,
            actual: offsets.len(),
        });
    }
    if !factor.is_finite() || !crate::quant::all_finite(offsets) {
        return Err(Error::NonFinite {
            what: "shift: offsets",
        });
    }
    let precision = pv.globals.precision;
    let extra = precision.extra_bytes();
    let rng_at = if pv.globals.rng == NONE {
        None
    } else {
        let b = pv.buffer(pv.globals.rng as usize)?;
        state_slice(state, b.offset as usize, 4)?;
        Some(b.offset as usize)
    };
    for s in sections(pv) {
        let s = s?;
        state_slice(state, s.state_at, s.bytes())?;
        if let Some(p) = s.precision_at {
            state_slice(state, p, s.count * extra)?;
        }
        if s.dtype == DType::I8 && precision == Precision::StochasticRounding && rng_at.is_none() {
            return Err(corrupt_plan("globals.rng"));
        }
    }
    let mut rng = match rng_at {
        Some(at) => XorShift32 {
            state: u32::from_le_bytes([state[at], state[at + 1], state[at + 2], state[at + 3]]),
        },
        None => XorShift32::new(1),
    };
    let mut offsets = offsets.iter().map(|&o| factor * o);
    let limit = crate::ops::BIAS_LIMIT as i64;
    for s in sections(pv) {
        let s = s?;
        for (j, d) in offsets.by_ref().take(s.count).enumerate() {
            match s.dtype {
                DType::I32 => {
                    let c = cell(state, s.state_at + 4 * j, 4)?;
                    let b = i32::from_ne_bytes([c[0], c[1], c[2], c[3]]) as i64;
                    let nb = (b + round_half_away(d) as i64).clamp(-limit, limit) as i32;
                    c.copy_from_slice(&nb.to_ne_bytes());
                }
                DType::I8 => {
                    let w = cell(state, s.state_at + j, 1)?[0] as i8;
                    let nw = match (precision, s.precision_at) {
                        (Precision::Residual, Some(p)) => {
                            let r = cell(state, p + j, 1)?;
                            let mut ri = r[0] as i8;
                            let nw = residual_step(w, &mut ri, d);
                            r[0] = ri as u8;
                            nw
                        }
                        (Precision::FpMaster, Some(p)) => {
                            let c = cell(state, p + 4 * j, 4)?;
                            let m = (f32::from_ne_bytes([c[0], c[1], c[2], c[3]]) + d)
                                .clamp(-127.0, 127.0);
                            c.copy_from_slice(&m.to_ne_bytes());
                            round_half_away(m) as i8
                        }
                        _ => stochastic_round(w, d, &mut rng),
                    };
                    cell(state, s.state_at + j, 1)?[0] = nw as u8;
                }
            }
        }
    }
    if let Some(at) = rng_at {
        state[at..at + 4].copy_from_slice(&rng.state.to_le_bytes());
    }
    Ok(())
}

/// [`read`] then [`UpdateView::apply`]; returns the blob's sample count.
pub fn apply(pv: &PlanView<'_>, blob: &[u8], state: &mut [u8]) -> Result<u32> {
    let v = read(pv, blob)?;
    v.apply(pv, state)?;
    Ok(v.sample_count)
}

impl Executor<'_, '_> {
    /// The update blob of the current learned state (see [`write`]).
    pub fn write_update(&self, sample_count: u32, out: &mut [u8]) -> Result<usize> {
        write(self.plan(), self.state(), sample_count, out)
    }

    /// Moves the trained values by `factor * offsets` (see [`shift`]).
    pub fn shift_trained(&mut self, offsets: &[f32], factor: f32) -> Result<()> {
        let pv = *self.plan();
        shift(&pv, self.state_mut(), offsets, factor)
    }

    /// Loads a blob's trained parameters (see [`apply`]); returns its sample count.
    pub fn apply_update(&mut self, blob: &[u8]) -> Result<u32> {
        let pv = *self.plan();
        apply(&pv, blob, self.state_mut())
    }
}

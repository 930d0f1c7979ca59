//! Bindings of the Tiny Training Engine: compile (graph + scheme -> plan bytes + parameter blob),
//! the memory report of a plan, and `Session`, which runs a plan with tt-core's executor over an
//! arena it owns. Errors: a corrupted plan raises `tinytrain.errors.PlanError` naming the field,
//! everything else `ValueError` with tt-core's message.
use numpy::ndarray::Array2;
use numpy::{IntoPyArray, PyArray1, PyArray2, PyReadonlyArray1, PyReadonlyArray2};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict};
use tt_core::autodiff::Layout;
use tt_core::compile::{compile_with, Objective, PlanSettings};
use tt_core::exec::{Executor, Target};
use tt_core::graph::{Activation, Graph, LayerParams, Node, NodeKind, TensorInfo, Window};
use tt_core::plan::{
    Buffer, CompileOptions, LossKind, OpKind, PlanView, Precision, TrainOp, IN_PLACE,
};
use tt_core::planner;
use tt_core::quant::Rounding;
use tt_core::sparse::{ChannelAxis, LayerUpdate, Scheme};
use tt_core::Error;

pub(crate) fn core_err(py: Python<'_>, e: Error) -> PyErr {
    let update_field = match e {
        Error::CorruptUpdate { field } => Some(field),
        Error::UpdatePlanMismatch { .. } => Some("plan_tag"),
        _ => None,
    };
    if let Some(field) = update_field {
        let made = py
            .import("tinytrain.errors")
            .and_then(|m| m.getattr("UpdateError"))
            .and_then(|cls| cls.call1((e.to_string(), field)));
        return match made {
            Ok(obj) => PyErr::from_value(obj),
            Err(err) => err,
        };
    }
    if let Error::CorruptPlan { field } = e {
        let made = py
            .import("tinytrain.errors")
            .and_then(|m| m.getattr("PlanError"))
            .and_then(|cls| cls.call1((e.to_string(), field)));
        return match made {
            Ok(obj) => PyErr::from_value(obj),
            Err(err) => err,
        };
    }
    PyValueError::new_err(e.to_string())
}

type NodeDesc<'py> = (
    String,
    String,
    Vec<usize>,
    usize,
    [u16; 8],
    u32,
    u8,
    Option<PyReadonlyArray1<'py, i8>>,
    Option<PyReadonlyArray1<'py, i32>>,
    Option<PyReadonlyArray1<'py, f32>>,
);

fn act(v: u8) -> PyResult<Activation> {
    Activation::from_u8(v).ok_or_else(|| PyValueError::new_err(format!("bad activation code {v}")))
}

/// The Python spelling of a model's requantization rounding (`QuantizedModel.rounding`).
pub(crate) fn rounding_of(name: &str) -> PyResult<Rounding> {
    match name {
        "single" => Ok(Rounding::Single),
        "double" => Ok(Rounding::Double),
        _ => Err(PyValueError::new_err(format!(
            "rounding must be 'single' or 'double' (TFLite's), got {name:?}"
        ))),
    }
}

fn rounding_name(r: Rounding) -> &'static str {
    match r {
        Rounding::Single => "single",
        Rounding::Double => "double",
    }
}

fn build_graph(
    tensors: Vec<(u32, u32, u32, f32, i32)>,
    nodes: Vec<NodeDesc<'_>>,
    input: usize,
    output: usize,
    rounding: Rounding,
) -> PyResult<Graph> {
    let tensors = tensors
        .into_iter()
        .map(|(c, h, w, scale, zero_point)| TensorInfo {
            c,
            h,
            w,
            scale,
            zero_point,
        })
        .collect();
    let mut gn = Vec::new();
    let mut params = Vec::new();
    for (name, kind, inputs, out, w, groups, a, wq, bq, sq) in nodes {
        let win = Window {
            kh: w[0],
            kw: w[1],
            sh: w[2],
            sw: w[3],
            pt: w[4],
            pl: w[5],
            pb: w[6],
            pr: w[7],
        };
        let k = match kind.as_str() {
            "conv" => NodeKind::Conv {
                win,
                groups,
                act: act(a)?,
            },
            "fc" => NodeKind::Fc { act: act(a)? },
            "add" => NodeKind::Add { act: act(a)? },
            "global_avgpool" => NodeKind::GlobalAvgPool,
            "avgpool" => NodeKind::AvgPool { win },
            "maxpool" => NodeKind::MaxPool { win },
            "flatten" => NodeKind::Flatten,
            other => {
                return Err(PyValueError::new_err(format!(
                    "node {name:?}: op {other:?} is not supported by the engine"
                )))
            }
        };
        let p = match (wq, bq, sq) {
            (Some(wq), Some(bq), Some(sq)) => Some(LayerParams {
                weight: wq.as_slice()?.to_vec(),
                bias: bq.as_slice()?.to_vec(),
                weight_scale: sq.as_slice()?.to_vec(),
            }),
            _ => None,
        };
        gn.push(Node {
            name,
            kind: k,
            inputs,
            output: out,
        });
        params.push(p);
    }
    Ok(Graph {
        tensors,
        nodes: gn,
        params,
        input,
        output,
        rounding,
    })
}

/// Compiles a quantized graph for training. Returns (plan bytes, parameter blob).
#[pyfunction]
#[pyo3(signature = (tensors, nodes, input, output, scheme, reorder, precision, momentum_buffers, loss, seed, lr, momentum, meta, layout=None, stream_input=false, accumulate=false, rounding="single", optimize="memory", budget=None))]
#[allow(clippy::too_many_arguments)]
fn engine_compile<'py>(
    py: Python<'py>,
    tensors: Vec<(u32, u32, u32, f32, i32)>,
    nodes: Vec<NodeDesc<'py>>,
    input: usize,
    output: usize,
    scheme: Vec<(bool, f32, u8)>,
    reorder: bool,
    precision: u8,
    momentum_buffers: bool,
    loss: u8,
    seed: u64,
    lr: f32,
    momentum: f32,
    meta: &[u8],
    layout: Option<(Option<(usize, usize)>, bool, bool)>,
    stream_input: bool,
    accumulate: bool,
    rounding: &str,
    optimize: &str,
    budget: Option<usize>,
) -> PyResult<(Bound<'py, PyBytes>, Bound<'py, PyBytes>)> {
    let objective = match optimize {
        "memory" => Objective::Memory,
        "compute" => Objective::Compute {
            budget: budget.unwrap_or(usize::MAX),
        },
        other => {
            return Err(PyValueError::new_err(format!(
                "optimize must be 'memory' or 'compute', got {other:?}"
            )))
        }
    };
    let g = build_graph(tensors, nodes, input, output, rounding_of(rounding)?)?;
    let scheme = Scheme {
        layers: scheme
            .into_iter()
            .map(|(bias, weight_ratio, axis)| LayerUpdate {
                bias,
                weight_ratio,
                axis: ChannelAxis::from_u8(axis).unwrap_or(ChannelAxis::Output),
            })
            .collect(),
    };
    let settings = PlanSettings {
        options: CompileOptions {
            reorder,
            precision: Precision::from_u8(precision)
                .ok_or_else(|| PyValueError::new_err("bad update precision"))?,
            momentum: momentum_buffers,
            loss: LossKind::from_u8(loss).ok_or_else(|| PyValueError::new_err("bad loss"))?,
            accumulate,
        },
        seed,
        lr,
        momentum,
    };
    let c = py
        .allow_threads(|| {
            let fixed = layout.map(|(patch, in_place, shrink_in_place)| Layout {
                patch,
                in_place,
                shrink_in_place,
                out_of_place: [0; 4],
                stream_input,
                fuse_blocks: false,
            });
            compile_with(&g, &scheme, &settings, meta, fixed, stream_input, objective)
        })
        .map_err(|e| core_err(py, e))?;
    Ok((PyBytes::new(py, &c.plan), PyBytes::new(py, &c.params)))
}

fn records(v: &PlanView<'_>) -> Result<(Vec<Buffer>, Vec<TrainOp>, Vec<usize>), Error> {
    let mut bufs = Vec::with_capacity(v.n_buffers);
    let mut offs = Vec::with_capacity(v.n_buffers);
    for i in 0..v.n_buffers {
        let b = v.buffer(i)?;
        bufs.push(Buffer {
            kind: b.kind,
            bytes: b.bytes as usize,
            node: 0,
        });
        offs.push(b.offset as usize);
    }
    let mut ops = Vec::with_capacity(v.n_ops);
    for i in 0..v.n_ops {
        let o = v.op(i)?;
        ops.push(TrainOp {
            kind: o.kind,
            node: o.node,
            arg: o.arg,
            bufs: o.bufs,
        });
    }
    Ok((bufs, ops, offs))
}

/// Memory report of a plan, computed from its bytes alone.
#[pyfunction]
fn plan_report<'py>(py: Python<'py>, plan: &[u8]) -> PyResult<Bound<'py, PyDict>> {
    let v = PlanView::parse(plan).map_err(|e| core_err(py, e))?;
    let (bufs, ops, offs) = records(&v).map_err(|e| core_err(py, e))?;
    let mp = planner::measure(&bufs, &ops, offs, v.arena_bytes, v.state_bytes);
    let bd = planner::breakdown(&bufs, &ops, &mp);
    let d = PyDict::new(py);
    d.set_item("arena_bytes", v.arena_bytes)?;
    d.set_item("state_bytes", v.state_bytes)?;
    d.set_item("lower_bound", mp.lower_bound)?;
    d.set_item("peak_op", mp.peak_op)?;
    d.set_item("live", mp.live.clone())?;
    let b = PyDict::new(py);
    for (name, bytes) in planner::CATEGORIES.iter().zip(bd) {
        b.set_item(*name, bytes)?;
    }
    d.set_item("breakdown", b)?;
    let oplist: Vec<(&str, u32)> = ops.iter().map(|o| (o.kind.name(), o.node)).collect();
    d.set_item("ops", oplist)?;
    let mut by_kind = [0usize; 16];
    for bf in &bufs {
        if bf.kind.persistent() {
            by_kind[bf.kind as usize] += planner::aligned(bf.bytes);
        }
    }
    d.set_item("state_by_kind", by_kind.to_vec())?;
    d.set_item("params_len", v.params_len)?;
    d.set_item("n_layers", v.n_layers)?;
    d.set_item("meta", PyBytes::new(py, v.meta()))?;
    d.set_item("reorder", v.globals.reorder)?;
    d.set_item("precision", v.globals.precision as u8)?;
    d.set_item("loss", v.globals.loss as u8)?;
    d.set_item("momentum_buffers", v.globals.momentum_buffers)?;
    d.set_item("accumulate", v.globals.accumulate)?;
    d.set_item("rounding", rounding_name(v.globals.rounding))?;
    d.set_item("lr", v.globals.lr)?;
    d.set_item("momentum", v.globals.momentum)?;
    d.set_item("seed", v.globals.seed)?;
    let mut patch = None;
    let mut in_place = 0usize;
    let mut streamed = false;
    for o in &ops {
        if o.kind == OpKind::PatchStage {
            patch = Some(((o.arg & 0xFFFF) as usize, (o.arg >> 16) as usize));
            streamed = o.bufs[0] == tt_core::plan::NONE;
        }
        if o.arg & IN_PLACE != 0 {
            in_place += 1;
        }
    }
    d.set_item("patch", patch)?;
    d.set_item("in_place_ops", in_place)?;
    d.set_item("stream_input", streamed)?;
    let macs = v.forward_macs().map_err(|e| core_err(py, e))?;
    d.set_item("model_macs", macs.model)?;
    d.set_item("executed_macs", macs.executed)?;
    Ok(d)
}

fn words(bytes: &[u8]) -> Vec<u32> {
    bytes
        .chunks(4)
        .map(|c| {
            let mut a = [0u8; 4];
            a[..c.len()].copy_from_slice(c);
            u32::from_le_bytes(a)
        })
        .collect()
}

fn as_bytes(w: &[u32], len: usize) -> &[u8] {
    // SAFETY: u32 storage reinterpreted as bytes (alignment 1, every pattern valid), `len` is at
    // most 4 * w.len() by construction.
    unsafe { std::slice::from_raw_parts(w.as_ptr() as *const u8, len.min(4 * w.len())) }
}

fn as_bytes_mut(w: &mut [u32], len: usize) -> &mut [u8] {
    // SAFETY: as above, exclusively borrowed.
    unsafe { std::slice::from_raw_parts_mut(w.as_mut_ptr() as *mut u8, len.min(4 * w.len())) }
}

/// A plan being trained on the host: owns the plan, the parameter blob and the arena, and runs
/// tt-core's executor over them (the same code as on the MCU).
#[pyclass(unsendable)]
pub(crate) struct Session {
    plan: Vec<u8>,
    params: Vec<u32>,
    params_len: usize,
    arena: Vec<u32>,
    arena_len: usize,
    #[pyo3(get, set)]
    lr: f32,
    #[pyo3(get, set)]
    momentum: f32,
    #[pyo3(get, set)]
    qas: bool,
    #[pyo3(get)]
    high_water: usize,
    /// A drift correction per trained value (blob order, LSB units), moved by `-lr` times it
    /// after every update (`set_correction`).
    correction: Option<Vec<f32>>,
}

impl Session {
    pub(crate) fn with<R>(
        &mut self,
        py: Python<'_>,
        f: impl FnOnce(&mut Executor<'_, '_>) -> Result<R, Error>,
    ) -> PyResult<R> {
        self.with_correction(py, |ex, _| f(ex))
    }

    fn with_correction<R>(
        &mut self,
        py: Python<'_>,
        f: impl FnOnce(&mut Executor<'_, '_>, Option<&[f32]>) -> Result<R, Error>,
    ) -> PyResult<R> {
        let params = as_bytes(&self.params, self.params_len);
        let arena = as_bytes_mut(&mut self.arena, self.arena_len);
        let mut ex = Executor::new(&self.plan, params, arena).map_err(|e| core_err(py, e))?;
        ex.lr = self.lr;
        ex.momentum = self.momentum;
        ex.qas = self.qas;
        let r = f(&mut ex, self.correction.as_deref());
        self.high_water = self.high_water.max(ex.high_water());
        r.map_err(|e| core_err(py, e))
    }

    /// One training step, then the drift correction's move if one is set; a refused step
    /// (a gradient not finite) gives NaN and moves nothing.
    fn corrected_step(&mut self, py: Python<'_>, row: &[i8], target: Target<'_>) -> PyResult<f32> {
        self.with_correction(py, |ex, correction| match ex.step(row, target) {
            Err(Error::NonFinite { .. }) => Ok(f32::NAN),
            Ok(loss) => {
                if let Some(c) = correction {
                    let lr = ex.lr;
                    ex.shift_trained(c, -lr)?;
                }
                Ok(loss)
            }
            Err(e) => Err(e),
        })
    }
}

#[pymethods]
impl Session {
    #[new]
    fn new(py: Python<'_>, plan: &[u8], params: &[u8]) -> PyResult<Self> {
        let v = PlanView::parse(plan).map_err(|e| core_err(py, e))?;
        let plan = plan[..v.plan_len].to_vec();
        let mut s = Session {
            plan,
            params: words(params),
            params_len: params.len(),
            arena: vec![0u32; v.arena_bytes.div_ceil(4)],
            arena_len: v.arena_bytes,
            lr: v.globals.lr,
            momentum: v.globals.momentum,
            qas: true,
            high_water: 0,
            correction: None,
        };
        s.with(py, |ex| ex.init())?;
        s.high_water = 0;
        Ok(s)
    }

    /// Restarts training from the frozen parameters.
    fn init(&mut self, py: Python<'_>) -> PyResult<()> {
        self.with(py, |ex| ex.init())
    }

    /// Restarts the stochastic-rounding generator from `seed`.
    fn reseed(&mut self, py: Python<'_>, seed: u64) -> PyResult<()> {
        self.with(py, |ex| ex.reseed(seed))
    }

    #[getter]
    fn arena_bytes(&self) -> usize {
        self.arena_len
    }

    fn reset_high_water(&mut self) {
        self.high_water = 0;
    }

    /// One step per row of `x` (int8, HWC flattened) with class labels. Returns the per-sample
    /// losses; a step refused because a gradient was not finite gives NaN and changes nothing
    /// after the layer where it was detected.
    fn steps<'py>(
        &mut self,
        py: Python<'py>,
        x: PyReadonlyArray2<'py, i8>,
        labels: PyReadonlyArray1<'py, i64>,
    ) -> PyResult<Bound<'py, PyArray1<f32>>> {
        let x = x.as_array();
        let labels = labels.as_slice()?;
        if labels.len() != x.nrows() {
            return Err(PyValueError::new_err("one label per sample expected"));
        }
        let mut out = Vec::with_capacity(labels.len());
        for (row, &y) in x.outer_iter().zip(labels) {
            let row: Vec<i8> = row.iter().copied().collect();
            if y < 0 {
                return Err(PyValueError::new_err(format!("label {y} is negative")));
            }
            out.push(self.corrected_step(py, &row, Target::Class(y as usize))?);
        }
        Ok(out.into_pyarray(py))
    }

    /// Accumulation plans: forward and backward of each row (class labels), gradients summed
    /// into the accumulators, no update. Returns the per-sample losses.
    fn accumulate<'py>(
        &mut self,
        py: Python<'py>,
        x: PyReadonlyArray2<'py, i8>,
        labels: PyReadonlyArray1<'py, i64>,
    ) -> PyResult<Bound<'py, PyArray1<f32>>> {
        let x = x.as_array();
        let labels = labels.as_slice()?;
        if labels.len() != x.nrows() {
            return Err(PyValueError::new_err("one label per sample expected"));
        }
        let mut out = Vec::with_capacity(labels.len());
        for (row, &y) in x.outer_iter().zip(labels) {
            let row: Vec<i8> = row.iter().copied().collect();
            if y < 0 {
                return Err(PyValueError::new_err(format!("label {y} is negative")));
            }
            out.push(self.with(py, |ex| ex.accumulate(&row, Target::Class(y as usize)))?);
        }
        Ok(out.into_pyarray(py))
    }

    /// Like `accumulate`, for a plan compiled with the MSE loss: one float target row per sample.
    fn accumulate_mse<'py>(
        &mut self,
        py: Python<'py>,
        x: PyReadonlyArray2<'py, i8>,
        targets: PyReadonlyArray2<'py, f32>,
    ) -> PyResult<Bound<'py, PyArray1<f32>>> {
        let x = x.as_array();
        let t = targets.as_array();
        if t.nrows() != x.nrows() {
            return Err(PyValueError::new_err("one target row per sample expected"));
        }
        let mut out = Vec::with_capacity(x.nrows());
        for (row, trow) in x.outer_iter().zip(t.outer_iter()) {
            let row: Vec<i8> = row.iter().copied().collect();
            let trow: Vec<f32> = trow.iter().copied().collect();
            out.push(self.with(py, |ex| ex.accumulate(&row, Target::Values(&trow)))?);
        }
        Ok(out.into_pyarray(py))
    }

    /// The update phase of an accumulation plan: the mean of `count` accumulated gradients.
    /// Returns False (nothing changed, accumulators zeroed) when a gradient was not finite.
    fn apply_accumulated(&mut self, py: Python<'_>, count: usize) -> PyResult<bool> {
        self.with_correction(py, |ex, correction| match ex.apply_accumulated(count) {
            Err(Error::NonFinite { .. }) => Ok(false),
            Ok(()) => {
                if let Some(c) = correction {
                    let lr = ex.lr;
                    ex.shift_trained(c, -lr)?;
                }
                Ok(true)
            }
            Err(e) => Err(e),
        })
    }

    /// Sets (one float per trained value, blob order, LSB units) or clears (None) the drift
    /// correction: after every update each trained value also moves by `-lr` times its entry.
    #[pyo3(signature = (correction=None))]
    fn set_correction(
        &mut self,
        py: Python<'_>,
        correction: Option<PyReadonlyArray1<'_, f32>>,
    ) -> PyResult<()> {
        let Some(c) = correction else {
            self.correction = None;
            return Ok(());
        };
        let c = c.as_slice()?.to_vec();
        let pv = PlanView::parse(&self.plan).map_err(|e| core_err(py, e))?;
        let n = tt_core::update::trained_values(&pv).map_err(|e| core_err(py, e))?;
        if c.len() != n {
            return Err(PyValueError::new_err(format!(
                "the correction needs one value per trained value ({n}), got {}",
                c.len()
            )));
        }
        if let Some(k) = c.iter().position(|v| !v.is_finite()) {
            return Err(PyValueError::new_err(format!(
                "correction value {k} is not finite"
            )));
        }
        self.correction = Some(c);
        Ok(())
    }

    /// Like `steps`, for a plan compiled with the MSE loss: one float target row per sample.
    fn steps_mse<'py>(
        &mut self,
        py: Python<'py>,
        x: PyReadonlyArray2<'py, i8>,
        targets: PyReadonlyArray2<'py, f32>,
    ) -> PyResult<Bound<'py, PyArray1<f32>>> {
        let x = x.as_array();
        let t = targets.as_array();
        if t.nrows() != x.nrows() {
            return Err(PyValueError::new_err("one target row per sample expected"));
        }
        let mut out = Vec::with_capacity(x.nrows());
        for (row, trow) in x.outer_iter().zip(t.outer_iter()) {
            let row: Vec<i8> = row.iter().copied().collect();
            let trow: Vec<f32> = trow.iter().copied().collect();
            out.push(self.corrected_step(py, &row, Target::Values(&trow))?);
        }
        Ok(out.into_pyarray(py))
    }

    /// Forward pass of each row; returns the int8 outputs (N, outputs).
    fn forward<'py>(
        &mut self,
        py: Python<'py>,
        x: PyReadonlyArray2<'py, i8>,
    ) -> PyResult<Bound<'py, PyArray2<i8>>> {
        let x = x.as_array();
        let mut rows: Vec<i8> = Vec::new();
        let mut width = 0;
        for row in x.outer_iter() {
            let row: Vec<i8> = row.iter().copied().collect();
            let y = self.with(py, |ex| ex.forward(&row).map(|y| y.to_vec()))?;
            width = y.len();
            rows.extend(y);
        }
        let a = Array2::from_shape_vec((x.nrows(), width), rows)
            .map_err(|e| PyValueError::new_err(e.to_string()))?;
        Ok(a.into_pyarray(py))
    }

    /// The learned state (checkpoint bytes).
    fn state<'py>(&mut self, py: Python<'py>) -> PyResult<Bound<'py, PyBytes>> {
        let s = self.with(py, |ex| Ok(ex.state().to_vec()))?;
        Ok(PyBytes::new(py, &s))
    }

    fn set_state(&mut self, py: Python<'_>, state: &[u8]) -> PyResult<()> {
        self.with(py, |ex| {
            let s = ex.state_mut();
            if s.len() != state.len() {
                return Err(Error::ShapeMismatch {
                    what: "set_state: checkpoint",
                    expected: s.len(),
                    actual: state.len(),
                });
            }
            s.copy_from_slice(state);
            Ok(())
        })
    }

    /// Current (frozen + trained) parameters of layer `li`: OHWI int8 weights and int32 bias.
    fn read_layer<'py>(
        &mut self,
        py: Python<'py>,
        li: usize,
        weights: usize,
        out_c: usize,
    ) -> PyResult<(Bound<'py, PyArray1<i8>>, Bound<'py, PyArray1<i32>>)> {
        let mut w = vec![0i8; weights];
        let mut b = vec![0i32; out_c];
        self.with(py, |ex| ex.read_layer(li, &mut w, &mut b))?;
        Ok((w.into_pyarray(py), b.into_pyarray(py)))
    }
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(engine_compile, m)?)?;
    m.add_function(wrap_pyfunction!(plan_report, m)?)?;
    m.add_class::<Session>()?;
    Ok(())
}

//! Bindings of the Tiny Training Engine: compile (graph + scheme -> plan bytes + parameter blob),
//! the memory report of a plan, and `Session`, which runs a plan with tt-core's executor over an
//! arena it owns. Errors: a corrupted plan raises `tinytrain.errors.PlanError` naming the field,
//! everything else `ValueError` with tt-core's message.
use numpy::ndarray::Array2;
use numpy::{IntoPyArray, PyArray1, PyArray2, PyReadonlyArray1, PyReadonlyArray2};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict};
use std::str::FromStr;
use tt_core::autodiff::Layout;
use tt_core::compile::{compile_with, Objective, PlanSettings};
use tt_core::exec::{Executor, Target};
use tt_core::graph::{Graph, LayerParams, Node, NodeKind, TensorInfo, Window};
use tt_core::ir::{Buffer, CompileOptions, OpKind, TrainOp, IN_PLACE};
use tt_core::names::UnknownName;
use tt_core::plan::PlanView;
use tt_core::planner;
use tt_core::quant::Activation;
use tt_core::sparse::{LayerUpdate, Scheme};
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

/// A name of one of tt-core's settings (`"stochastic"`, `"relu6"`, ...), parsed by tt-core.
pub(crate) fn parse_name<T: FromStr<Err = UnknownName>>(name: &str) -> PyResult<T> {
    name.parse()
        .map_err(|e: UnknownName| PyValueError::new_err(format!("{e}, got {name:?}")))
}

/// `tinytrain._lowering.Tensor`: one activation tensor (channels, height, width) and its int8
/// quantization.
#[derive(FromPyObject)]
struct TensorRequest {
    c: u32,
    h: u32,
    w: u32,
    scale: f32,
    zero_point: i32,
}

/// `tinytrain._lowering.Window`: a conv's or pool's kernel, stride and padding.
#[derive(FromPyObject)]
struct WindowRequest {
    kh: u16,
    kw: u16,
    sh: u16,
    sw: u16,
    pt: u16,
    pl: u16,
    pb: u16,
    pr: u16,
}

/// `tinytrain._lowering.LayerUpdate`: what the scheme trains of one node.
#[derive(FromPyObject)]
struct UpdateRequest {
    bias: bool,
    weight_ratio: f32,
    axis: String,
}

/// `tinytrain._lowering.Node`: one op with its tensor ids and, for conv and fc, its int8 OHWI
/// weights, int32 bias and per-channel weight scales.
#[derive(FromPyObject)]
struct NodeRequest<'py> {
    name: String,
    op: String,
    inputs: Vec<usize>,
    output: usize,
    window: Option<WindowRequest>,
    groups: u32,
    act: String,
    weight: Option<PyReadonlyArray1<'py, i8>>,
    bias: Option<PyReadonlyArray1<'py, i32>>,
    weight_scale: Option<PyReadonlyArray1<'py, f32>>,
    update: UpdateRequest,
}

/// `tinytrain._lowering.Layout`: a fixed execution layout (otherwise the planner searches).
#[derive(FromPyObject)]
struct LayoutRequest {
    patch: Option<(usize, usize)>,
    in_place: bool,
    shrink_in_place: bool,
}

/// `tinytrain._lowering.CompileRequest`: everything `tt.compile` asks of tt-core, settings by
/// name.
#[derive(FromPyObject)]
struct CompileRequest<'py> {
    tensors: Vec<TensorRequest>,
    nodes: Vec<NodeRequest<'py>>,
    input: usize,
    output: usize,
    rounding: String,
    reorder: bool,
    update_precision: String,
    loss: String,
    momentum_buffers: bool,
    accumulate: bool,
    seed: u64,
    lr: f32,
    momentum: f32,
    meta: Vec<u8>,
    layout: Option<LayoutRequest>,
    stream_input: bool,
    optimize: String,
    budget: Option<usize>,
}

impl WindowRequest {
    fn window(&self) -> Window {
        Window {
            kh: self.kh,
            kw: self.kw,
            sh: self.sh,
            sw: self.sw,
            pt: self.pt,
            pl: self.pl,
            pb: self.pb,
            pr: self.pr,
        }
    }
}

impl NodeRequest<'_> {
    fn kind(&self) -> PyResult<NodeKind> {
        let act = || {
            self.act.parse::<Activation>().map_err(|e| {
                PyValueError::new_err(format!("node {:?}: {e}, got {:?}", self.name, self.act))
            })
        };
        let win = || {
            self.window
                .as_ref()
                .map(WindowRequest::window)
                .ok_or_else(|| {
                    PyValueError::new_err(format!(
                        "node {:?}: {} needs a window",
                        self.name, self.op
                    ))
                })
        };
        Ok(match self.op.as_str() {
            "conv" => NodeKind::Conv {
                win: win()?,
                groups: self.groups,
                act: act()?,
            },
            "fc" => NodeKind::Fc { act: act()? },
            "add" => NodeKind::Add { act: act()? },
            "global_avgpool" => NodeKind::GlobalAvgPool,
            "avgpool" => NodeKind::AvgPool { win: win()? },
            "maxpool" => NodeKind::MaxPool { win: win()? },
            "flatten" => NodeKind::Flatten,
            other => {
                return Err(PyValueError::new_err(format!(
                    "node {:?}: op {other:?} is not supported by the engine",
                    self.name
                )))
            }
        })
    }

    fn params(&self) -> PyResult<Option<LayerParams>> {
        Ok(match (&self.weight, &self.bias, &self.weight_scale) {
            (Some(w), Some(b), Some(s)) => Some(LayerParams {
                weight: w.as_slice()?.to_vec(),
                bias: b.as_slice()?.to_vec(),
                weight_scale: s.as_slice()?.to_vec(),
            }),
            (None, None, None) => None,
            _ => {
                return Err(PyValueError::new_err(format!(
                    "node {:?}: weight, bias and weight_scale come together",
                    self.name
                )))
            }
        })
    }

    fn update(&self) -> PyResult<LayerUpdate> {
        Ok(LayerUpdate {
            bias: self.update.bias,
            weight_ratio: self.update.weight_ratio,
            axis: parse_name(&self.update.axis)?,
        })
    }
}

impl CompileRequest<'_> {
    fn graph(&self) -> PyResult<Graph> {
        let mut nodes = Vec::with_capacity(self.nodes.len());
        let mut params = Vec::with_capacity(self.nodes.len());
        for n in &self.nodes {
            nodes.push(Node {
                name: n.name.clone(),
                kind: n.kind()?,
                inputs: n.inputs.clone(),
                output: n.output,
            });
            params.push(n.params()?);
        }
        let tensors = self
            .tensors
            .iter()
            .map(|t| TensorInfo {
                c: t.c,
                h: t.h,
                w: t.w,
                scale: t.scale,
                zero_point: t.zero_point,
            })
            .collect();
        Ok(Graph {
            tensors,
            nodes,
            params,
            input: self.input,
            output: self.output,
            rounding: parse_name(&self.rounding)?,
        })
    }

    fn scheme(&self) -> PyResult<Scheme> {
        Ok(Scheme {
            layers: self
                .nodes
                .iter()
                .map(NodeRequest::update)
                .collect::<PyResult<_>>()?,
        })
    }

    fn settings(&self) -> PyResult<PlanSettings> {
        Ok(PlanSettings {
            options: CompileOptions {
                reorder: self.reorder,
                precision: parse_name(&self.update_precision)?,
                momentum: self.momentum_buffers,
                loss: parse_name(&self.loss)?,
                accumulate: self.accumulate,
            },
            seed: self.seed,
            lr: self.lr,
            momentum: self.momentum,
        })
    }

    fn objective(&self) -> PyResult<Objective> {
        match self.optimize.as_str() {
            "memory" => Ok(Objective::Memory),
            "compute" => Ok(Objective::Compute {
                budget: self.budget.unwrap_or(usize::MAX),
            }),
            other => Err(PyValueError::new_err(format!(
                "optimize must be \"memory\" or \"compute\", got {other:?}"
            ))),
        }
    }

    fn layout(&self) -> Option<Layout> {
        self.layout.as_ref().map(|l| Layout {
            patch: l.patch,
            in_place: l.in_place,
            shrink_in_place: l.shrink_in_place,
            out_of_place: [0; 4],
            stream_input: self.stream_input,
            fuse_blocks: false,
        })
    }
}

/// Compiles a quantized graph for training (`tinytrain._lowering.CompileRequest`). Returns
/// (plan bytes, parameter blob).
#[pyfunction]
fn engine_compile<'py>(
    py: Python<'py>,
    request: CompileRequest<'py>,
) -> PyResult<(Bound<'py, PyBytes>, Bound<'py, PyBytes>)> {
    let g = request.graph()?;
    let scheme = request.scheme()?;
    let settings = request.settings()?;
    let objective = request.objective()?;
    let fixed = request.layout();
    let (meta, stream_input) = (&request.meta, request.stream_input);
    let c = py
        .allow_threads(|| {
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
    d.set_item("params_len", v.params_len)?;
    d.set_item("n_layers", v.n_layers)?;
    d.set_item("meta", PyBytes::new(py, v.meta()))?;
    d.set_item("reorder", v.globals.reorder)?;
    d.set_item("precision", v.globals.precision.name())?;
    d.set_item("loss", v.globals.loss.name())?;
    d.set_item("momentum_buffers", v.globals.momentum_buffers)?;
    d.set_item("accumulate", v.globals.accumulate)?;
    d.set_item("rounding", v.globals.rounding.name())?;
    d.set_item("lr", v.globals.lr)?;
    d.set_item("momentum", v.globals.momentum)?;
    d.set_item("seed", v.globals.seed)?;
    let mut patch = None;
    let mut in_place = 0usize;
    let mut streamed = false;
    for o in &ops {
        if o.kind == OpKind::PatchStage {
            patch = Some(((o.arg & 0xFFFF) as usize, (o.arg >> 16) as usize));
            streamed = o.bufs[0] == tt_core::ir::NONE;
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

/// The targets of `Session.run_rows`: class labels (int64) or one float row per sample (MSE).
#[derive(FromPyObject)]
pub(crate) enum Targets<'py> {
    Classes(PyReadonlyArray1<'py, i64>),
    Values(PyReadonlyArray2<'py, f32>),
}

/// What `Session.run_rows` does with each row.
enum RowOp {
    Step,
    Accumulate,
}

impl FromStr for RowOp {
    type Err = PyErr;

    fn from_str(s: &str) -> PyResult<RowOp> {
        match s {
            "step" => Ok(RowOp::Step),
            "accumulate" => Ok(RowOp::Accumulate),
            _ => Err(PyValueError::new_err(format!(
                "op must be \"step\" or \"accumulate\", got {s:?}"
            ))),
        }
    }
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

    /// Trains on each row of `x` (int8, HWC flattened) with its target (a class label, or a
    /// float row for an MSE plan): `op` "step" runs one training step per row, "accumulate" (an
    /// accumulation plan) forward and backward with the gradients summed into the accumulators
    /// and no update. Returns the per-sample losses; a step refused because a gradient was not
    /// finite gives NaN and changes nothing after the layer where it was detected.
    fn run_rows<'py>(
        &mut self,
        py: Python<'py>,
        x: PyReadonlyArray2<'py, i8>,
        targets: Targets<'py>,
        op: &str,
    ) -> PyResult<Bound<'py, PyArray1<f32>>> {
        let op: RowOp = op.parse()?;
        let x = x.as_array();
        let n = match &targets {
            Targets::Classes(labels) => labels.len()?,
            Targets::Values(rows) => rows.as_array().nrows(),
        };
        if n != x.nrows() {
            return Err(PyValueError::new_err(format!(
                "one target per sample expected: {} samples, {n} targets",
                x.nrows()
            )));
        }
        let mut out = Vec::with_capacity(n);
        for (i, row) in x.outer_iter().enumerate() {
            let row: Vec<i8> = row.iter().copied().collect();
            let values: Vec<f32>;
            let target = match &targets {
                Targets::Classes(labels) => {
                    let y = labels.as_array()[i];
                    let y = usize::try_from(y)
                        .map_err(|_| PyValueError::new_err(format!("label {y} is negative")))?;
                    Target::Class(y)
                }
                Targets::Values(rows) => {
                    values = rows.as_array().row(i).to_vec();
                    Target::Values(&values)
                }
            };
            out.push(match op {
                RowOp::Step => self.corrected_step(py, &row, target)?,
                RowOp::Accumulate => self.with(py, |ex| ex.accumulate(&row, target))?,
            });
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

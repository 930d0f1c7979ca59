//! A model's rounding mode through the plan: the executor runs a TFLite-mode plan (version 3,
//! double rounding) exactly as the kernels chained by hand in that mode, a single-rounding plan
//! keeps the version-1 bytes older readers know, and records or flags that disagree with the
//! plan's mode are refused.
mod common;

use common::{graph, words, Lcg};
use tt_core::compile::{compile, PlanSettings};
use tt_core::crc::crc32;
use tt_core::exec::Executor;
use tt_core::graph::{Graph, NodeKind};
use tt_core::ir::CompileOptions;
use tt_core::ops::add::{add_forward, AddParams};
use tt_core::ops::conv::{conv2d_forward, Conv2dGeom};
use tt_core::ops::fc::{fc_forward, FcGeom};
use tt_core::ops::pool::global_avgpool_forward;
use tt_core::plan::{PlanView, FLAG_DOUBLE_ROUNDING, VERSION, VERSION_PLAIN, VERSION_ROUNDING};
use tt_core::quant::{activation_range, Activation, QParams, Requant, Rounding};
use tt_core::sparse::{LayerUpdate, Scheme};
use tt_core::Error;

fn compiled(rounding: Rounding, accumulate: bool) -> (Vec<u8>, Vec<u8>) {
    let mut layers = vec![LayerUpdate::default(); 7];
    layers[6] = LayerUpdate {
        bias: true,
        weight_ratio: 1.0,
        ..LayerUpdate::default()
    };
    let settings = PlanSettings {
        options: CompileOptions {
            accumulate,
            ..CompileOptions::default()
        },
        seed: 1,
        lr: 0.01,
        momentum: 0.0,
    };
    let c = compile(&graph(rounding), &Scheme { layers }, &settings, b"{}").unwrap();
    (c.plan, c.params)
}

fn run(plan: &[u8], params: &[u8], inputs: &[Vec<i8>]) -> Result<Vec<Vec<i8>>, Error> {
    let words = words(params);
    // SAFETY: u32 storage viewed as bytes (alignment 1, every pattern valid), within its length.
    let p = unsafe { core::slice::from_raw_parts(words.as_ptr() as *const u8, params.len()) };
    let mut arena = vec![0u32; PlanView::parse(plan)?.arena_bytes.div_ceil(4)];
    // SAFETY: as above, exclusively borrowed.
    let a =
        unsafe { core::slice::from_raw_parts_mut(arena.as_mut_ptr() as *mut u8, 4 * arena.len()) };
    let mut e = Executor::new(plan, p, a)?;
    e.init()?;
    inputs.iter().map(|x| Ok(e.forward(x)?.to_vec())).collect()
}

/// The graph's forward pass through the kernels directly, every requantization in `mode`.
fn by_hand(g: &Graph, mode: Rounding, x: &[i8]) -> Vec<i8> {
    let q = |i: usize| QParams::new(g.tensors[i].scale, g.tensors[i].zero_point).unwrap();
    let rq = |layer: usize, i: usize, o: usize| -> Vec<Requant> {
        let p = g.params[layer].as_ref().unwrap();
        let fc = matches!(g.nodes[layer].kind, NodeKind::Fc { .. });
        p.weight_scale
            .iter()
            .map(|&s| {
                let real = q(i).scale as f64 * s as f64 / q(o).scale as f64;
                Requant::from_scale(real)
                    .unwrap()
                    .with_rounding(mode.for_layer(fc))
            })
            .collect()
    };
    let conv = |layer: usize, x: &[i8], geom: Conv2dGeom, act: Activation| -> Vec<i8> {
        let (i, o) = (g.nodes[layer].inputs[0], g.nodes[layer].output);
        let p = g.params[layer].as_ref().unwrap();
        let (lo, hi) = activation_range(act, q(o));
        let mut y = vec![0i8; geom.output_len()];
        let r = rq(layer, i, o);
        let (xz, yz) = (q(i).zero_point, q(o).zero_point);
        conv2d_forward(&geom, x, xz, &p.weight, &p.bias, &r, yz, lo, hi, &mut y).unwrap();
        y
    };
    let c0 = Conv2dGeom::new(8, 8, 3, 8, 3, 3, 2, 2, 1, 1, 1, 1, 1).unwrap();
    let y1 = conv(0, x, c0, Activation::Relu6);
    let c1 = Conv2dGeom::new(4, 4, 8, 8, 3, 3, 1, 1, 1, 1, 1, 1, 8).unwrap();
    let y2 = conv(1, &y1, c1, Activation::Relu6);
    let c2 = Conv2dGeom::new(4, 4, 8, 8, 1, 1, 1, 1, 0, 0, 0, 0, 1).unwrap();
    let y3 = conv(2, &y2, c2, Activation::None);
    let mut y4 = vec![0i8; y3.len()];
    let add = AddParams::new(q(1), q(3), q(4), -128, 127, mode).unwrap();
    add_forward(&add, &y1, &y3, &mut y4).unwrap();
    let mut y5 = vec![0i8; 8];
    global_avgpool_forward(4, 4, 8, &y4, q(4), q(5), mode, &mut y5).unwrap();
    let p = g.params[6].as_ref().unwrap();
    let mut y7 = vec![0i8; 4];
    let r = rq(6, 6, 7);
    let fg = FcGeom::new(8, 4).unwrap();
    fc_forward(&fg, &y5, -7, &p.weight, &p.bias, &r, 2, -128, 127, &mut y7).unwrap();
    y7
}

fn inputs() -> Vec<Vec<i8>> {
    let mut r = Lcg(5);
    (0..64)
        .map(|_| (0..3 * 64).map(|_| r.i8(127)).collect())
        .collect()
}

/// Each layer's requantization records in the blob: (multiplier, shift, rounding) per channel.
fn records(plan: &[u8], params: &[u8]) -> Vec<(u8, Vec<Requant>)> {
    let pv = PlanView::parse(plan).unwrap();
    (0..pv.n_layers)
        .map(|li| {
            let l = pv.layer(li).unwrap();
            let n = pv.node(l.node as usize).unwrap();
            let oc = pv.tensor(n.output as usize).unwrap().c as usize;
            let rd = |at: usize, k: usize| params[at..at + k].to_vec();
            let recs = (0..oc)
                .map(|c| {
                    let at = l.requant_off as usize + 8 * c;
                    Requant {
                        multiplier: i32::from_le_bytes(rd(at, 4).try_into().unwrap()),
                        shift: i16::from_le_bytes(rd(at + 4, 2).try_into().unwrap()),
                        rounding: i16::from_le_bytes(rd(at + 6, 2).try_into().unwrap()),
                    }
                })
                .collect();
            (n.kind, recs)
        })
        .collect()
}

#[test]
fn executor_rounds_as_the_model_says() {
    let xs = inputs();
    let mut outs = vec![];
    for mode in [Rounding::Single, Rounding::Double] {
        let (plan, params) = compiled(mode, false);
        let got = run(&plan, &params, &xs).unwrap();
        let g = graph(mode);
        for (x, y) in xs.iter().zip(&got) {
            assert_eq!(*y, by_hand(&g, mode, x), "{mode:?}");
        }
        outs.push(got);
    }
    // On this graph the modes give different logits for some inputs: the mode is really used.
    assert_ne!(outs[0], outs[1]);
}

#[test]
fn plan_header_and_records_carry_the_mode() {
    let (plan, params) = compiled(Rounding::Single, false);
    assert_eq!(u16::from_le_bytes([plan[4], plan[5]]), VERSION_PLAIN);
    assert_eq!(
        PlanView::parse(&plan).unwrap().globals.rounding,
        Rounding::Single
    );
    for (_, recs) in records(&plan, &params) {
        // what a reader of the (multiplier i32, shift i32) blob expects
        assert!(recs.iter().all(|r| r.is_valid(Rounding::Single)));
    }
    for accumulate in [false, true] {
        let (plan, params) = compiled(Rounding::Double, accumulate);
        assert_eq!(u16::from_le_bytes([plan[4], plan[5]]), VERSION_ROUNDING);
        let flags = u32::from_le_bytes(plan[36..40].try_into().unwrap());
        assert_eq!(flags & FLAG_DOUBLE_ROUNDING, FLAG_DOUBLE_ROUNDING);
        let pv = PlanView::parse(&plan).unwrap();
        assert_eq!(
            (pv.globals.rounding, pv.globals.accumulate),
            (Rounding::Double, accumulate)
        );
        for (kind, recs) in records(&plan, &params) {
            let want = Rounding::Double.for_layer(kind == tt_core::plan::NODE_FC);
            assert!(recs.iter().all(|r| r.is_valid(want) && r.mode() == want));
        }
    }
}

#[test]
fn records_or_flags_that_disagree_with_the_mode_are_refused() {
    let xs = &inputs()[..1];
    let (plan, params) = compiled(Rounding::Double, false);
    run(&plan, &params, xs).unwrap();
    // A conv record switched to single rounding (blob CRC fixed up): the blob is not this plan's.
    let first = PlanView::parse(&plan)
        .unwrap()
        .layer(0)
        .unwrap()
        .requant_off as usize;
    let mut p2 = params.clone();
    p2[first + 6..first + 8].copy_from_slice(&0i16.to_le_bytes());
    let mut plan2 = plan.clone();
    plan2[20..24].copy_from_slice(&crc32(&p2).to_le_bytes());
    match run(&plan2, &p2, xs) {
        Err(Error::CorruptPlan { field }) => assert!(field.contains("rounding"), "{field}"),
        other => panic!("{other:?}"),
    }
    // The header without the flag: version 3 means double rounding, so it is malformed...
    let mut plan3 = plan.clone();
    plan3[36..40].copy_from_slice(&0u32.to_le_bytes());
    assert!(matches!(
        PlanView::parse(&plan3),
        Err(Error::CorruptPlan { field: "flags" })
    ));
    // ...and a version 2 header (what an older writer knows) cannot carry it.
    let mut plan4 = plan.clone();
    plan4[4..6].copy_from_slice(&VERSION.to_le_bytes());
    assert!(matches!(
        PlanView::parse(&plan4),
        Err(Error::CorruptPlan { field: "flags" })
    ));
    // A single-rounding plan run on a double-rounding blob (CRC fixed up) is refused too.
    let (single, sparams) = compiled(Rounding::Single, false);
    assert_eq!(sparams.len(), params.len());
    let mut single2 = single.clone();
    single2[20..24].copy_from_slice(&crc32(&params).to_le_bytes());
    assert!(matches!(
        run(&single2, &params, xs),
        Err(Error::CorruptPlan { .. })
    ));
}

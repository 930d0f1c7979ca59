//! The plan loader the MCU uses (`PlanView::parse`, no allocation) and the executor on what it
//! accepts: construction (arena claims checked against the arena given), `init`, a training
//! step and a prediction (a forward pass), for plans up to `MAX_MACS` of forward work.
//! Input: a `.ttp` image (plan, then parameter blob).
#![no_main]
use libfuzzer_sys::fuzz_target;
use tt_core::exec::{Executor, Target};
use tt_core::plan::PlanView;

mod common;
use common::*;

fn exercise(plan: &[u8], params: &[u8]) {
    let Ok(pv) = PlanView::parse(plan) else {
        return;
    };
    // Every record the view exposes must read back as Ok or Err, never panic.
    for i in 0..pv.n_tensors.min(64) {
        let _ = pv.tensor(i);
    }
    for i in 0..pv.n_layers.min(64) {
        let _ = pv.layer(i);
    }
    let arena_len = pv.arena_bytes.min(MAX_ARENA);
    let params_w = words(params);
    let params = &as_bytes(&params_w)[..params.len()];
    let mut arena = vec![0u32; arena_len.div_ceil(4)];
    let Ok(mut ex) = Executor::new(plan, params, &mut as_bytes_mut(&mut arena)[..arena_len]) else {
        return;
    };
    if ex.init().is_err() || forward_macs(&pv) > MAX_MACS {
        return;
    }
    let n = match pv.tensor(pv.globals.input as usize) {
        Ok(t) => t.numel().min(MAX_ARENA),
        Err(_) => return,
    };
    let x: Vec<i8> = (0..n).map(|i| (i as i8).wrapping_mul(37)).collect();
    let _ = ex.step(&x, Target::Class(1));
    // `predict` runs `forward`.
    let _ = ex.predict(&x);
    assert!(ex.high_water() <= arena_len);
}

fuzz_target!(|data: &[u8]| {
    let (plan, params) = split(data);
    exercise(plan, params);
    match with_crcs(plan, params) {
        Some(fixed) if fixed != plan => exercise(&fixed, params),
        _ => {}
    }
});

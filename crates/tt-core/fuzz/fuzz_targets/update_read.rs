//! The update blob reader (`tt_core::update`, what a device and the host run on a blob from the
//! network) against the demo plan: `read` and `apply` must return Ok or a typed error, never
//! panic; a failed `apply` leaves the learned state untouched, and a blob `read` accepts is
//! written back byte for byte from the state it was applied to.
//! Input: blob bytes (checked as given, then with the trailing CRC made valid so mutations reach
//! the section checks).
#![no_main]
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use tt_core::crc::crc32;
use tt_core::plan::PlanView;
use tt_core::update;
use tt_mcu::bundle::Bundle;

fn plan() -> &'static [u8] {
    static PLAN: OnceLock<Vec<u8>> = OnceLock::new();
    PLAN.get_or_init(|| Bundle::demo().plan)
}

fn exercise(pv: &PlanView<'_>, blob: &[u8]) {
    let mut state = vec![0x5Au8; pv.state_bytes];
    let before = state.clone();
    let Ok(v) = update::read(pv, blob) else {
        assert!(update::apply(pv, blob, &mut state).is_err());
        assert_eq!(state, before);
        return;
    };
    let mut n = 0;
    v.for_each(pv, |s, values| {
        assert_eq!(values.len(), s.bytes());
        n += 1;
        Ok(())
    })
    .expect("a blob read accepted walks again");
    assert_eq!(n, v.n_sections);
    assert_eq!(update::apply(pv, blob, &mut state), Ok(v.sample_count));
    let mut out = vec![0u8; blob.len()];
    assert_eq!(
        update::write(pv, &state, v.sample_count, &mut out),
        Ok(blob.len())
    );
    assert_eq!(out, blob);
}

fuzz_target!(|data: &[u8]| {
    let pv = PlanView::parse(plan()).expect("the demo plan parses");
    exercise(&pv, data);
    if data.len() >= 4 {
        let mut fixed = data.to_vec();
        let end = fixed.len() - 4;
        let crc = crc32(&fixed[..end]);
        fixed[end..].copy_from_slice(&crc.to_le_bytes());
        if fixed != data {
            exercise(&pv, &fixed);
        }
    }
});

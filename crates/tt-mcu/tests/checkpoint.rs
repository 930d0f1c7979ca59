//! The A/B checkpoint against a simulated NOR flash that loses power at every step.
use embedded_storage::nor_flash::NorFlash;
use tt_mcu::checkpoint::{CheckpointError, Checkpoints};

#[path = "common/flash.rs"]
mod flash;
use flash::{SimError, SimFlash, Torn};

fn params(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

fn load<F: NorFlash>(f: F, tag: u32, len: usize) -> (Option<(u32, Vec<u8>)>, F) {
    let mut c = Checkpoints::new(f, 0, SLOT, tag).unwrap();
    let mut out = vec![0xEEu8; len];
    let seq = c.load(&mut [&mut out[..]]).unwrap();
    let f = c.into_inner();
    (seq.map(|s| (s, out)), f)
}

fn save<F: NorFlash>(f: F, tag: u32, p: &[u8]) -> (Result<u32, CheckpointError<F::Error>>, F) {
    let mut c = Checkpoints::new(f, 0, SLOT, tag).unwrap();
    let r = c.save(&[p]);
    (r, c.into_inner())
}

const SLOT: u32 = 2048;
const TAG: u32 = 0x7A6_0001;

/// For a flash geometry: start from 0, 1 and 2 earlier checkpoints, cut power at every step of
/// the next one with every kind of tear, reboot, and require exactly the old or the new
/// parameters — the old ones whenever the cut came before the commit record's word.
fn power_cut_everywhere<const W: usize, const R: usize, const E: usize>(len: usize) {
    let tears = [
        Torn::Untouched,
        Torn::Half,
        Torn::Random(0x9E37_79B9_7F4A_7C15),
        Torn::Random(0xDEAD_BEEF),
    ];
    for history in 0..3u8 {
        let mut flash = SimFlash::<W, R, E>::new(4 * SLOT as usize);
        let mut old: Option<(u32, Vec<u8>)> = None;
        for h in 0..history {
            let p = params(h, len);
            let (seq, f) = save(flash, TAG, &p);
            flash = f.reboot();
            old = Some((seq.unwrap(), p));
        }
        let new = params(100 + history, len);

        let (r, done) = save(flash.reboot(), TAG, &new);
        let new_seq = r.unwrap();
        let total = done.steps;
        // The commit record is the last word programmed before the verifying reads.
        let commit_step = total - 1;
        assert!(
            total > 3,
            "a checkpoint takes erase + header + payload + commit steps"
        );

        for step in 0..total {
            for torn in tears {
                let (r, cut) = save(flash.with_cut(step, torn), TAG, &new);
                assert!(
                    matches!(r, Err(CheckpointError::Flash(SimError::PowerLost))),
                    "step {step}: {r:?}"
                );
                let (got, after) = load(cut.reboot(), TAG, len);
                let is_old = got == old;
                let is_new = got.as_ref() == Some(&(new_seq, new.clone()));
                assert!(
                    is_old || is_new,
                    "W{W} E{E} history {history} step {step}/{total} {torn:?}: neither old nor new"
                );
                if step < commit_step {
                    assert!(is_old, "step {step} < commit {commit_step}: must be old");
                }
                // The device keeps working after the cut: the next checkpoint lands and wins.
                let next = params(200, len);
                let (r, f) = save(after.reboot(), TAG, &next);
                let seq = r.unwrap();
                let (got, _) = load(f.reboot(), TAG, len);
                assert_eq!(got, Some((seq, next)), "after recovery at step {step}");
            }
        }
    }
}

#[test]
fn power_cut_at_every_step_word_flash() {
    // STM32F7-like: word programming, byte reads; payload spans several chunks and sectors.
    power_cut_everywhere::<4, 1, 512>(700);
}

#[test]
fn power_cut_at_every_step_byte_and_wide_flash() {
    power_cut_everywhere::<1, 1, 1024>(100);
    // STM32H7-like 32-byte flash words, aligned reads.
    power_cut_everywhere::<32, 4, 256>(300);
    power_cut_everywhere::<8, 8, 2048>(0);
}

#[test]
fn every_single_bit_flip_in_the_newest_slot_falls_back_to_the_older() {
    let len = 90;
    let mut flash = SimFlash::<4, 1, 512>::new(2 * SLOT as usize);
    let (a, f) = save(flash, TAG, &params(1, len));
    let (b, f) = save(f.reboot(), TAG, &params(2, len));
    flash = f.reboot();
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_eq!(b, a + 1);
    let newest = SLOT as usize; // the second checkpoint went to slot 1
    let used = 2 * 32 + len;
    for bit in 0..used * 8 {
        let mut f = flash.reboot();
        f.mem[newest + bit / 8] ^= 1 << (bit % 8);
        let (got, _) = load(f, TAG, len);
        assert_eq!(got, Some((a, params(1, len))), "flip of bit {bit}");
        // A flip in the older slot does not disturb the newest.
        let mut f = flash.reboot();
        f.mem[bit / 8] ^= 1 << (bit % 8);
        let (got, _) = load(f, TAG, len);
        assert_eq!(
            got,
            Some((b, params(2, len))),
            "flip of bit {bit} in the old slot"
        );
    }
    // Both slots damaged: nothing valid, and the caller's buffer is left as it was.
    let mut f = flash.reboot();
    f.mem[newest + 40] ^= 1;
    f.mem[40] ^= 1;
    let mut c = Checkpoints::new(f, 0, SLOT, TAG).unwrap();
    let mut out = vec![7u8; len];
    assert_eq!(c.load(&mut [&mut out[..]]).unwrap(), None);
    assert!(out.iter().all(|&x| x == 7));
}

#[test]
fn other_tag_or_length_is_not_loaded_and_gathered_parts_round_trip() {
    let flash = SimFlash::<4, 1, 512>::new(2 * SLOT as usize);
    let w = params(3, 37);
    let b = params(4, 20);
    let mut c = Checkpoints::new(flash, 0, SLOT, TAG).unwrap();
    let seq = c.save(&[&w, &[], &b]).unwrap();
    let (mut w2, mut b2) = (vec![0u8; 37], vec![0u8; 20]);
    assert_eq!(c.load(&mut [&mut w2, &mut [], &mut b2]).unwrap(), Some(seq));
    assert_eq!((w2, b2), (w, b));
    // Same bytes split differently still load: the payload is the concatenation.
    let mut all = vec![0u8; 57];
    assert_eq!(c.load(&mut [&mut all]).unwrap(), Some(seq));
    let mut short = vec![0u8; 56];
    assert_eq!(c.load(&mut [&mut short]).unwrap(), None);
    let f = c.into_inner();
    let (got, _) = load(f, TAG + 1, 57);
    assert_eq!(got, None);
}

#[test]
fn sequence_numbers_wrap_in_serial_order() {
    let mut flash = SimFlash::<4, 1, 512>::new(2 * SLOT as usize);
    let mut last = 0;
    for i in 0..5u8 {
        let (r, f) = save(flash, TAG, &params(i, 16));
        last = r.unwrap();
        flash = f.reboot();
    }
    assert_eq!(last, 5);
    // Age both slots to the end of the sequence space (as a long-lived device would reach it):
    // u32::MAX - 1 and u32::MAX, then the next save must follow with 0 and win.
    let mut c = Checkpoints::new(flash, 0, SLOT, TAG).unwrap();
    let mut out = [0u8; 16];
    assert_eq!(c.load(&mut [&mut out]).unwrap(), Some(5));
    let mut f = c.into_inner();
    let s = SLOT as usize;
    forge_seq(&mut f.mem[s..s + 64], u32::MAX - 1);
    forge_seq(&mut f.mem[0..64], u32::MAX);
    let mut c = Checkpoints::new(f, 0, SLOT, TAG).unwrap();
    assert_eq!(c.load(&mut [&mut out]).unwrap(), Some(u32::MAX));
    assert_eq!(c.save(&[&params(9, 16)]).unwrap(), 0);
    assert_eq!(c.load(&mut [&mut out]).unwrap(), Some(0));
    assert_eq!(out.to_vec(), params(9, 16));
}

/// Rewrites a slot's sequence number, keeping its CRCs and commit record valid.
fn forge_seq(slot: &mut [u8], seq: u32) {
    slot[8..12].copy_from_slice(&seq.to_le_bytes());
    let crc = tt_core::crc::crc32(&slot[..28]);
    slot[28..32].copy_from_slice(&crc.to_le_bytes());
    slot[36..40].copy_from_slice(&(!crc).to_le_bytes());
}

fn bad<F: NorFlash>(r: Result<Checkpoints<F>, CheckpointError<F::Error>>) -> bool {
    matches!(r, Err(CheckpointError::BadLayout { .. }))
}

#[test]
fn bad_layouts_and_oversized_parameters_are_errors() {
    let f = || SimFlash::<4, 1, 512>::new(4096);
    assert!(bad(Checkpoints::new(f(), 100, 1024, 0)));
    assert!(bad(Checkpoints::new(f(), 0, 1000, 0)));
    assert!(bad(Checkpoints::new(f(), 0, 0, 0)));
    assert!(bad(Checkpoints::new(f(), 2048, 2048, 0)));
    assert!(bad(Checkpoints::with_sector_size(f(), 0, 1024, 0, 300)));
    assert!(bad(Checkpoints::new(
        SimFlash::<512, 1, 512>::new(4096),
        0,
        1024,
        0
    )));
    let mut c = Checkpoints::new(f(), 0, 1024, 0).unwrap();
    assert_eq!(c.max_len(), 1024 - 64);
    let big = vec![0u8; 1024 - 63];
    assert_eq!(
        c.save(&[&big]),
        Err(CheckpointError::TooLarge { len: 961, max: 960 })
    );
    assert_eq!(c.save(&[&big[..960]]), Ok(1));
}

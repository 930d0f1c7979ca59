//! The C ABI called as C would call it, and the hand-kept header checked against it.
extern crate std;

use std::collections::BTreeMap;
use std::string::String;
use std::vec::Vec;
use std::{format, vec};

use super::*;
use tt_mcu::bundle::Bundle;

const HEADER: &str = include_str!("../../../../include/tinytrain.h");
const SOURCE: &str = include_str!("lib.rs");

fn header_defines() -> BTreeMap<String, i64> {
    HEADER
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            (f.next() == Some("#define")).then_some(())?;
            let name = f.next()?;
            let value = f.next()?.parse().ok()?;
            Some((name.into(), value))
        })
        .collect()
}

/// Names `tt_xxx` directly followed by `(` on code lines (not comments, not preprocessor) after
/// `marker`: the header's declarations, or this crate's `extern "C" fn` definitions.
fn functions(text: &str, marker: &str) -> Vec<String> {
    let mut v: Vec<String> = text
        .lines()
        .map(str::trim_start)
        .filter(|l| !(l.starts_with("/*") || l.starts_with('*') || l.starts_with('#')))
        .flat_map(|l| {
            l.match_indices(marker)
                .map(move |(i, _)| &l[i + marker.len()..])
        })
        .filter_map(|rest| {
            let rest = rest.trim_start_matches('*');
            let name: String = rest
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            (rest[name.len()..].starts_with('(') && name.starts_with("tt_")).then_some(name)
        })
        .collect();
    v.sort();
    v.dedup();
    v
}

#[test]
fn header_matches_the_library() {
    let d = header_defines();
    let want = [
        ("TT_OK", TT_OK),
        ("TT_NO_CHECKPOINT", TT_NO_CHECKPOINT),
        ("TT_ERR_NULL", TT_ERR_NULL),
        ("TT_ERR_SIZE", TT_ERR_SIZE),
        ("TT_ERR_ALIGN", TT_ERR_ALIGN),
        ("TT_ERR_OUT_OF_MEMORY", TT_ERR_OUT_OF_MEMORY),
        ("TT_ERR_CORRUPT_PLAN", TT_ERR_CORRUPT_PLAN),
        ("TT_ERR_INVALID", TT_ERR_INVALID),
        ("TT_ERR_NOT_REPRESENTABLE", TT_ERR_NOT_REPRESENTABLE),
        ("TT_ERR_NON_FINITE", TT_ERR_NON_FINITE),
        ("TT_ERR_FLASH", TT_ERR_FLASH),
        ("TT_ERR_LAYOUT", TT_ERR_LAYOUT),
        ("TT_ERR_TOO_LARGE", TT_ERR_TOO_LARGE),
        ("TT_ERR_VERIFY", TT_ERR_VERIFY),
        ("TT_ERR_CORRUPT_UPDATE", TT_ERR_CORRUPT_UPDATE),
        ("TT_ERR_UPDATE_PLAN", TT_ERR_UPDATE_PLAN),
    ];
    for (name, v) in want {
        assert_eq!(d.get(name), Some(&(v as i64)), "{name}");
    }
    assert_eq!(
        d.len(),
        want.len() + 1,
        "header defines something the library does not"
    );
    assert_eq!(d["TT_TRAINER_WORDS"], TRAINER_WORDS as i64);
    assert!(HEADER.contains(&format!("uint64_t opaque[{TRAINER_WORDS}];")));
    let declared = functions(HEADER, " ");
    let defined = functions(SOURCE, "extern \"C\" fn ");
    assert_eq!(declared, defined);
    assert_eq!(defined.len(), 16);
    for (rust, c) in [
        ("pub ctx: *mut c_void", "void *ctx;"),
        ("pub capacity: u32", "uint32_t capacity;"),
        ("pub write_size: u32", "uint32_t write_size;"),
        ("pub erase_size: u32", "uint32_t erase_size;"),
    ] {
        assert!(SOURCE.contains(rust) && HEADER.contains(c), "{rust} / {c}");
    }
}

/// NOR flash behind the C callbacks: erase to 0xFF, program only erased bytes.
struct Nor {
    mem: Vec<u8>,
    fail_writes_after: Option<usize>,
    writes: usize,
}

unsafe extern "C" fn nor_read(ctx: *mut c_void, off: u32, buf: *mut u8, len: u32) -> i32 {
    let n = unsafe { &mut *(ctx as *mut Nor) };
    let src = &n.mem[off as usize..(off + len) as usize];
    unsafe { core::ptr::copy_nonoverlapping(src.as_ptr(), buf, len as usize) };
    0
}

unsafe extern "C" fn nor_write(ctx: *mut c_void, off: u32, buf: *const u8, len: u32) -> i32 {
    let n = unsafe { &mut *(ctx as *mut Nor) };
    if n.fail_writes_after == Some(n.writes) {
        return 5;
    }
    n.writes += 1;
    let src = unsafe { core::slice::from_raw_parts(buf, len as usize) };
    let dst = &mut n.mem[off as usize..(off + len) as usize];
    if !off.is_multiple_of(32) || !len.is_multiple_of(32) || dst.iter().any(|&b| b != 0xFF) {
        return 7;
    }
    dst.copy_from_slice(src);
    0
}

unsafe extern "C" fn nor_erase(ctx: *mut c_void, from: u32, to: u32) -> i32 {
    let n = unsafe { &mut *(ctx as *mut Nor) };
    if !from.is_multiple_of(4096) || !to.is_multiple_of(4096) {
        return 9;
    }
    n.mem[from as usize..to as usize].fill(0xFF);
    0
}

fn flash(n: &mut Nor) -> TtFlash {
    TtFlash {
        ctx: n as *mut Nor as *mut c_void,
        capacity: n.mem.len() as u32,
        write_size: 4,
        erase_size: 4096,
        read: Some(nor_read),
        write: Some(nor_write),
        erase: Some(nor_erase),
    }
}

fn aligned(b: &[u8]) -> Vec<u32> {
    let mut v = vec![0u32; b.len().div_ceil(4)];
    for (i, &x) in b.iter().enumerate() {
        v[i / 4] |= (x as u32) << (8 * (i % 4));
    }
    v
}

#[test]
fn train_predict_checkpoint_through_the_c_abi() {
    let b = Bundle::demo();
    let run = b.run(2).unwrap();
    let params = aligned(&b.params);
    let pp = params.as_ptr() as *const u8;
    let mut need = 0usize;
    assert_eq!(
        unsafe { tt_arena_bytes(b.plan.as_ptr(), b.plan.len(), &mut need) },
        TT_OK
    );
    assert_eq!(need, b.arena_bytes().unwrap());
    let mut arena = vec![0u32; need.div_ceil(4)];
    let ap = arena.as_mut_ptr() as *mut u8;
    let mut t = TtTrainer {
        opaque: [0; TRAINER_WORDS],
    };
    let mut n = 0usize;
    assert_eq!(
        unsafe { tt_input_len(&t, &mut n) },
        TT_ERR_INVALID,
        "uninitialized storage"
    );
    let init = |t: &mut TtTrainer, arena_len| unsafe {
        tt_init(
            t,
            b.plan.as_ptr(),
            b.plan.len(),
            pp,
            b.params.len(),
            ap,
            arena_len,
        )
    };
    assert_eq!(init(&mut t, need - 4), TT_ERR_OUT_OF_MEMORY);
    assert_eq!(init(&mut t, need), TT_OK);
    assert_eq!(unsafe { tt_input_len(&t, &mut n) }, TT_OK);
    assert_eq!(n, b.input_len().unwrap());

    let mut losses = Vec::new();
    for _ in 0..2 {
        for (x, &y) in b.train_x.chunks_exact(n).zip(&b.train_y) {
            let mut loss = 0.0f32;
            assert_eq!(
                unsafe { tt_step(&mut t, x.as_ptr(), n, y as u32, &mut loss) },
                TT_OK
            );
            losses.push(loss.to_bits());
        }
    }
    let host: Vec<u32> = run.losses.iter().map(|l| l.to_bits()).collect();
    assert_eq!(losses, host, "the C ABI runs the same executor");
    let predict = |t: &mut TtTrainer| -> Vec<u32> {
        b.test_x
            .chunks_exact(n)
            .map(|x| {
                let mut c = u32::MAX;
                assert_eq!(unsafe { tt_predict(t, x.as_ptr(), n, &mut c) }, TT_OK);
                c
            })
            .collect()
    };
    let trained = predict(&mut t);
    let correct = trained
        .iter()
        .zip(&b.test_y)
        .filter(|(p, y)| **p == **y as u32)
        .count();
    assert_eq!(correct, run.correct_after);

    let mut nor = Nor {
        mem: vec![0xFF; 4 * 4096],
        fail_writes_after: None,
        writes: 0,
    };
    let f = flash(&mut nor);
    let mut seq = 0u32;
    assert_eq!(
        unsafe { tt_restore(&mut t, &f, 0, 8192, &mut seq) },
        TT_NO_CHECKPOINT
    );
    assert_eq!(unsafe { tt_save(&t, &f, 0, 8192, &mut seq) }, TT_OK);
    assert_eq!(seq, 1);

    // Back to the exported weights (as after a reset), then the checkpoint brings training back.
    assert_eq!(init(&mut t, need), TT_OK);
    assert_ne!(predict(&mut t), trained);
    let mut got = 0u32;
    assert_eq!(unsafe { tt_restore(&mut t, &f, 0, 8192, &mut got) }, TT_OK);
    assert_eq!(got, 1);
    assert_eq!(predict(&mut t), trained);

    // A non-finite learning rate refuses the step: counted, the learned state unchanged.
    let mut skipped = u32::MAX;
    assert_eq!(unsafe { tt_skipped_steps(&t, &mut skipped) }, TT_OK);
    assert_eq!(skipped, 0);
    let tr = unsafe { trainer(&mut t) }.unwrap();
    let before = tr.state().to_vec();
    let lr = tr.executor().lr;
    tr.executor().lr = f32::INFINITY;
    let mut loss = 0.0f32;
    let y0 = b.train_y[0] as u32;
    assert_eq!(
        unsafe { tt_step(&mut t, b.train_x.as_ptr(), n, y0, &mut loss) },
        TT_ERR_NON_FINITE
    );
    assert_eq!(unsafe { tt_skipped_steps(&t, &mut skipped) }, TT_OK);
    assert_eq!(skipped, 1);
    let tr = unsafe { trainer(&mut t) }.unwrap();
    assert_eq!(tr.state(), &before[..]);
    tr.executor().lr = lr;
    assert_eq!(
        unsafe { tt_skipped_steps(&t, ptr::null_mut()) },
        TT_ERR_NULL
    );

    // The rate is read and set at run time; a bad one is refused and changes nothing.
    let mut rate = -1.0f32;
    assert_eq!(unsafe { tt_lr(&t, &mut rate) }, TT_OK);
    assert_eq!(rate, lr);
    assert_eq!(unsafe { tt_set_lr(&mut t, f32::NAN) }, TT_ERR_NON_FINITE);
    assert_eq!(unsafe { tt_set_lr(&mut t, -1.0) }, TT_ERR_INVALID);
    assert_eq!(unsafe { tt_lr(&t, &mut rate) }, TT_OK);
    assert_eq!(rate, lr);
    assert_eq!(unsafe { tt_set_lr(&mut t, lr / 2.0) }, TT_OK);
    assert_eq!(unsafe { tt_lr(&t, &mut rate) }, TT_OK);
    assert_eq!(rate, lr / 2.0);
    assert_eq!(unsafe { tt_set_lr(&mut t, lr) }, TT_OK);
    assert_eq!(unsafe { tt_lr(&t, ptr::null_mut()) }, TT_ERR_NULL);
    assert_eq!(unsafe { tt_set_lr(ptr::null_mut(), lr) }, TT_ERR_NULL);

    // Wrong sizes and NULLs are refused before anything is read.
    let x = &b.test_x[..n];
    let mut c = 0u32;
    let mut loss = 0.0f32;
    assert_eq!(
        unsafe { tt_predict(&mut t, x.as_ptr(), n - 1, &mut c) },
        TT_ERR_SIZE
    );
    assert_eq!(
        unsafe { tt_predict(&mut t, ptr::null(), n, &mut c) },
        TT_ERR_NULL
    );
    assert_eq!(
        unsafe { tt_predict(&mut t, x.as_ptr(), n, ptr::null_mut()) },
        TT_ERR_NULL
    );
    assert_eq!(
        unsafe { tt_step(ptr::null_mut(), x.as_ptr(), n, 0, &mut loss) },
        TT_ERR_NULL
    );
    assert_eq!(
        unsafe { tt_step(&mut t, x.as_ptr(), n, 0, ptr::null_mut()) },
        TT_ERR_NULL
    );
    let misaligned = unsafe { (&mut t as *mut TtTrainer as *mut u8).add(4) } as *mut TtTrainer;
    assert_eq!(
        unsafe { tt_step(misaligned, x.as_ptr(), n, 0, &mut loss) },
        TT_ERR_ALIGN
    );
    assert_eq!(
        unsafe {
            tt_init(
                &mut t,
                b.plan.as_ptr(),
                b.plan.len(),
                pp.add(1),
                b.params.len(),
                ap,
                need,
            )
        },
        TT_ERR_ALIGN
    );
    assert_eq!(
        unsafe {
            tt_init(
                &mut t,
                b.plan.as_ptr(),
                b.plan.len(),
                pp,
                b.params.len() - 4,
                ap,
                need,
            )
        },
        TT_ERR_CORRUPT_PLAN
    );
    let mut bad_plan = b.plan.clone();
    bad_plan[60] ^= 0x10;
    assert_eq!(
        unsafe {
            tt_init(
                &mut t,
                bad_plan.as_ptr(),
                bad_plan.len(),
                pp,
                b.params.len(),
                ap,
                need,
            )
        },
        TT_ERR_CORRUPT_PLAN
    );
    assert_eq!(
        unsafe { tt_arena_bytes(b.plan.as_ptr(), 7, &mut need) },
        TT_ERR_CORRUPT_PLAN
    );
}

#[test]
fn raw_checkpoints_flash_errors_and_geometry() {
    let mut nor = Nor {
        mem: vec![0xFF; 4 * 4096],
        fail_writes_after: None,
        writes: 0,
    };
    let data: Vec<u8> = (0..1000u32).map(|i| (i * 13) as u8).collect();
    let mut seq = 0u32;
    let f = flash(&mut nor);
    let save = |f: &TtFlash, d: &[u8], seq: &mut u32| unsafe {
        tt_checkpoint_save(f, 0, 8192, 42, d.as_ptr(), d.len(), seq)
    };
    assert_eq!(save(&f, &data, &mut seq), TT_OK);
    let mut back = vec![0u8; 1000];
    let load = |f: &TtFlash, back: &mut [u8], tag, seq: &mut u32| unsafe {
        tt_checkpoint_load(f, 0, 8192, tag, back.as_mut_ptr(), back.len(), seq)
    };
    assert_eq!(load(&f, &mut back, 42, &mut seq), TT_OK);
    assert_eq!((back.as_slice(), seq), (data.as_slice(), 1));
    assert_eq!(load(&f, &mut back, 43, &mut seq), TT_NO_CHECKPOINT);

    // A write failing half way (power loss, worn flash): the error is reported and the
    // previous checkpoint is what loads.
    let newer: Vec<u8> = data.iter().map(|b| b ^ 0xA5).collect();
    nor.fail_writes_after = Some(nor.writes + 2);
    let f = flash(&mut nor);
    assert_eq!(save(&f, &newer, &mut seq), TT_ERR_FLASH);
    assert_eq!(load(&f, &mut back, 42, &mut seq), TT_OK);
    assert_eq!((back.as_slice(), seq), (data.as_slice(), 1));
    nor.fail_writes_after = None;
    let f = flash(&mut nor);
    assert_eq!(save(&f, &newer, &mut seq), TT_OK);
    assert_eq!(seq, 2);
    assert_eq!(load(&f, &mut back, 42, &mut seq), TT_OK);
    assert_eq!(back, newer);

    let big = vec![0u8; 8192];
    assert_eq!(save(&f, &big, &mut seq), TT_ERR_TOO_LARGE);
    assert_eq!(
        unsafe { tt_checkpoint_save(&f, 0, 8192, 42, ptr::null(), 10, &mut seq) },
        TT_ERR_NULL
    );
    assert_eq!(
        unsafe { tt_checkpoint_save(ptr::null(), 0, 8192, 42, data.as_ptr(), 10, &mut seq) },
        TT_ERR_NULL
    );
    assert_eq!(
        unsafe { tt_checkpoint_save(&f, 0, 8192, 42, data.as_ptr(), 10, ptr::null_mut()) },
        TT_ERR_NULL
    );
    assert_eq!(
        unsafe { tt_checkpoint_save(&f, 0, 5000, 42, data.as_ptr(), 10, &mut seq) },
        TT_ERR_LAYOUT
    );
    assert_eq!(
        unsafe { tt_checkpoint_save(&f, 0, 16384, 42, data.as_ptr(), 10, &mut seq) },
        TT_ERR_LAYOUT
    );
    for (w, e) in [(3, 4096), (64, 4096), (0, 4096), (4, 100), (4, 0)] {
        let mut g = flash(&mut nor);
        g.write_size = w;
        g.erase_size = e;
        assert_eq!(
            save(&g, &data, &mut seq),
            TT_ERR_LAYOUT,
            "write {w} erase {e}"
        );
    }
    let mut g = flash(&mut nor);
    g.erase = None;
    assert_eq!(save(&g, &data, &mut seq), TT_ERR_NULL);
    for code in -12..=1 {
        let s = unsafe { core::ffi::CStr::from_ptr(tt_status_str(code)) };
        assert!(
            !s.to_bytes().is_empty() && s.to_bytes() != b"unknown status",
            "{code}"
        );
    }
}

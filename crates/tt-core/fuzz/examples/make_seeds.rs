//! Seed corpora from real files: the demo bundle's plan + parameter blob (as a `.ttp` image), any
//! `.ttp` given on the command line (e.g. from `tinytrain compile`), and flash images holding
//! real checkpoints of the demo state. Usage: make_seeds OUT_DIR [plan.ttp ...]
use std::path::PathBuf;

use tt_mcu::bundle::Bundle;
use tt_mcu::checkpoint::Checkpoints;

#[path = "../fuzz_targets/ram_flash.rs"]
mod ram_flash;
use ram_flash::Ram;

fn main() -> std::io::Result<()> {
    let mut args = std::env::args().skip(1);
    let out = PathBuf::from(
        args.next()
            .expect("usage: make_seeds OUT_DIR [plan.ttp ...]"),
    );
    let b = Bundle::demo();
    let ttp = [b.plan.clone(), b.params.clone()].concat();
    let mut ttps = vec![("demo".to_string(), ttp)];
    for (i, p) in args.enumerate() {
        ttps.push((format!("file{i}"), std::fs::read(&p)?));
    }
    for t in ["plan_load", "ffi", "checkpoint_read", "update_read"] {
        std::fs::create_dir_all(out.join(t))?;
    }
    for (name, t) in &ttps {
        std::fs::write(out.join("plan_load").join(name), t)?;
        for ctl in [0u8, 1] {
            std::fs::write(
                out.join("ffi").join(format!("{name}-{ctl}")),
                [&[ctl][..], t].concat(),
            )?;
        }
    }
    let tag = tt_mcu::trainer::plan_tag(&b.plan).expect("the demo plan has a header");
    let state: Vec<u8> = b.run(1).expect("the demo runs").state;
    let mut c = Checkpoints::new(Ram(vec![0xFF; 2048]), 0, 1024, tag).expect("layout");
    for k in 0..3u8 {
        let p: Vec<u8> = state.iter().map(|&v| v ^ k).collect();
        c.save(&[&p]).expect("a save on RAM");
        let img = c.into_inner();
        let mut seed = tag.to_le_bytes().to_vec();
        seed.extend_from_slice(&(state.len() as u16).to_le_bytes());
        seed.extend_from_slice(&img.0);
        std::fs::write(out.join("checkpoint_read").join(format!("demo-{k}")), seed)?;
        c = Checkpoints::new(img, 0, 1024, tag).expect("layout");
    }
    // Update blobs of the demo plan: before training and after one and two epochs.
    let pv = tt_core::plan::PlanView::parse(&b.plan).expect("the demo plan parses");
    for epochs in 0..3 {
        let state = b.run(epochs).expect("the demo runs").state;
        let mut blob = vec![0u8; tt_core::update::blob_len(&pv).expect("blob size")];
        tt_core::update::write(&pv, &state, 48 * epochs as u32, &mut blob).expect("a blob");
        std::fs::write(out.join("update_read").join(format!("demo-{epochs}")), blob)?;
    }
    Ok(())
}

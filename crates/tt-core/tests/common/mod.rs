//! For the integration tests that compile and run a whole plan: a seeded generator and one small
//! graph with every kind of node whose numbers a plan carries.
use tt_core::graph::{Graph, LayerParams, Node, NodeKind, TensorInfo, Window};
use tt_core::quant::{Activation, Rounding};

pub struct Lcg(pub u64);

impl Lcg {
    pub fn next(&mut self) -> u32 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) as u32
    }

    pub fn i8(&mut self, lim: i32) -> i8 {
        ((self.next() % (2 * lim as u32 + 1)) as i32 - lim) as i8
    }
}

fn t(c: u32, h: u32, w: u32, scale: f32, zero_point: i32) -> TensorInfo {
    TensorInfo {
        c,
        h,
        w,
        scale,
        zero_point,
    }
}

fn win(k: u16, s: u16, p: u16) -> Window {
    Window {
        kh: k,
        kw: k,
        sh: s,
        sw: s,
        pt: p,
        pl: p,
        pb: p,
        pr: p,
    }
}

fn params(r: &mut Lcg, n: usize, o: usize, ws: f32) -> Option<LayerParams> {
    Some(LayerParams {
        weight: (0..n).map(|_| r.i8(100)).collect(),
        bias: (0..o).map(|_| (r.next() % 200) as i32 - 100).collect(),
        weight_scale: (0..o).map(|i| ws * (1.0 + 0.1 * i as f32)).collect(),
    })
}

/// conv3x3/2 relu6 -> dw3x3 relu6 -> pw1x1 -> add(skip) -> gap -> flatten -> fc, on a 3x8x8
/// input, requantizing with `rounding`.
pub fn graph(rounding: Rounding) -> Graph {
    let mut r = Lcg(7);
    let conv = |w, groups, act| NodeKind::Conv {
        win: w,
        groups,
        act,
    };
    let node = |name: &str, kind, inputs: Vec<usize>, output| Node {
        name: name.into(),
        kind,
        inputs,
        output,
    };
    Graph {
        tensors: vec![
            t(3, 8, 8, 0.02, 0),
            t(8, 4, 4, 0.03, -128),
            t(8, 4, 4, 0.03, -128),
            t(8, 4, 4, 0.05, 3),
            t(8, 4, 4, 0.06, -5),
            t(8, 1, 1, 0.04, -7),
            t(8, 1, 1, 0.04, -7),
            t(4, 1, 1, 0.1, 2),
        ],
        nodes: vec![
            node(
                "conv0",
                conv(win(3, 2, 1), 1, Activation::Relu6),
                vec![0],
                1,
            ),
            node("dw1", conv(win(3, 1, 1), 8, Activation::Relu6), vec![1], 2),
            node("pw2", conv(win(1, 1, 0), 1, Activation::None), vec![2], 3),
            node(
                "add",
                NodeKind::Add {
                    act: Activation::None,
                },
                vec![1, 3],
                4,
            ),
            node("gap", NodeKind::GlobalAvgPool, vec![4], 5),
            node("flat", NodeKind::Flatten, vec![5], 6),
            node(
                "fc",
                NodeKind::Fc {
                    act: Activation::None,
                },
                vec![6],
                7,
            ),
        ],
        params: vec![
            params(&mut r, 8 * 9 * 3, 8, 0.004),
            params(&mut r, 8 * 9, 8, 0.005),
            params(&mut r, 8 * 8, 8, 0.004),
            None,
            None,
            None,
            params(&mut r, 4 * 8, 4, 0.006),
        ],
        input: 0,
        output: 7,
        rounding,
    }
}

/// Bytes (a parameter blob) in 4-aligned storage, as flash holds them; the tail zero-padded.
pub fn words(bytes: &[u8]) -> Vec<u32> {
    bytes
        .chunks(4)
        .map(|b| {
            let mut a = [0u8; 4];
            a[..b.len()].copy_from_slice(b);
            u32::from_le_bytes(a)
        })
        .collect()
}

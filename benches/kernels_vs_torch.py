"""Int8 conv kernels through the bindings vs PyTorch fp32 on the same MobileNetV2-style shapes.

Times forward, input gradient and weight gradient (batch of 1, one thread on both sides) and
prints MAC/s and the ratio tinytrain / PyTorch. Without PyTorch it prints the tinytrain figures
and 'skipped: torch not installed'. Run: python3 benches/kernels_vs_torch.py
"""
import time

import numpy as np

from tinytrain import _core

SHAPES = [
    # name, H=W, C_in, C_out, k, stride, groups
    ("dw3x3 64x64x16 s1", 64, 16, 16, 3, 1, 16),
    ("dw3x3 64x64x48 s2", 64, 48, 48, 3, 2, 48),
    ("dw3x3 48x48x48 s1", 48, 48, 48, 3, 1, 48),
    ("dw3x3 48x48x96 s1", 48, 96, 96, 3, 1, 96),
    ("pw1x1 64x64 16->48", 64, 16, 48, 1, 1, 1),
    ("pw1x1 64x64 48->16", 64, 48, 16, 1, 1, 1),
    ("pw1x1 48x48 48->96", 48, 48, 96, 1, 1, 1),
    ("pw1x1 48x48 96->24", 48, 96, 24, 1, 1, 1),
]


def best_time(f, min_s=0.3):
    """Best thread CPU time of repeated runs: both sides run on the calling thread (torch is
    set to one thread), so other processes on the machine do not inflate the figures."""
    f()
    start, best = time.perf_counter(), float("inf")
    while time.perf_counter() - start < min_s:
        t = time.thread_time()
        f()
        best = min(best, time.thread_time() - t)
    return max(best, 1e-9)


def main():
    rng = np.random.default_rng(0)
    try:
        import torch
        torch.set_num_threads(1)
    except ImportError:
        torch = None
    rows = []
    for name, hw, ci, co, k, s, g in SHAPES:
        p = k // 2
        oh = (hw + 2 * p - k) // s + 1
        macs = oh * oh * co * k * k * (ci // g)
        x = rng.integers(-128, 128, size=(1, hw, hw, ci)).astype(np.int8)
        w = rng.integers(-127, 128, size=(co, k, k, ci // g)).astype(np.int8)
        bias = np.zeros(co, np.int32)
        rs = np.full(co, 0.004)
        ws = np.full(co, 0.01, np.float32)
        go = rng.normal(size=(1, oh, oh, co)).astype(np.float32)
        go[go < 0] = 0.0  # ReLU-masked, as after a real clamp
        pads = (p, p, p, p)
        t_f = best_time(lambda: _core.conv2d_forward(x, w, bias, (s, s), pads, g, 0, 0, rs))
        t_i = best_time(lambda: _core.conv2d_backward_input(go, w, ws, (hw, hw), (s, s), pads, g))
        t_w = best_time(lambda: _core.conv2d_backward_weight(x, 0.02, 0, go, w.shape, (s, s), pads, g))
        row = [name, macs / 1e6, macs / t_f / 1e9, macs / t_i / 1e9, macs / t_w / 1e9]
        if torch is not None:
            xt = torch.randn(1, ci, hw, hw, requires_grad=True)
            wt = torch.randn(co, ci // g, k, k, requires_grad=True)
            gt = torch.tensor(go).permute(0, 3, 1, 2).contiguous()

            def fwd():
                with torch.no_grad():
                    torch.nn.functional.conv2d(xt, wt, stride=s, padding=p, groups=g)

            def bwd(wrt):
                y = torch.nn.functional.conv2d(xt, wt, stride=s, padding=p, groups=g)
                torch.autograd.grad(y, wrt, gt)

            # Backward timings include the forward torch must redo to build its graph; subtract it.
            tf = best_time(fwd)
            ti = max(best_time(lambda: bwd(xt)) - tf, 1e-9)
            tw = max(best_time(lambda: bwd(wt)) - tf, 1e-9)
            row += [macs / tf / 1e9, macs / ti / 1e9, macs / tw / 1e9]
        rows.append(row)
    head = f"{'shape (batch 1)':<22}{'MMAC':>7}{'tt fwd':>9}{'tt bwd-in':>11}{'tt bwd-w':>10}"
    if torch is not None:
        head += f"{'pt fwd':>9}{'pt bwd-in':>11}{'pt bwd-w':>10}{'ratio fwd':>11}{'ratio in':>10}{'ratio w':>9}"
    print("GMAC/s, one thread (thread CPU time); tt = tinytrain int8 kernels, pt = PyTorch fp32")
    print(head)
    for r in rows:
        line = f"{r[0]:<22}{r[1]:>7.2f}{r[2]:>9.2f}{r[3]:>11.2f}{r[4]:>10.2f}"
        if torch is not None:
            line += f"{r[5]:>9.2f}{r[6]:>11.2f}{r[7]:>10.2f}"
            line += f"{r[2] / r[5]:>11.2f}{r[3] / r[6]:>10.2f}{r[4] / r[7]:>9.2f}"
        print(line)
    if torch is None:
        print("skipped: torch not installed")


if __name__ == "__main__":
    main()

"""Measure one PyTorch training step of a tinytrain graph: peak RSS over the post-import RSS, time.

Usage: python torch_step.py GRAPH.npz SCHEME(full|sparse) STEPS
Prints one JSON line. Batch 1, SGD without momentum, cross-entropy, one thread (as tinytrain).
"""
import json
import resource
import sys
import time


def rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def main():
    path, mode, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
    import torch
    import torch.nn.functional as F

    from torch_graph import GraphModule

    torch.set_num_threads(1)
    baseline = rss_bytes()
    model = GraphModule(path, mode)
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(trainable, lr=0.01, momentum=0.0)
    c, h, w = model.spec["input_shape"]
    gen = torch.Generator().manual_seed(0)
    times = []
    for _ in range(steps):
        x = torch.randn(1, c, h, w, generator=gen)
        y = torch.randint(0, model.spec["num_classes"], (1,), generator=gen)
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    times.sort()
    print(json.dumps({
        "framework": f"PyTorch {torch.__version__}",
        "peak_rss_over_import_bytes": peak - baseline,
        "step_ms_median": 1000 * times[len(times) // 2],
        "trainable_params": int(sum(p.numel() for p in trainable)),
    }))


if __name__ == "__main__":
    main()

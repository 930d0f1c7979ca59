"""Measure one PyTorch training step of a tinytrain graph: peak RSS over the post-import RSS, time.

Usage: python torch_step.py GRAPH.npz SCHEME(full|sparse) STEPS
GRAPH.npz holds ``spec`` (JSON: input shape, nodes) and float weights ``<node>.weight/.bias``.
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
    import numpy as np
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(1)
    baseline = rss_bytes()
    data = np.load(path)
    spec = json.loads(str(data["spec"]))
    params = {}
    for node in spec["nodes"]:
        if node["op"] in ("conv", "fc"):
            trainable = mode == "full" or node["name"] in spec["updated"]
            w = torch.tensor(data[node["name"] + ".weight"], requires_grad=trainable)
            b = torch.tensor(data[node["name"] + ".bias"], requires_grad=trainable or node["name"] in spec["bias_updated"])
            params[node["name"]] = (w, b)

    def act(x, kind):
        if kind == "relu":
            return F.relu(x)
        if kind == "relu6":
            return F.relu6(x)
        return x

    def forward(x):
        env = {spec["input"]: x}
        for node in spec["nodes"]:
            a = env[node["inputs"][0]]
            op, at = node["op"], node["attrs"]
            if op == "conv":
                w, b = params[node["name"]]
                t, l, bo, r = at["pads"]
                a = F.pad(a, (l, r, t, bo))
                y = act(F.conv2d(a, w, b, stride=tuple(at["stride"]), groups=at["groups"]), at.get("act", "none"))
            elif op == "fc":
                w, b = params[node["name"]]
                y = act(F.linear(a.flatten(1), w, b), at.get("act", "none"))
            elif op == "add":
                y = act(a + env[node["inputs"][1]], at.get("act", "none"))
            elif op == "global_avgpool":
                y = a.mean(dim=(2, 3), keepdim=True)
            elif op == "avgpool":
                t, l, bo, r = at["pads"]
                y = F.avg_pool2d(F.pad(a, (l, r, t, bo)), tuple(at["kernel"]), tuple(at["stride"]))
            elif op == "maxpool":
                t, l, bo, r = at["pads"]
                y = F.max_pool2d(F.pad(a, (l, r, t, bo), value=float("-inf")), tuple(at["kernel"]), tuple(at["stride"]))
            elif op == "flatten":
                y = a.flatten(1)[:, :, None, None]
            else:
                raise SystemExit(f"torch peer: op {op} not supported")
            env[node["output"]] = y
        return env[spec["output"]].flatten(1)

    trainable = [p for wb in params.values() for p in wb if p.requires_grad]
    opt = torch.optim.SGD(trainable, lr=0.01, momentum=0.0)
    c, h, w = spec["input_shape"]
    gen = torch.Generator().manual_seed(0)
    times = []
    for _ in range(steps):
        x = torch.randn(1, c, h, w, generator=gen)
        y = torch.randint(0, spec["num_classes"], (1,), generator=gen)
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(forward(x), y)
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

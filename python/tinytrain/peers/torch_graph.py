"""A torch.nn.Module that runs a tinytrain graph spec (see runner.graph_npz), for the peers."""
import json

import numpy as np
import torch
import torch.nn.functional as F


def _act(x, kind):
    if kind == "relu":
        return F.relu(x)
    if kind == "relu6":
        return F.relu6(x)
    return x


class GraphModule(torch.nn.Module):
    def __init__(self, path: str, mode: str):
        super().__init__()
        data = np.load(path)
        self.spec = json.loads(str(data["spec"]))
        self.updated, self.frozen = [], []
        for node in self.spec["nodes"]:
            if node["op"] not in ("conv", "fc"):
                continue
            for kind in ("weight", "bias"):
                name = f"{node['name']}_{kind}"
                self.register_parameter(name, torch.nn.Parameter(torch.tensor(data[f"{node['name']}.{kind}"])))
                listed = self.spec["updated"] if kind == "weight" else self.spec["bias_updated"]
                trainable = mode == "full" or node["name"] in listed
                getattr(self, name).requires_grad_(trainable)
                (self.updated if trainable else self.frozen).append(name)

    def forward(self, x):
        spec = self.spec
        env = {spec["input"]: x}
        for node in spec["nodes"]:
            a = env[node["inputs"][0]]
            op, at = node["op"], node["attrs"]
            if op in ("conv", "fc"):
                w, b = getattr(self, node["name"] + "_weight"), getattr(self, node["name"] + "_bias")
            if op == "conv":
                t, l, bo, r = at["pads"]
                a = F.pad(a, (l, r, t, bo))
                y = _act(F.conv2d(a, w, b, stride=tuple(at["stride"]), groups=at["groups"]), at.get("act", "none"))
            elif op == "fc":
                y = _act(F.linear(a.flatten(1), w, b), at.get("act", "none"))
            elif op == "add":
                y = _act(a + env[node["inputs"][1]], at.get("act", "none"))
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

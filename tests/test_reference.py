"""The float reference (tinytrain.reference): backward against numerical gradients for every IR op,
and SGD training that learns."""
import numpy as np
import pytest

from tinytrain import reference
from tinytrain.graph import Graph, Node, Tensor


def conv(name, inp, out, cin, cout, k, s, p, groups, act, rng):
    return Node(name, "conv", [inp], out, {"kernel": (k, k), "stride": (s, s), "pads": p, "groups": groups, "act": act},
                {"weight": rng.normal(0, 0.5, (cout, cin // groups, k, k)).astype(np.float32),
                 "bias": rng.normal(0, 0.1, cout).astype(np.float32)})


def every_op_graph(rng, head="gap"):
    t = {n: Tensor(n, s) for n, s in [("x", (4, 7, 6)), ("a", (6, 4, 3)), ("b", (6, 4, 3)), ("c", (6, 4, 3)),
                                       ("d", (6, 4, 3)), ("e", (6, 2, 2)), ("f", (6, 1, 1)), ("fl", (24, 1, 1)),
                                       ("y", (5, 1, 1))]}
    nodes = [conv("conv_0", "x", "a", 4, 6, 3, 2, (1, 0, 1, 1), 2, "relu6", rng),
             conv("conv_1", "a", "b", 6, 6, 3, 1, (1, 1, 1, 1), 6, "relu", rng),
             Node("add_0", "add", ["a", "b"], "c", {"act": "none"}),
             Node("maxpool_0", "maxpool", ["c"], "d", {"kernel": (3, 2), "stride": (1, 1), "pads": (1, 0, 1, 1)}),
             Node("avgpool_0", "avgpool", ["d"], "e", {"kernel": (3, 3), "stride": (2, 2), "pads": (1, 1, 0, 1)})]
    if head == "gap":
        nodes.append(Node("global_avgpool_0", "global_avgpool", ["e"], "f"))
        fc_in, width = "f", 6
    else:
        nodes.append(Node("flatten_0", "flatten", ["e"], "fl"))
        fc_in, width = "fl", 24
    nodes.append(Node("fc_0", "fc", [fc_in], "y", {"act": "none"},
                      {"weight": rng.normal(0, 0.5, (5, width)).astype(np.float32),
                       "bias": rng.normal(0, 0.1, 5).astype(np.float32)}))
    return Graph("x", "y", t, nodes)


def loss_of(g, x, labels):
    return reference.softmax_cross_entropy(reference.forward(g, x), labels)[0]


@pytest.mark.parametrize("head", ["gap", "flatten"])
def test_backward_matches_numerical_gradient(head):
    rng = np.random.default_rng(3)
    g = every_op_graph(rng, head)
    x = rng.normal(0, 1, (3, 4, 7, 6)).astype(np.float32)
    labels = np.array([0, 3, 4])
    cache = reference.Cache()
    logits = reference.forward(g, x, cache)
    _, gl = reference.softmax_cross_entropy(logits, labels)
    grads, gx = reference.backward(g, cache, gl, need_input=True)
    assert set(grads) == {"conv_0", "conv_1", "fc_0"}
    eps = 1e-3

    def numeric(arr, idx):
        old = arr[idx]
        arr[idx] = old + eps
        lp = loss_of(g, x, labels)
        arr[idx] = old - eps
        lm = loss_of(g, x, labels)
        arr[idx] = old
        return (lp - lm) / (2 * eps)

    checked = 0
    for name in ("conv_0", "conv_1", "fc_0"):
        for key in ("weight", "bias"):
            arr = g.node(name).params[key]
            for flat in rng.choice(arr.size, min(6, arr.size), replace=False):
                idx = np.unravel_index(flat, arr.shape)
                num, ana = numeric(arr, idx), grads[name][key][idx]
                assert abs(num - ana) <= 2e-3 + 0.05 * abs(num), (name, key, idx, num, ana)
                checked += 1
    for flat in rng.choice(x.size, 10, replace=False):
        idx = np.unravel_index(flat, x.shape)
        num, ana = numeric(x, idx), gx[idx]
        assert abs(num - ana) <= 2e-3 + 0.05 * abs(num), ("input", idx, num, ana)
    assert checked == 35


def test_backward_stops_at_earliest_requested_layer():
    rng = np.random.default_rng(0)
    g = every_op_graph(rng)
    x = rng.normal(0, 1, (2, 4, 7, 6)).astype(np.float32)
    cache = reference.Cache()
    _, gl = reference.softmax_cross_entropy(reference.forward(g, x, cache), np.array([1, 2]))
    grads, gx = reference.backward(g, cache, gl, params=["fc_0"])
    assert set(grads) == {"fc_0"} and gx is None
    full, _ = reference.backward(g, cache, gl)
    np.testing.assert_allclose(grads["fc_0"]["weight"], full["fc_0"]["weight"], rtol=1e-6)


def test_sgd_training_learns():
    rng = np.random.default_rng(1)
    g = every_op_graph(rng)
    x = rng.normal(0, 1, (40, 4, 7, 6)).astype(np.float32)
    y = rng.integers(0, 5, 40)
    before = loss_of(g, x, y)
    reference.train(g, x, y, epochs=30, lr=0.05, batch=8)
    assert loss_of(g, x, y) < 0.5 * before

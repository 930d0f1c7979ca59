"""Facts Python asks tt-core instead of re-deriving them: the channels a weight ratio trains (the
size of an update), the plan tag and header lengths, the bounds and the setting names. Ratios
landing on x.5 are where a copy with Python's round (half to even) disagrees with tt-core's (half
away from zero)."""
import zlib

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import tinytrain as tt
from tinytrain import _core
from tinytrain import sparse_search as search_mod


def _half_model():
    """conv 3->20 (3x3, relu) -> conv 20->5 (1x1, relu) -> global pool -> flatten -> fc 5->10: ⅛ of
    20, ½ of 5 and ¼ of 10 channels are all 2.5."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(a, n) for n, a in (
        ("w0", rng.normal(0, 0.3, (20, 3, 3, 3)).astype(np.float32)), ("b0", rng.normal(0, 0.1, 20).astype(np.float32)),
        ("w1", rng.normal(0, 0.3, (5, 20, 1, 1)).astype(np.float32)), ("b1", rng.normal(0, 0.1, 5).astype(np.float32)),
        ("w2", rng.normal(0, 0.3, (10, 5)).astype(np.float32)), ("b2", rng.normal(0, 0.1, 10).astype(np.float32)))]
    nodes = [helper.make_node("Conv", ["x", "w0", "b0"], ["c0"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c0"], ["r0"]),
             helper.make_node("Conv", ["r0", "w1", "b1"], ["c1"]),
             helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("GlobalAveragePool", ["r1"], ["p"]),
             helper.make_node("Flatten", ["p"], ["f"]),
             helper.make_node("Gemm", ["f", "w2", "b2"], ["y"], transB=1)]
    g = helper.make_graph(nodes, "half", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 6, 6])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 8
    return m


@pytest.fixture(scope="module")
def half_q(tmp_path_factory):
    path = tmp_path_factory.mktemp("half") / "half.onnx"
    onnx.save(_half_model(), str(path))
    g = tt.load_onnx(str(path))
    x = np.random.default_rng(1).normal(0, 1, (32, 3, 6, 6)).astype(np.float32)
    return tt.quantize(g, x)


def _exported_update_bytes(q, scheme) -> int:
    """Bytes of the parameters in the update blob a device really exports for ``scheme``."""
    plan = tt.compile(q, scheme)
    u = tt.read_update(tt.Trainer(plan).export_update(), plan)
    return sum(a.nbytes for a in u.params.values())


def test_channels_for_a_ratio_round_half_away_from_zero():
    assert [_core.channels_for_ratio(c, r) for c, r in ((10, 0.25), (20, 0.125), (5, 0.5), (18, 0.25))] == [3, 3, 3, 5]
    assert _core.channels_for_ratio(10, 0.0) == 0 and _core.channels_for_ratio(10, 0.01) == 1


def test_update_bytes_is_the_exported_blobs_for_every_candidate_the_search_considers(half_q, monkeypatch):
    layers = half_q.layers
    assert [half_q.node(n).params["weight_q"].shape[0] for n in layers] == [20, 5, 10]
    considered = []
    real = search_mod.update_bytes
    monkeypatch.setattr(search_mod, "update_bytes", lambda q, s: considered.append(s) or real(q, s))
    rng = np.random.default_rng(2)
    x = rng.normal(0, 1, (24, 3, 6, 6)).astype(np.float32)
    y = rng.integers(0, 10, 24)
    # an update-size limit makes the search size every candidate, the classifier's ratio included;
    # a given rate: random data over a random model gives the range test nothing to learn
    tt.search(half_q, x, y, budget="256KB", ratios=(0.125, 0.5), population=16, generations=4, epochs=1, lr=0.01,
              workers=1, verify=0, max_update_bytes="100KB")
    ratios = {(name, r) for s in considered for name, r in s.weight_ratios.items()}
    # the x.5 cases are among them: 1/8 of the first conv's 20 outputs, 1/2 of the second's 5, and
    # 1/2 of the classifier's 5 inputs (the axis the search gives it under a size limit); 1/4 of
    # its 10 outputs is added below
    fc = layers[-1]
    assert {(layers[0], 0.125), (layers[1], 0.5), (fc, 0.5)} <= ratios, ratios
    schemes = {s.to_json(): s for s in considered}
    schemes["fc at 1/4 of its outputs"] = tt.Scheme(bias_layers=[fc], weight_ratios={fc: 0.25})
    for s in schemes.values():
        assert real(half_q, s) == _exported_update_bytes(half_q, s), s.to_dict()
    # the classifier at 1/4 of 10 rows trains 3 rows: 3 * 5 int8 weights + 10 int32 biases
    assert real(half_q, schemes["fc at 1/4 of its outputs"]) == 3 * 5 + 4 * 10


def test_plan_tag_and_lengths_come_from_the_header(half_q):
    plan = tt.compile(half_q, tt.schemes.bias_only(half_q))
    assert _core.plan_tag(plan.plan_bytes) == zlib.crc32(plan.plan_bytes[:_core.PLAN_HEADER_LEN])
    assert _core.plan_lengths(plan.to_bytes()) == (len(plan.plan_bytes), len(plan.params))
    with pytest.raises(tt.PlanError, match="magic"):
        _core.plan_lengths(b"XXXX" + plan.plan_bytes[4:])
    with pytest.raises(tt.PlanError):
        _core.plan_tag(plan.plan_bytes[:10])


def test_settings_travel_by_name_and_a_bad_name_is_refused(half_q):
    assert _core.UPDATE_PRECISIONS == ("stochastic", "residual", "fp32")
    assert _core.LOSSES == ("cross_entropy", "mse")
    plan = tt.compile(half_q, tt.schemes.bias_only(half_q), update_precision="fp32", loss="mse")
    assert (plan.update_precision, plan.loss) == ("fp32", "mse")
    with pytest.raises(ValueError, match='update precision must be one of "stochastic", "residual", "fp32", got "fp16"'):
        tt.compile(half_q, tt.schemes.bias_only(half_q), update_precision="fp16")
    with pytest.raises(ValueError, match="loss must be one of"):
        tt.compile(half_q, tt.schemes.bias_only(half_q), loss="hinge")
    node = half_q.node("conv_0")
    node.attrs["act"] = "gelu"
    try:
        with pytest.raises(ValueError, match='node "conv_0": activation must be one of .*got "gelu"'):
            tt.compile(half_q, tt.schemes.bias_only(half_q))
    finally:
        node.attrs["act"] = "relu"


def test_a_request_with_an_unknown_channel_axis_is_refused_not_read_as_output(half_q):
    """The axis used to travel as a code that fell back to "output" when unknown."""
    import dataclasses

    from tinytrain._lowering import CompileRequest, LayerUpdate, lower

    fc = half_q.layers[-1]
    tensors, nodes, ids = lower(half_q, {fc: LayerUpdate(True, 0.5, "sideways")})
    request = CompileRequest(tensors=tensors, nodes=nodes, input=ids[half_q.input], output=ids[half_q.output],
                             rounding="single", reorder=True, update_precision="stochastic", loss="cross_entropy",
                             momentum_buffers=False, accumulate=False, seed=0, lr=0.05, momentum=0.0, meta=b"",
                             layout=None, stream_input=False, optimize="memory", budget=None)
    with pytest.raises(ValueError, match='channel axis must be one of "output", "input", got "sideways"'):
        _core.engine_compile(request)
    fixed = [dataclasses.replace(n, update=LayerUpdate(True, 0.5, "input")) if n.name == fc else n for n in nodes]
    plan_bytes, params = _core.engine_compile(dataclasses.replace(request, nodes=fixed))
    assert tuple(_core.update_layout(plan_bytes)[0][0][2]) == (10, 1, 1, 3)  # W[:, :3]: 1/2 of 5 inputs is 3

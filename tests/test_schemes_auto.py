"""A default scheme for any model (issue 22 item 4): the CLI's default works on a model without
inverted-residual blocks, says which scheme it chose and why, and asking for ``paper`` where it
does not apply lists the schemes that do."""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest

import tinytrain as tt
from tinytrain import cli
from tinytrain.errors import SchemeError

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "tflite"
RESNET8 = FIXTURES / "resnet8.onnx"  # plain convs and residual adds: no depthwise conv
MOBILENET = FIXTURES / "mobilenet.onnx"  # inverted-residual blocks


def _load(path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return tt.fileio.load_model(str(path))


@pytest.fixture(scope="module")
def resnet8():
    return _load(RESNET8)


def _trains(q, scheme) -> bool:
    try:
        tt.compile(q, scheme)
        return True
    except ValueError:
        return False


def test_paper_where_it_does_not_apply_lists_what_does(resnet8):
    """ResNet-8's stem ends in a max pool the engine has no gradient for: full, bias-only and
    last:10 cannot train; last:1 .. last:9 can."""
    n = len(resnet8.layers)
    can = [k for k in range(1, n + 1) if _trains(resnet8, tt.schemes.last_layers(resnet8, k))]
    assert can == list(range(1, n))
    expected = ["auto"] + [name for name, make in (("full", tt.schemes.full), ("bias", tt.schemes.bias_only))
                           if _trains(resnet8, make(resnet8))] + [f"last:{k}" for k in can]
    assert tt.schemes.applicable(resnet8) == expected
    with pytest.raises(SchemeError, match=rf"the paper's scheme does not apply to this model: it has no 1x1 conv "
                                          rf"feeding a depthwise conv \(no inverted-residual blocks\); schemes that "
                                          rf"apply: auto, last:1 \.\. last:{n - 1}$"):
        tt.schemes.paper_sparse(resnet8)
    assert "paper" in tt.schemes.applicable(_load(MOBILENET))


def test_auto_falls_back_to_the_most_trailing_layers_that_fit(resnet8):
    s = tt.schemes.auto(resnet8, budget="32KB")
    k = int(s.name.split("_")[1])
    assert s.name == f"last_{k}" and s == tt.schemes.last_layers(resnet8, k)
    assert 0 < k < len(resnet8.layers) - 1
    assert tt.compile(resnet8, s).memory.peak_bytes <= 32 * 1024
    above = tt.compile(resnet8, tt.schemes.last_layers(resnet8, k + 1)).memory.peak_bytes
    assert above > 32 * 1024
    assert s.why.startswith(f"last:{k}: the paper's scheme does not apply (no 1x1 conv feeding a depthwise conv: "
                            f"no inverted-residual blocks); the most "
                            f"trailing layers whose training fits 32 KB")
    # With room for everything the engine can train, the layers behind the max pool are the limit.
    s = tt.schemes.auto(resnet8, budget="1MB")
    n = len(resnet8.layers)
    assert s.name == f"last_{n - 1}" and s.why.endswith(f"; last:{n} cannot be trained)")


def test_auto_is_paper_where_it_applies_and_fits():
    q = _load(MOBILENET)
    s = tt.schemes.auto(q, budget="256KB")
    assert s == tt.schemes.paper_sparse(q) and s.why.startswith("paper: ")


def test_cli_default_scheme_works_on_a_model_without_inverted_residuals(tmp_path, capsys):
    rc = cli.main(["compile", str(RESNET8), "--budget", "64KB", "-o", str(tmp_path / "p.ttp"), "--json"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    chosen = json.loads(out.out)["scheme"]
    assert chosen.startswith("last_") and chosen != "last_0"
    assert "note: scheme auto chose last:" in out.err and "the paper's scheme does not apply" in out.err
    assert cli.main(["compile", str(RESNET8), "--scheme", "paper", "-o", str(tmp_path / "q.ttp")]) == 1
    assert "schemes that apply: auto, last:1 .. last:9" in capsys.readouterr().err

"""Every code example in the API spec runs verbatim.

The spec is vendored in tests/spec/ (so a clean clone can test it); when the shared copy sits
beside the checkout, the vendored one must match it. Blocks that use ``torch`` without
importing it (the conv and GPU-optimization examples) get ``import torch`` prepended — nothing
else is changed.
"""

from __future__ import annotations

import pathlib
import re
import warnings

import pytest
import torch

import panther as pr

HERE = pathlib.Path(__file__).parent
SPEC = HERE / "spec" / "panther_nn_api.rst"
SHARED = HERE.parent.parent / "shared" / "spec" / "panther_nn_api.rst"


def code_blocks(text: str) -> list[str]:
    blocks = []
    for m in re.finditer(r"\.\. code-block:: python\n\n((?:[ \t]+.*\n|[ \t]*\n)+)", text):
        lines = m.group(1).splitlines()
        indent = min(len(line) - len(line.lstrip()) for line in lines if line.strip())
        blocks.append("\n".join(line[indent:] for line in lines).strip() + "\n")
    return blocks


BLOCKS = code_blocks(SPEC.read_text())


def test_vendored_spec_matches_shared():
    if not SHARED.exists():
        pytest.skip("shared/spec not beside this checkout")
    assert SPEC.read_text() == SHARED.read_text()


def test_found_all_examples():
    assert len(BLOCKS) == 6


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_spec_example_runs(index, capsys):
    code = BLOCKS[index]
    if re.search(r"\btorch\.", code) and not re.search(r"^import torch$", code, re.M):
        code = "import torch\n" + code
    namespace: dict = {"__name__": f"spec_example_{index}"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the budget warning is expected for small layers
        exec(compile(code, f"<spec example {index}>", "exec"), namespace)
    out = capsys.readouterr().out
    if "Output shape" in code:
        expected = re.findall(r"# (\(.*\))\s*$", code, re.M)[-1]
        assert f"Output shape: torch.Size([{expected.strip('()')}])" in out


def test_sketched_mlp_example_instantiates_and_warns_only_for_layer3():
    """The spec's SketchedMLP: layer3 (256→10, k=16) is over budget and warns; the rest don't."""
    code = BLOCKS[1]
    ns: dict = {}
    exec(compile(code, "<spec example 1>", "exec"), ns)
    with pytest.warns(UserWarning) as record:
        model = ns["SketchedMLP"]()
    assert len(record) == 1 and "(256+10)" in str(record[0].message)
    x = torch.randn(3, 784)
    h = model.layer3(model.layer2(model.layer1(x)))
    assert h.shape == (3, 10)
    assert isinstance(model.layer1, pr.nn.SKLinear)

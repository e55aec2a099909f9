"""The compiler part of ``python -m panther demo``, and its command line."""

from __future__ import annotations

import json
import os

import pytest
import torch

import panther
from panther.demo_compile import run_compile_demo


def test_explain_is_exported():
    from panther.explain import explain

    assert panther.explain is explain  # panther.explain(model, *example_inputs, **options)


def test_compile_demo(tmp_path):
    text = run_compile_demo("cpu", str(tmp_path), reps=2)
    for needle in ("encoder.layers.0.linear1", "rewrite", "parameters in the rewritten layers",
                   "output error vs the dense model", "time per batch: dense Inductor", "dump:"):
        assert needle in text
    (folder,) = os.listdir(tmp_path)
    with open(os.path.join(tmp_path, folder, "rewrites.json")) as f:
        assert json.load(f)["candidates"]


@pytest.mark.parametrize("device", ["nope", "tpu"] + ([] if torch.cuda.is_available() else ["cuda"]))
def test_demo_rejects_a_bad_device(device, capsys):
    from panther.demo import main

    with pytest.raises(SystemExit) as e:
        main(["--device", device, "--quick"])
    assert e.value.code == 2 and "--device" in capsys.readouterr().err

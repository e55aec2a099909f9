"""Options of the panther backend, and its registration through the entry point."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from panther.options import PantherOptions


def test_defaults_round_trip():
    opts = PantherOptions()
    d = opts.to_dict()
    assert json.loads(json.dumps(d)) == d
    assert PantherOptions.from_dict(d) == opts


def test_unknown_key_lists_allowed():
    with pytest.raises(ValueError) as e:
        PantherOptions.from_dict({"lowrank": 8})
    msg = str(e.value)
    assert "'lowrank'" in msg
    for name in ("low_rank", "num_terms", "rank_fraction", "num_random_features", "kernel_fn", "min_params",
                 "include", "exclude", "seed", "strict", "dump_dir", "on_stale"):
        assert name in msg


@pytest.mark.parametrize(
    "bad, match",
    [
        ({"kernel_fn": "gauss"}, r"kernel_fn must be one of \['softmax', 'relu'\]"),
        ({"on_stale": "ignore"}, r"on_stale must be one of \['refresh', 'raise'\]"),
        ({"method": "qr"}, r"method must be one of \['auto', 'data-aware', 'svd', 'rsvd', 'sketch'\]"),
        ({"tolerance": "loose"}, r"tolerance must be a float in \(0, 1\], None or 'auto'"),
        ({"tolerance": 0.0}, r"tolerance must be in"),
        ({"tolerance": 0.1, "low_rank": 8}, r"tolerance=0.1 chooses each layer's rank, low_rank=8 fixes it"),
        ({"tolerance": 0.1, "max_error": 0.2}, r"max_error=0.2 chooses it by the weight error instead"),
        ({"tolerance": 0.1, "measure_error": False}, r"measure_error=False runs no example inputs"),
        ({"max_error": 0.1, "method": "data-aware"}, r"max_error=0.1 bounds the weight error, which method='data-aware'"),
        ({"low_rank": 0}, "low_rank must be a positive integer"),
        ({"rank_fraction": 1.5}, r"rank_fraction must be in"),
        ({"num_random_features": -3}, "num_random_features must be a positive integer"),
        ({"mode": "fast"}, r"mode must be one of"),
        ({"inductor": {"no_such_flag": 1}}, "unknown torch._inductor.config option"),
    ],
    ids=lambda v: str(v)[:30],
)
def test_bad_values_raise_value_error(bad, match):
    with pytest.raises(ValueError, match=match):
        PantherOptions.from_dict(bad)


@pytest.mark.parametrize("bad", [{"strict": 1}, {"linear": "yes"}, {"include": [1]}, {"seed": 1.5}])
def test_bad_types_raise_type_error(bad):
    with pytest.raises(TypeError):
        PantherOptions.from_dict(bad)


def test_tolerance_resolution():
    """'auto' is the documented default unless something else sets the rank or nothing is run."""
    from panther.options import DEFAULT_TOLERANCE

    assert DEFAULT_TOLERANCE == 0.05
    assert PantherOptions().effective_tolerance() == DEFAULT_TOLERANCE
    assert PantherOptions(tolerance=0.2).effective_tolerance() == 0.2
    assert PantherOptions(tolerance=None).effective_tolerance() is None
    for other in ({"low_rank": 8}, {"max_error": 0.1}, {"measure_error": False}):
        assert PantherOptions(**other).effective_tolerance() is None
    assert PantherOptions(tolerance=0.1, rank_fraction=0.25).effective_tolerance() == 0.1  # the budget caps it


def test_method_resolution():
    assert PantherOptions().resolved_method(has_activations=True) == "data-aware"
    assert PantherOptions().resolved_method(has_activations=False) == "svd"
    assert PantherOptions(method="data-aware").resolved_method(has_activations=False) == "svd"
    assert PantherOptions(max_error=0.1).resolved_method(has_activations=True) == "svd"
    for m in ("svd", "rsvd", "sketch"):
        assert PantherOptions(method=m).resolved_method(has_activations=True) == m


def test_rank_rules():
    assert PantherOptions(low_rank=8, num_terms=2).rank_for(256, 512) == 32  # 2·L·k, as pr.nn.SKLinear
    assert PantherOptions(rank_fraction=0.5).rank_for(256, 256) == 64  # r·(in+out) <= 0.5·in·out
    assert PantherOptions(include="enc.*").include == ("enc.*",)


def test_dump_dir_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("PANTHER_DUMP_DIR", str(tmp_path))
    assert PantherOptions().resolved_dump_dir() == str(tmp_path)
    assert PantherOptions(dump_dir="x").resolved_dump_dir() == "x"


def test_malformed_option_through_torch_compile():
    import torch

    model = torch.nn.Linear(4, 4)
    compiled = torch.compile(model, backend="panther", options={"kernel": "relu"})
    with pytest.raises(Exception, match="unknown panther option 'kernel'"):
        compiled(torch.randn(2, 4))


def test_entry_point_in_fresh_process():
    """backend="panther" resolves in a process that never imports panther itself."""
    code = (
        "import sys, torch\n"
        "m = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 64)).eval()\n"
        "x = torch.randn(4, 64)\n"
        "with torch.no_grad():\n"
        "    y = torch.compile(m, backend='panther', options={'min_params': 0, 'measure_error': False})(x)\n"
        "assert y.shape == (4, 64)\n"
        "assert 'panther.backend' in sys.modules\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().endswith("ok")

"""The panther backend on the issue's models (CPU): MLP, small CNN, nn.TransformerEncoder (eval),
HF BertModel and GPT2Model from small configs.

Per model: the compiled output stays within the error the report predicts (measured on the
example inputs; checked on fresh inputs), and matches an eager run of the same rewritten graph.
"""

from __future__ import annotations

import pytest
import torch

from backend_models import (
    CNN, COMPILED_VS_EAGER_RTOL, MLP, PREDICTION_SLACK, bert, compile_panther, give_spectrum, gpt2, transformer_encoder,
)
from panther.passes.measure import real_inputs, rel_err as graph_rel_err
from panther_testing import RTOL, rel_err


def _tokens(seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 128, (2, 16), generator=g)
    mask = torch.ones(2, 16, dtype=torch.long)
    mask[1, 11:] = 0
    return ids, mask


def _cases():
    return {
        # name: (build, inputs(seed) -> (args, kwargs), options, kinds that must be rewritten)
        "mlp": (lambda: give_spectrum(MLP()), lambda s: ((torch.randn(8, 64, generator=torch.Generator().manual_seed(s)),), {}),
                {"min_params": 0}, {"linear"}),
        "cnn": (lambda: give_spectrum(CNN(), 0.7), lambda s: ((torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(s)),), {}),
                {"min_params": 0}, {"conv", "linear"}),
        "transformer-encoder": (
            lambda: give_spectrum(transformer_encoder()),
            lambda s: ((torch.randn(2, 16, 64, generator=torch.Generator().manual_seed(s)),),
                       {"src_key_padding_mask": _tokens(s)[1] == 0}),
            {"min_params": 0}, {"linear"}),
        "bert": (lambda: give_spectrum(bert("sdpa", layers=1)), lambda s: ((_tokens(s)[0],), {"attention_mask": _tokens(s)[1]}),
                 {"min_params": 0, "require_savings": False, "num_random_features": 64}, {"linear", "attention"}),
        "gpt2": (lambda: give_spectrum(gpt2("eager", layers=1)), lambda s: ((_tokens(s)[0],), {}),
                 {"min_params": 0}, {"linear"}),
    }


@pytest.mark.parametrize("name", list(_cases()))
@torch.no_grad()
def test_model(name):
    build, inputs, options, kinds = _cases()[name]
    torch.manual_seed(0)
    model = build().eval()
    compiled, made = compile_panther(model, **options)
    args, kwargs = inputs(0)
    compiled(*args, **kwargs)
    assert len(made) == 1, "one graph per model"
    pc = made[0]
    assert {c.kind for c in pc.report.rewritten} == kinds
    # Compiled code == eager run of the same rewritten graph, on the example inputs (every output).
    example = real_inputs(pc._example_inputs)  # SymInts (dynamic sizes) at their example values
    assert graph_rel_err(pc(*example), pc.graph_module(*example)) <= COMPILED_VS_EAGER_RTOL
    # Fresh inputs: within the error the report predicts.
    args, kwargs = inputs(1)
    out, dense = compiled(*args, **kwargs), model(*args, **kwargs)
    out_t = out if isinstance(out, torch.Tensor) else out[0]
    dense_t = dense if isinstance(dense, torch.Tensor) else dense[0]
    predicted = pc.report.predicted_error
    assert predicted is not None
    assert rel_err(out_t, dense_t) <= PREDICTION_SLACK * predicted + RTOL[torch.float32]
    assert pc.report.params_after < pc.report.params_before or "attention" in kinds

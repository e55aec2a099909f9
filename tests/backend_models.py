"""Small models and helpers shared by the backend tests (tests/test_backend_*.py).

Weights get a decaying singular-value spectrum, as trained weights have (a random init has a
flat one, which no low rank approximates well); outputs can then be compared at tight,
meaningful tolerances.
"""

from __future__ import annotations

import torch
from torch import nn


def give_spectrum(model: nn.Module, decay: float = 0.8, seed: int = 0) -> nn.Module:
    """Set every Linear / Conv2d weight to U·diag(decay**i)·Vᵀ (scaled to keep its norm)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        weights = [m.weight for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
        weights += [m.in_proj_weight for m in model.modules() if isinstance(m, nn.MultiheadAttention)]
        weights += [p for n, p in model.named_parameters() if n.endswith(("c_attn.weight", "c_fc.weight", "c_proj.weight"))]
        for w in weights:
            out, rest = w.shape[0], w[0].numel()  # GPT-2's Conv1D stores in x out: same treatment
            k = min(out, rest)
            U, _ = torch.linalg.qr(torch.randn(out, k, generator=gen))
            V, _ = torch.linalg.qr(torch.randn(rest, k, generator=gen))
            s = decay ** torch.arange(k, dtype=torch.float32)
            new = (U * s) @ V.T
            new *= w.norm() / new.norm()
            w.copy_(new.reshape(w.shape))
    return model


class MLP(nn.Module):
    def __init__(self, d_in: int = 64, hidden: int = 128, d_out: int = 16):
        super().__init__()
        self.fc1 = nn.Linear(d_in, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, hidden)
        self.head = nn.Linear(hidden, d_out)

    def forward(self, x):
        return self.head(self.act(self.fc2(self.act(self.fc1(x)))))


class CNN(nn.Module):
    """conv(3->32) -> conv(32->64, stride 2) -> grouped conv (groups=2: unsupported) -> head."""

    def __init__(self, grouped: bool = True):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, stride=2, padding=1)
        self.conv3 = nn.Conv2d(64, 64, 3, padding=1, groups=2 if grouped else 1)
        self.head = nn.Linear(64, 10)

    def forward(self, x):
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.conv2(x))
        x = torch.relu(self.conv3(x))
        return self.head(x.mean((2, 3)))


def transformer_encoder(d_model: int = 64, nhead: int = 4, layers: int = 2) -> nn.Module:
    layer = nn.TransformerEncoderLayer(d_model, nhead, 2 * d_model, dropout=0.1, batch_first=True)
    return nn.TransformerEncoder(layer, layers, enable_nested_tensor=False).eval()


def bert(attn: str = "sdpa", hidden: int = 64, layers: int = 2):
    from transformers import BertConfig, BertModel

    cfg = BertConfig(
        vocab_size=128, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
        intermediate_size=2 * hidden, max_position_embeddings=128, attn_implementation=attn,
    )
    return BertModel(cfg).eval()


def gpt2(attn: str = "sdpa", hidden: int = 64, layers: int = 2):
    from transformers import GPT2Config, GPT2Model

    cfg = GPT2Config(
        vocab_size=128, n_embd=hidden, n_layer=layers, n_head=4, n_positions=128, attn_implementation=attn,
        bos_token_id=0, eos_token_id=0,
    )
    return GPT2Model(cfg).eval()


def passes_in_backend(model, *args, options=None, dynamic=None, **kwargs):
    """Run the panther passes inside a Dynamo backend (where Dynamo's graph metadata is live).

    Returns a list, per graph, of (ctx, dense outputs, rewritten-graph outputs), both on the
    example inputs; nothing is compiled by Inductor.
    """
    from panther.options import PantherOptions
    from panther.passes import run_passes

    opts = PantherOptions.from_dict(options or {})
    results = []

    def backend(gm, example_inputs):
        ctx = run_passes(gm, example_inputs, opts)
        with torch.no_grad():
            results.append((ctx, gm(*example_inputs), ctx.gm(*example_inputs)))
        return gm.forward

    torch.compile(model, backend=backend, dynamic=dynamic)(*args, **kwargs)
    return results


# Compiled code and an eager run of the same rewritten graph: fp32 rounding, reordered by Inductor.
COMPILED_VS_EAGER_RTOL = 1e-5
# On fresh inputs the output error may exceed the error measured on the example inputs by this factor.
PREDICTION_SLACK = 2.0


def compile_panther(model, dynamic=None, **options):
    """torch.compile with the panther backend, keeping each graph's PantherCompiled."""
    from panther.backend import panther_backend

    made = []

    def backend(gm, example_inputs):
        compiled = panther_backend(gm, example_inputs, options=options)
        made.append(compiled)
        return compiled

    return torch.compile(model, backend=backend, dynamic=dynamic), made

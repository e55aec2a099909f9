"""The compiler part of ``python -m panther demo``: ``torch.compile(model, backend="panther")``.

A small transformer encoder with an MLP head is compiled twice: dense with Inductor, and with
panther (which rewrites its layers, then hands the graph to Inductor). The demo prints the
rewrite table, parameters, output error against the dense model and time per batch, and
writes the dump folder.

Random initialization gives every weight a flat singular spectrum, which no low rank
approximates; trained weights have decaying spectra. The demo model's weights are given such
a spectrum (:func:`trained_like`) so that the rewrite's accuracy is representative.
"""

from __future__ import annotations

import time

import torch
from torch import nn

__all__ = ["DemoModel", "run_compile_demo", "trained_like"]

# (d_model, heads, layers, ffn, seq, batch) per device: seconds on a laptop CPU, a real load on a GPU.
SIZES = {"cpu": (256, 4, 2, 1024, 128, 8), "cuda": (768, 12, 4, 3072, 1024, 32)}


class DemoModel(nn.Module):
    """A transformer encoder (batch first) followed by an MLP head over the mean token."""

    def __init__(self, d_model: int = 256, heads: int = 4, layers: int = 2, ffn: int = 1024, classes: int = 10):
        super().__init__()
        layer = nn.TransformerEncoderLayer(d_model, heads, ffn, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Sequential(nn.Linear(d_model, d_model), nn.GELU(), nn.Linear(d_model, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x).mean(dim=1))


@torch.no_grad()
def trained_like(model: nn.Module, decay: float = 0.97, seed: int = 0) -> nn.Module:
    """Give every 2-D weight a decaying spectrum σᵢ ∝ decay**i (norm kept), like trained weights."""
    gen = torch.Generator().manual_seed(seed)
    for name, w in model.named_parameters():
        if w.dim() != 2:
            continue
        out, inp = w.shape
        k = min(out, inp)
        U, _ = torch.linalg.qr(torch.randn(out, k, generator=gen))
        V, _ = torch.linalg.qr(torch.randn(inp, k, generator=gen))
        new = (U * decay ** torch.arange(k, dtype=torch.float32)) @ V.T
        w.copy_((new * (w.norm() / new.norm())).to(w))
    return model


def _time(fns, x, device: torch.device, reps: int) -> list[float]:
    """Median seconds per call of each of ``fns``, calls interleaved (fair under a varying load)."""
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(reps):
        for fn, out in zip(fns, times):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t = time.perf_counter()
            fn(x)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            out.append(time.perf_counter() - t)
    return [sorted(t)[len(t) // 2] for t in times]


def run_compile_demo(device: torch.device | str = "cpu", dump_dir: str | None = "panther_dump", reps: int = 10) -> str:
    """Compile the demo model dense (Inductor) and with panther; return the printable summary.

    Args:
        device: where to run ("cpu" or "cuda").
        dump_dir: where the panther backend writes its dump (None: no dump).
        reps: timed calls per variant (the median is reported).
    """
    from panther.backend import panther_backend

    device = torch.device(device)
    d, heads, layers, ffn, seq, batch = SIZES["cuda" if device.type == "cuda" else "cpu"]
    torch.manual_seed(0)
    model = trained_like(DemoModel(d, heads, layers, ffn)).eval().to(device)
    x = torch.randn(batch, seq, d, device=device)
    options = {"dump_dir": dump_dir} if dump_dir else {}

    compiled = []

    def panther(gm, example_inputs):  # backend="panther", keeping the report to print
        compiled.append(panther_backend(gm, example_inputs, options=options))
        return compiled[-1]

    lines = [f"model: {layers}-layer transformer encoder (d={d}, {heads} heads, ffn {ffn}) + MLP head; "
             f"input {batch}x{seq}x{d} on {device}"]
    with torch.no_grad():
        dense = model(x)
        t0 = time.perf_counter()
        inductor = torch.compile(model)
        inductor(x)
        t_compile_dense = time.perf_counter() - t0
        t0 = time.perf_counter()
        sketched = torch.compile(model, backend=panther)
        y = sketched(x)
        t_compile_panther = time.perf_counter() - t0
        t_dense, t_panther = _time([inductor, sketched], x, device, reps)
        err = float((y - dense).double().norm() / dense.double().norm())

    for c in compiled:
        lines += ["", c.report.table()]
    params_before = sum(c.report.params_before for c in compiled)
    params_after = sum(c.report.params_after for c in compiled)
    predicted = max((c.report.predicted_error or 0.0) for c in compiled) if compiled else None
    lines += [
        "",
        f"parameters in the rewritten layers: {params_before:,} -> {params_after:,} "
        f"(model total {sum(p.numel() for p in model.parameters()):,})",
        f"output error vs the dense model: {err:.2e} (the report predicted {predicted:.2e})" if predicted is not None
        else f"output error vs the dense model: {err:.2e}",
        f"time per batch: dense Inductor {t_dense * 1e3:.2f} ms, panther {t_panther * 1e3:.2f} ms "
        f"(x{t_dense / t_panther:.2f}); compile {t_compile_dense:.1f} s vs {t_compile_panther:.1f} s",
    ]
    dumps = [c.dump_path for c in compiled if c.dump_path]
    if dumps:
        lines.append(f"dump: {', '.join(dumps)} (before/after code, .dot, .graphml, rewrites.json)")
    return "\n".join(lines)

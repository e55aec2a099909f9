"""GPU check of ``torch.compile(backend="panther")`` (issue 5): the test models compile and run on
CUDA, and dense Inductor vs panther time for the demo model and BertModel at batch 32, seq 512.

Through the device tool, from the repository root (the package is not installed there; the two
links give ``panther.passes`` / ``panther.kernels`` their installed names)::

    ln -s ../passes panther/passes; ln -s ../kernels panther/kernels
    PYTHONPATH=. python scripts/gpu_backend.py bert demo models

Steps run in the order given; each prints as it finishes, so a time limit keeps what was done.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time
import traceback

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "tests"))  # backend_models

from panther.backend import panther_backend  # noqa: E402
from panther.demo_compile import _time, run_compile_demo, trained_like  # noqa: E402


def compile_panther(model, **options):
    made = []

    def backend(gm, example_inputs):
        made.append(panther_backend(gm, example_inputs, options=options))
        return made[-1]

    return torch.compile(model, backend=backend), made


def rel(a, b) -> float:
    return float((a - b).double().norm() / b.double().norm())


def bert(args) -> None:
    from transformers import BertConfig, BertModel

    cfg = BertConfig(hidden_size=768, num_hidden_layers=args.bert_layers, num_attention_heads=12,
                     intermediate_size=3072, max_position_embeddings=512, attn_implementation="sdpa")
    dev = torch.device("cuda")
    model = trained_like(BertModel(cfg)).eval().to(dev)
    ids = torch.randint(0, cfg.vocab_size, (32, 512), device=dev)
    with torch.no_grad():
        dense = model(ids).last_hidden_state
        t = time.perf_counter()
        inductor = torch.compile(model)
        inductor(ids)
        t_inductor = time.perf_counter() - t
        sketched, made = compile_panther(model)
        t = time.perf_counter()
        out = sketched(ids).last_hidden_state
        t_panther = time.perf_counter() - t
        a, b = _time([inductor, sketched], ids, dev, 10)
    report = made[0].report
    print(f"BertModel ({args.bert_layers} layers, 768/12/3072), batch 32, seq 512, fp32 on {torch.cuda.get_device_name()}: "
          f"dense Inductor {a * 1e3:.2f} ms, panther {b * 1e3:.2f} ms (x{a / b:.2f}); compile {t_inductor:.0f} s / "
          f"{t_panther:.0f} s; {len(report.rewritten)}/{len(report.candidates)} rewritten, params "
          f"{report.params_before:,} -> {report.params_after:,}; output error {rel(out, dense):.2e} "
          f"(predicted {report.predicted_error})", flush=True)
    for note in report.notes:
        print("  note:", note[:300], flush=True)


def models(args) -> None:
    from backend_models import CNN, MLP, bert as small_bert, give_spectrum, gpt2, transformer_encoder

    dev = torch.device("cuda")
    ids = torch.randint(0, 128, (2, 16), device=dev)
    mask = torch.ones(2, 16, dtype=torch.long, device=dev)
    mask[1, 11:] = 0
    attention = {"min_params": 0, "require_savings": False, "num_random_features": 64}
    cases = [
        ("mlp", MLP(), (torch.randn(8, 64, device=dev),), {}, {"min_params": 0}),
        ("cnn", CNN(), (torch.randn(2, 3, 16, 16, device=dev),), {}, {"min_params": 0}),
        ("transformer-encoder", transformer_encoder(), (torch.randn(2, 16, 64, device=dev),),
         {"src_key_padding_mask": mask == 0}, {"min_params": 0}),
        ("bert", small_bert("sdpa", layers=1), (ids,), {"attention_mask": mask}, attention),
        ("gpt2", gpt2("eager", layers=1), (ids,), {}, attention),
    ]
    for name, model, a, k, options in cases:
        torch._dynamo.reset()  # each model in a fresh Dynamo state (no automatic dynamic from the last)
        try:
            model = give_spectrum(model).eval().to(dev)
            compiled, made = compile_panther(model, **options)
            with torch.no_grad():
                out, dense = compiled(*a, **k), model(*a, **k)
            out = out if isinstance(out, torch.Tensor) else out[0]
            dense = dense if isinstance(dense, torch.Tensor) else dense[0]
            r = made[0].report
            print(f"{name}: {len(r.rewritten)}/{len(r.candidates)} rewritten {sorted({c.kind for c in r.rewritten})}, "
                  f"error {rel(out, dense):.2e} (predicted {r.predicted_error})", flush=True)
        except Exception:
            print(f"{name}: FAILED\n{traceback.format_exc()[-1500:]}", flush=True)


def demo(args) -> None:
    print(run_compile_demo("cuda", "/tmp/panther_dump", reps=10), flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("steps", nargs="+", choices=["bert", "demo", "models"])
    parser.add_argument("--bert-layers", type=int, default=12)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}", flush=True)
    for step in args.steps:
        try:
            {"bert": bert, "demo": demo, "models": models}[step](args)
        except Exception:
            print(f"{step}: FAILED\n{traceback.format_exc()[-2500:]}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The accuracy part of ``python -m panther demo``: a real task, trained on the spot.

scikit-learn's bundled handwritten digits (8×8 images, offline) train a small MLP and a small
CNN in seconds on a CPU. Each is then

* compiled dense with Inductor,
* compiled with ``backend="panther"`` at the default tolerance (each rewritten layer's output
  error on the calibration batch at most 5%, with the smallest rank that achieves it), and
* converted with ``panther.convert`` and fine-tuned for one short epoch,

and the demo prints test accuracy next to parameters and time per batch. The same models and
training loop serve the end-to-end tests (``tests/digits_models.py``).
"""

from __future__ import annotations

import copy
import functools
import time

import torch
from torch import nn

from panther.demo_compile import _time

__all__ = ["digits", "accuracy", "fit", "MLP", "CNN", "train_mlp", "train_cnn", "run_digits_demo"]


@functools.lru_cache(maxsize=1)
def digits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_train, y_train, x_test, y_test): 8x8 images scaled to [0, 1], a fixed 75/25 split."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target, dtype=torch.int64)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    x, y = x[perm], y[perm]
    cut = int(0.75 * len(y))
    return x[:cut], y[:cut], x[cut:], y[cut:]


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Top-1 accuracy in percent."""
    with torch.no_grad():
        return 100.0 * float((model(x).argmax(-1) == y).float().mean())


def fit(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, lr: float = 3e-3, seed: int = 0) -> nn.Module:
    """Adam, batch 64, cross-entropy; deterministic given ``seed``."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(y), generator=g).to(y.device)
        for i in range(0, len(y), 64):
            idx = perm[i : i + 64]
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Flatten(), nn.Linear(64, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10)
        )

    def forward(self, x):
        return self.net(x)


class CNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(64 * 16, 256), nn.ReLU(), nn.Linear(256, 10))

    def forward(self, x):
        return self.head(self.features(x.unsqueeze(1)))


def _train(cls: type, epochs: int, device: torch.device | str = "cpu"):
    xtr, ytr, xte, yte = (t.to(device) for t in digits())
    with torch.random.fork_rng(devices=[]):  # the init draws from the global RNG: fenced, seeded
        torch.manual_seed(0)
        model = cls().to(device)
    return fit(model, xtr, ytr, epochs), (xtr, ytr), (xte, yte)


def train_mlp(epochs: int = 10, device: torch.device | str = "cpu"):
    """The MLP (64 → 512 → 512 → 10), trained; returns ``(model, (x_train, y_train), (x_test, y_test))``."""
    return _train(MLP, epochs, device)


def train_cnn(epochs: int = 6, device: torch.device | str = "cpu"):
    """The CNN (conv 1→16, conv 16→64, pool, 1024 → 256 → 10), trained; as :func:`train_mlp`."""
    return _train(CNN, epochs, device)


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _median_ms(fn, x, device: torch.device, reps: int) -> float:
    with torch.no_grad():
        fn(x)  # warm-up (and the compile, for compiled models)
        return 1e3 * _time([fn], x, device, reps)[0]


def run_digits_demo(device: torch.device | str = "cpu", reps: int = 20) -> str:
    """Train, compile (dense / panther), convert and fine-tune both digits models; return the summary.

    Raises:
        ImportError: scikit-learn (which ships the data set) is not installed.
    """
    import panther
    from panther.backend import panther_backend

    device = torch.device(device)
    xtr, ytr, xte, yte = (t.to(device) for t in digits())
    lines = [
        f"handwritten digits (scikit-learn, 8x8): {len(ytr)} training / {len(yte)} test images, models "
        f"trained here; panther at the default tolerance (each rewritten layer within 5% output error "
        f"on {len(yte)} training images)",
        "",
        f"{'model':<5} {'variant':<36} {'test acc':>8} {'params':>9} {'rewritten layers':>22} {'ms/batch':>9}",
    ]
    details = []
    for name, train in (("MLP", train_mlp), ("CNN", train_cnn)):
        t0 = time.perf_counter()
        model, _, _ = train(device=device)
        t_train = time.perf_counter() - t0
        calib = xtr[: len(yte)]  # as many as the test set: one compiled graph serves both
        made = []

        def backend(gm, inputs):
            made.append(panther_backend(gm, inputs))
            return made[-1]

        with torch.no_grad():
            dense = torch.compile(model)
            sketched = torch.compile(model, backend=backend)
            sketched(calib)
        report = made[0].report
        before = sum(c.params_before for c in report.rewritten)
        after = sum(c.params_after for c in report.rewritten)
        total = _params(model)
        converted = copy.deepcopy(model)
        conv_report = panther.convert(converted, calib)
        acc_converted = accuracy(converted, xte, yte)
        fit(converted, xtr, ytr, epochs=1, lr=1e-3)
        rows = [
            ("dense (torch.compile, Inductor)", accuracy(dense, xte, yte), total, "", _median_ms(dense, xte, device, reps)),
            ("backend='panther'", accuracy(sketched, xte, yte), total - before + after,
             f"{before:,} -> {after:,}", _median_ms(sketched, xte, device, reps)),
            ("panther.convert", acc_converted, _params(converted), "", None),
            ("panther.convert + 1 epoch fine-tune", accuracy(converted, xte, yte), _params(converted), "", None),
        ]
        for variant, acc, params, rw, ms in rows:
            lines.append(f"{name:<5} {variant:<36} {acc:>7.1f}% {params:>9,} {rw:>22} {'' if ms is None else f'{ms:.3f}':>9}".rstrip())
        lines.append("")
        chosen = ", ".join(
            f"{c.path} rank {c.rank} ({c.method}, error {c.measured_error:.3f} vs SVD {c.svd_error:.3f})"
            for c in report.rewritten
        )
        left = ", ".join(f"{c.path} ({c.reason_code})" for c in report.candidates if c.decision == "dense")
        details.append(f"{name} (trained in {t_train:.1f} s): rewritten {chosen}; dense: {left or 'none'}; "
                       f"converted {len(conv_report.rewritten)} layer(s)")
    return "\n".join(lines + details)

"""Small models trained on scikit-learn's bundled handwritten digits (offline), for end-to-end tests.

``train_mlp()`` and ``train_cnn()`` each train in a few seconds on CPU and return
``(model, (x_train, y_train), (x_test, y_test))`` with the model in eval mode.
"""

from __future__ import annotations

import functools

import torch
from torch import nn


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
        perm = torch.randperm(len(y), generator=g)
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


def train_mlp(epochs: int = 10):
    torch.manual_seed(0)
    xtr, ytr, xte, yte = digits()
    return fit(MLP(), xtr, ytr, epochs), (xtr, ytr), (xte, yte)


def train_cnn(epochs: int = 6):
    torch.manual_seed(0)
    xtr, ytr, xte, yte = digits()
    return fit(CNN(), xtr, ytr, epochs), (xtr, ytr), (xte, yte)

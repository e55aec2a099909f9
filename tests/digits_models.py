"""Small models trained on scikit-learn's bundled handwritten digits (offline), for end-to-end tests.

``train_mlp()`` and ``train_cnn()`` each train in a few seconds on CPU and return
``(model, (x_train, y_train), (x_test, y_test))`` with the model in eval mode. They live in
:mod:`panther.demo_digits` (``python -m panther demo`` runs the same task).
"""

from __future__ import annotations

from panther.demo_digits import CNN, MLP, accuracy, digits, fit, train_cnn, train_mlp

__all__ = ["digits", "accuracy", "fit", "MLP", "CNN", "train_mlp", "train_cnn"]

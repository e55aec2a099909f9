"""panther: sketched dense layers for PyTorch.

``import panther as pr`` gives:

* ``pr.nn`` -- explicit sketched layers (``SKLinear``, ``SKLinear_triton``, ``SKConv2d``,
  ``RandMultiHeadAttention``, ``pr.nn.pawXimpl.sinSRPE``);
* ``pr.sketch`` -- seedable sketching operators (sign, Gaussian, SRHT, count sketch, SJLT);
* ``pr.linalg`` -- low-rank factorizations (randomized SVD, data-aware);
* ``pr.explain`` / ``pr.convert`` -- what the ``torch.compile`` backend would rewrite, and the
  same rewrite as trainable modules swapped into the model;
* ``pr.ops`` -- the ``torch.ops.panther`` custom operators the layers call into.
"""

from importlib.metadata import PackageNotFoundError, version as _version

try:
    __version__ = _version("panther")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+unknown"

from . import ops  # noqa: E402  (registers torch.ops.panther.*)
from . import sketch  # noqa: E402
from . import nn  # noqa: E402
from . import linalg  # noqa: E402
from .explain import explain  # noqa: E402
from .convert import convert  # noqa: E402

__all__ = ["convert", "explain", "linalg", "nn", "ops", "sketch", "__version__"]

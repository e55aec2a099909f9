"""``torch.ops.panther``: the one door between modules/passes and kernels.

Importing this package registers the ops. Each op has a schema, a fake (meta) kernel, autograd,
and a device dispatch (Triton on CUDA where a kernel exists, the plain-PyTorch reference
elsewhere).
"""

from . import attention  # noqa: F401
from . import conv  # noqa: F401
from . import linear  # noqa: F401

__all__ = ["attention", "conv", "linear"]

r"""Seedable random sketching operators.

A sketch is a random linear map :math:`S \in \mathbb{R}^{k \times n}` that shrinks a length-``n``
axis to length ``k``. Every sketch here is scaled so that

.. math::  \mathbb{E}[S^\top S] = I_n, \qquad\text{hence}\qquad \mathbb{E}\,\|Sx\|^2 = \|x\|^2 .

* :class:`SignSketch`: i.i.d. entries :math:`\pm 1/\sqrt{k}`; dense, ``S·x`` costs O(kn).
* :class:`GaussianSketch`: i.i.d. entries :math:`\mathcal{N}(0, 1/k)`; dense, O(kn).
* :class:`SRHT`: :math:`\tfrac{1}{\sqrt{k}} P H D`, subsampled randomized Hadamard; O(n log n).
* :class:`SJLT`: ``s`` entries :math:`\pm 1/\sqrt{s}` per column (sparse sign); O(s·n).
* :class:`CountSketch`: one entry :math:`\pm 1` per column (SJLT with ``s = 1``); O(n).

Each class draws its randomness once, at construction, so the same sketch can be applied many
times; ``sketch.apply(x, dim)`` (or ``sketch(x, dim)``) applies it along any dimension of a
batched tensor without forming a dense matrix, and ``sketch.matrix()`` returns the dense
``(k, n)`` matrix for tests and small uses. Thin functions wrap the classes for one-off use:
:func:`sign_matrix` and :func:`gaussian_matrix` (with a leading batch of ``num`` independent
matrices), and :func:`srht`, :func:`count_sketch`, :func:`sjlt`, which sketch a tensor directly.
:func:`fwht` is the fast Walsh–Hadamard transform behind :class:`SRHT`.

Randomness. Every constructor takes ``generator=`` (a ``torch.Generator``; draws happen on its
device) or ``seed=`` (an int; same as ``generator=torch.Generator().manual_seed(seed)``, so a
seeded sketch is the same on every device). With neither, draws come from the global RNG of the
target device, so ``torch.manual_seed`` reproduces them. The global RNG is never reseeded, and
never touched when a generator or seed is given.
"""

from __future__ import annotations

import abc
import math
import numbers
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from panther._validation import check_dtype, check_input, check_int

__all__ = [
    "Sketch",
    "SignSketch",
    "GaussianSketch",
    "SRHT",
    "SJLT",
    "CountSketch",
    "sign_matrix",
    "gaussian_matrix",
    "srht",
    "count_sketch",
    "sjlt",
    "fwht",
]

DeviceLike = torch.device | str | int | None


# ---------------------------------------------------------------------------------------------
# Argument checks and random draws
# ---------------------------------------------------------------------------------------------


def _check_dim(dim: Any, ndim: int) -> int:
    """Return ``dim`` normalized to ``[0, ndim)``; raise TypeError/IndexError as torch does."""
    if isinstance(dim, bool) or not isinstance(dim, numbers.Integral):
        raise TypeError(f"dim must be an int, got {type(dim).__name__} ({dim!r})")
    dim = int(dim)
    if not -ndim <= dim < ndim:
        raise IndexError(f"dim must be in [{-ndim}, {ndim - 1}] for a {ndim}-D input, got {dim}")
    return dim % ndim


def _check_x(x: Any, dim: Any) -> tuple[Tensor, int]:
    """Validate a tensor to sketch along ``dim``; return it with ``dim`` made non-negative."""
    check_input("x", x, min_ndim=1)
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got dtype {x.dtype}")
    return x, _check_dim(dim, x.dim())


def _size_along(x: Tensor, dim: int) -> int:
    n = x.shape[dim]
    if n == 0:
        raise ValueError(f"x must have a nonzero size along dim {dim} to be sketched, got shape {tuple(x.shape)}")
    return n


def _rng(generator: Any, seed: Any, device: torch.device) -> tuple[torch.Generator | None, torch.device]:
    """Return the generator to draw from (None: the global RNG) and the device to draw on."""
    if generator is not None and seed is not None:
        raise ValueError("pass either generator or seed, not both")
    if seed is not None:
        seed = check_int("seed", seed, minimum=0)
        if seed >= 2**64:  # what torch.Generator.manual_seed takes
            raise ValueError(f"seed must be below 2**64, got {seed}")
        return torch.Generator().manual_seed(seed), torch.device("cpu")
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        return generator, generator.device
    return None, device


def _device(device: DeviceLike) -> torch.device:
    return torch.device(device) if device is not None else torch.get_default_device()


def _random_signs(shape: tuple[int, ...], generator: torch.Generator | None, draw_device: torch.device) -> Tensor:
    """±1 as int8 (the same bits as ``torch.randint(0, 2, shape)``)."""
    bits = torch.randint(0, 2, shape, generator=generator, device=draw_device, dtype=torch.int8)
    return bits * 2 - 1


def _distinct_rows(k: int, n: int, s: int, generator: torch.Generator | None, draw_device: torch.device) -> Tensor:
    """(n, s) int64: for each of n columns, s distinct rows drawn uniformly from range(k)."""
    if s * s <= k * k.bit_length():
        # Floyd's algorithm, vectorized over the columns: O(n·s²) time, O(n·s) memory.
        rows = torch.empty(n, s, dtype=torch.int64, device=draw_device)
        for i, j in enumerate(range(k - s, k)):
            t = torch.randint(0, j + 1, (n,), generator=generator, device=draw_device)
            taken = (rows[:, :i] == t[:, None]).any(dim=1)
            rows[:, i] = torch.where(taken, j, t)
        return rows
    # Dense columns: the first s of a random permutation of each column, O(n·k log k).
    return torch.rand(n, k, generator=generator, device=draw_device).argsort(dim=1)[:, :s]


def _dense_draw(kind: str, k: Any, n: Any, num: Any, generator, seed, device, dtype) -> Tensor:
    k, n = check_int("k", k), check_int("n", n)
    shape = (k, n) if num is None else (check_int("num", num), k, n)
    dtype = check_dtype(dtype) or torch.get_default_dtype()
    device = _device(device)
    gen, draw_device = _rng(generator, seed, device)
    if kind == "sign":
        out = _random_signs(shape, gen, draw_device).to(device=device, dtype=dtype)
    else:
        out = torch.randn(shape, generator=gen, device=draw_device, dtype=dtype).to(device)
    return out.mul_(1.0 / math.sqrt(k))


# ---------------------------------------------------------------------------------------------
# Fast Walsh–Hadamard transform
# ---------------------------------------------------------------------------------------------


def _fwht_last(x: Tensor) -> Tensor:
    """Unnormalized Walsh–Hadamard transform of the last dim (a power of two): log2(m) butterflies."""
    m = x.shape[-1]
    batch = x.shape[:-1]
    rows = math.prod(batch)
    y = x.reshape(rows, m)
    h = 1
    while h < m:
        # Pair entries whose indices differ in bit log2(h): (a, b) -> (a + b, a - b).
        y = y.reshape(rows, m // (2 * h), 2, h)
        a, b = y[:, :, 0], y[:, :, 1]
        y = torch.stack((a + b, a - b), dim=2)
        h *= 2
    return y.reshape(*batch, m)


def fwht(x: Tensor, dim: int = -1) -> Tensor:
    r"""Fast Walsh–Hadamard transform :math:`y = H_m x` along ``dim``, in O(m log m).

    :math:`H_m` is the unnormalized Sylvester–Hadamard matrix (entries ±1,
    :math:`H_1 = [1]`, :math:`H_{2m} = \begin{bmatrix} H_m & H_m \\ H_m & -H_m \end{bmatrix}`,
    so :math:`H_m^2 = m I`). Differentiable; computed in ``x``'s dtype.

    Args:
        x: floating-point tensor, any shape, whose size ``m`` along ``dim`` is a power of two.
        dim: the dimension to transform. Default: -1.

    Returns:
        A tensor of ``x``'s shape and dtype.

    Raises:
        TypeError: ``x`` is not a floating-point tensor, or ``dim`` is not an int.
        IndexError: ``dim`` is out of range.
        ValueError: ``x.shape[dim]`` is not a power of two.

    Example:
        >>> import torch
        >>> from panther.sketch import fwht
        >>> fwht(torch.tensor([1.0, 0.0, 0.0, 0.0]))
        tensor([1., 1., 1., 1.])
        >>> fwht(torch.tensor([[1.0, 2.0], [3.0, 4.0]]), dim=0)
        tensor([[ 4.,  6.],
                [-2., -2.]])
    """
    x, dim = _check_x(x, dim)
    m = x.shape[dim]
    if m == 0 or m & (m - 1):
        raise ValueError(f"fwht needs a power-of-two size along dim {dim}, got shape {tuple(x.shape)}")
    return _fwht_last(x.movedim(dim, -1)).movedim(-1, dim)


# ---------------------------------------------------------------------------------------------
# Sketch classes
# ---------------------------------------------------------------------------------------------


class Sketch(abc.ABC):
    """A fixed random linear map ``S`` of shape ``(k, n)``; base class of the sketches here.

    Subclasses draw their randomness in ``__init__`` and implement ``_apply`` and ``_matrix``.

    Attributes:
        k: sketch size (rows of ``S``).
        n: input size (columns of ``S``).
    """

    def __init__(self, k: int, n: int) -> None:
        self.k = check_int("k", k)
        self.n = check_int("n", n)

    def apply(self, x: Tensor, dim: int = -1) -> Tensor:
        """Apply ``S`` along ``dim`` of ``x``: the size-``n`` axis becomes size ``k``.

        For ``dim=-1`` this is ``x @ S.T``; for ``dim=0`` it is ``S @ x``. Batched over every
        other dimension, differentiable in ``x``, and computed in ``x``'s dtype on ``x``'s device
        (the sketch's random state is moved there if needed).

        Args:
            x: floating-point tensor with ``x.shape[dim] == n``.
            dim: the dimension to sketch. Default: -1.

        Returns:
            A tensor shaped like ``x`` with ``k`` in place of ``n`` at ``dim``.

        Raises:
            TypeError: ``x`` is not a floating-point tensor, or ``dim`` is not an int.
            IndexError: ``dim`` is out of range.
            ValueError: ``x.shape[dim] != n``.
        """
        x, dim = _check_x(x, dim)
        if x.shape[dim] != self.n:
            raise ValueError(
                f"x has size {x.shape[dim]} along dim {dim} (shape {tuple(x.shape)}), "
                f"but the sketch expects n={self.n}"
            )
        return self._apply(x, dim)

    __call__ = apply

    def matrix(self, *, dtype: torch.dtype | None = None, device: DeviceLike = None) -> Tensor:
        """The dense ``(k, n)`` matrix ``S``, such that ``self.apply(x, 0) == S @ x``.

        Args:
            dtype: floating dtype of the result. Default: the sketch's dtype for the dense
                sketches, ``torch.get_default_dtype()`` for the structured ones.
            device: device of the result. Default: the device the sketch was built on.

        For the dense sketches, this is the stored tensor itself (not a copy) when no dtype or
        device conversion is asked for.
        """
        return self._matrix(check_dtype(dtype), None if device is None else torch.device(device))

    @abc.abstractmethod
    def _apply(self, x: Tensor, dim: int) -> Tensor:
        """``S`` applied along ``dim`` of a validated ``x``."""

    @abc.abstractmethod
    def _matrix(self, dtype: torch.dtype | None, device: torch.device | None) -> Tensor:
        """The dense ``(k, n)`` matrix, converted as asked."""

    def _extra_repr(self) -> str:
        return ""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(k={self.k}, n={self.n}{self._extra_repr()})"


class _DenseSketch(Sketch):
    """A sketch stored as its dense matrix ``self._mat`` of shape (k, n)."""

    _kind = ""

    def __init__(self, k, n, *, generator=None, seed=None, device=None, dtype=None) -> None:
        super().__init__(k, n)
        self._mat = _dense_draw(self._kind, self.k, self.n, None, generator, seed, device, dtype)

    def _apply(self, x: Tensor, dim: int) -> Tensor:
        mat = self._mat.to(device=x.device, dtype=x.dtype)
        if dim == x.dim() - 1:
            return F.linear(x, mat)
        return (mat @ x.movedim(dim, -2)).movedim(-2, dim)

    def _matrix(self, dtype, device) -> Tensor:
        return self._mat.to(
            device=self._mat.device if device is None else device,
            dtype=self._mat.dtype if dtype is None else dtype,
        )


class SignSketch(_DenseSketch):
    r"""Dense sign sketch: i.i.d. entries :math:`\pm 1/\sqrt{k}` with probability 1/2 each.

    The columns have unit norm exactly, and :math:`\mathbb{E}[S^\top S] = I_n`.

    Args:
        k: sketch size (> 0).
        n: input size (> 0).
        generator: ``torch.Generator`` to draw from (on its device). Default: global RNG.
        seed: int >= 0, instead of ``generator``: draws from a fresh CPU generator with this seed.
        device: where the matrix lives. Default: ``torch.get_default_device()``.
        dtype: floating dtype of the matrix. Default: ``torch.get_default_dtype()``.

    Raises:
        TypeError, ValueError: a non-int or non-positive ``k``/``n``, a ``seed`` outside [0, 2**64), both
            ``generator`` and ``seed``, or a non-floating ``dtype``.

    Example:
        >>> import torch
        >>> from panther.sketch import SignSketch
        >>> S = SignSketch(4, 100, seed=0)
        >>> S(torch.randn(8, 100)).shape
        torch.Size([8, 4])
        >>> S.matrix().abs().unique()
        tensor([0.5000])
    """

    _kind = "sign"


class GaussianSketch(_DenseSketch):
    r"""Dense Gaussian sketch: i.i.d. entries :math:`\mathcal{N}(0, 1/k)`, so :math:`\mathbb{E}[S^\top S] = I_n`.

    Arguments and errors as for :class:`SignSketch`.

    Example:
        >>> import torch
        >>> from panther.sketch import GaussianSketch
        >>> S = GaussianSketch(16, 100, seed=0, dtype=torch.float64)
        >>> S(torch.randn(3, 100, 5, dtype=torch.float64), dim=1).shape
        torch.Size([3, 16, 5])
    """

    _kind = "gaussian"


class SRHT(Sketch):
    r"""Subsampled randomized Hadamard transform.

    With :math:`m` the smallest power of two :math:`\ge n`,

    .. math::  S = \tfrac{1}{\sqrt{k}}\, P\, H_m\, D \begin{bmatrix} I_n \\ 0 \end{bmatrix},

    where :math:`D` is a diagonal of random signs, :math:`H_m` the ±1 Sylvester–Hadamard matrix
    (see :func:`fwht`), and :math:`P` keeps ``k`` of the ``m`` rows, sampled uniformly without
    replacement (kept in increasing order). Every entry of ``S`` is :math:`\pm 1/\sqrt{k}` and
    :math:`\mathbb{E}[S^\top S] = I_n` (since :math:`\mathbb{E}[P^\top P] = \tfrac{k}{m} I_m` and
    :math:`H_m^\top H_m = m I_m`). :meth:`apply` zero-pads to ``m`` and runs the O(m log m)
    transform; no ``(k, n)`` matrix is formed.

    Args:
        k: sketch size, ``1 <= k <= m`` (rows are sampled without replacement from ``m``).
        n: input size (> 0).
        generator, seed, device: as for :class:`SignSketch` (``device`` holds the random state).

    Raises:
        TypeError, ValueError: as for :class:`SignSketch`, and ``k > m``.

    Example:
        >>> import torch
        >>> from panther.sketch import SRHT
        >>> S = SRHT(64, 1000, seed=0)
        >>> x = torch.randn(1000, 32, dtype=torch.float64)
        >>> y = S.apply(x, dim=0)
        >>> y.shape
        torch.Size([64, 32])
        >>> torch.allclose(y, S.matrix(dtype=torch.float64) @ x)
        True
    """

    def __init__(self, k: int, n: int, *, generator=None, seed=None, device: DeviceLike = None) -> None:
        super().__init__(k, n)
        self.m = 1 << (self.n - 1).bit_length()
        if self.k > self.m:
            raise ValueError(
                f"k must be <= {self.m} for SRHT with n={self.n} (n padded to a power of two; "
                f"rows are sampled without replacement), got k={self.k}"
            )
        device = _device(device)
        gen, draw_device = _rng(generator, seed, device)
        self._signs = _random_signs((self.n,), gen, draw_device).to(device)
        rows = torch.randperm(self.m, generator=gen, device=draw_device)[: self.k]
        self._rows = rows.sort().values.to(device)

    def _apply(self, x: Tensor, dim: int) -> Tensor:
        d = self._signs.to(device=x.device, dtype=x.dtype) * (1.0 / math.sqrt(self.k))
        y = x.movedim(dim, -1) * d
        if self.m > self.n:
            y = F.pad(y, (0, self.m - self.n))
        y = _fwht_last(y).index_select(-1, self._rows.to(x.device))
        return y.movedim(-1, dim)

    def _matrix(self, dtype, device) -> Tensor:
        # H_m[r, c] = (-1)^popcount(r & c) for the Sylvester ordering.
        device = self._rows.device if device is None else device
        rows = self._rows.to(device)
        both = rows[:, None] & torch.arange(self.n, device=device)[None, :]
        parity = torch.zeros_like(both)
        for bit in range(self.m.bit_length() - 1):
            parity ^= (both >> bit) & 1
        dtype = torch.get_default_dtype() if dtype is None else dtype
        d = self._signs.to(device=device, dtype=dtype) * (1.0 / math.sqrt(self.k))
        return (1 - 2 * parity).to(dtype) * d

    def _extra_repr(self) -> str:
        return f", m={self.m}"


class SJLT(Sketch):
    r"""Sparse sign sketch (sparse Johnson–Lindenstrauss transform).

    Each column of ``S`` has exactly ``s`` nonzeros, in ``s`` distinct rows drawn uniformly
    from the ``k``, with values :math:`\pm 1/\sqrt{s}` (independent signs). Columns are
    independent, each has unit norm, and :math:`\mathbb{E}[S^\top S] = I_n`. :meth:`apply`
    scatters with ``index_add`` in O(s · numel(x)); no ``(k, n)`` matrix is formed.

    Args:
        k: sketch size (> 0).
        n: input size (> 0).
        s: nonzeros per column, ``1 <= s <= k``.
        generator, seed, device: as for :class:`SignSketch` (``device`` holds the random state).

    Raises:
        TypeError, ValueError: as for :class:`SignSketch`, and ``s > k``.

    Example:
        >>> import torch
        >>> from panther.sketch import SJLT
        >>> S = SJLT(32, 1000, s=4, seed=0)
        >>> S.apply(torch.randn(2, 1000)).shape
        torch.Size([2, 32])
        >>> (S.matrix() != 0).sum(dim=0).unique()
        tensor([4])
    """

    def __init__(self, k: int, n: int, s: int, *, generator=None, seed=None, device: DeviceLike = None) -> None:
        super().__init__(k, n)
        self.s = check_int("s", s)
        if self.s > self.k:
            raise ValueError(f"s must be <= k={self.k} (nonzeros per column in distinct rows), got s={self.s}")
        device = _device(device)
        gen, draw_device = _rng(generator, seed, device)
        # (s, n): entry j of column i sits in row _rows[j, i] with sign _signs[j, i].
        self._rows = _distinct_rows(self.k, self.n, self.s, gen, draw_device).T.contiguous().to(device)
        self._signs = _random_signs((self.s, self.n), gen, draw_device).to(device)

    def _apply(self, x: Tensor, dim: int) -> Tensor:
        rows = self._rows.to(x.device)
        vals = self._signs.to(device=x.device, dtype=x.dtype) * (1.0 / math.sqrt(self.s))
        along = [1] * x.dim()
        along[dim] = self.n
        out = x.new_zeros(x.shape[:dim] + (self.k,) + x.shape[dim + 1 :])
        for j in range(self.s):
            out = out.index_add(dim, rows[j], x * vals[j].view(along))
        return out

    def _matrix(self, dtype, device) -> Tensor:
        device = self._rows.device if device is None else device
        dtype = torch.get_default_dtype() if dtype is None else dtype
        vals = self._signs.to(device=device, dtype=dtype) * (1.0 / math.sqrt(self.s))
        out = torch.zeros(self.k, self.n, dtype=dtype, device=device)
        return out.scatter_(0, self._rows.to(device), vals)

    def _extra_repr(self) -> str:
        return f", s={self.s}"


class CountSketch(SJLT):
    r"""Count sketch: each of the ``n`` coordinates goes to one of ``k`` buckets with a random sign.

    :math:`(Sx)_j = \sum_{i : h(i) = j} \sigma_i x_i` with :math:`h` uniform on ``range(k)`` and
    :math:`\sigma_i = \pm 1`; it is :class:`SJLT` with ``s = 1``. Arguments and errors as for
    :class:`SJLT`, without ``s``.

    Example:
        >>> import torch
        >>> from panther.sketch import CountSketch
        >>> S = CountSketch(3, 5, seed=0)
        >>> S.matrix().abs().sum(dim=0)
        tensor([1., 1., 1., 1., 1.])
    """

    def __init__(self, k: int, n: int, *, generator=None, seed=None, device: DeviceLike = None) -> None:
        super().__init__(k, n, 1, generator=generator, seed=seed, device=device)

    def _extra_repr(self) -> str:
        return ""


# ---------------------------------------------------------------------------------------------
# Functional forms
# ---------------------------------------------------------------------------------------------


def sign_matrix(
    k: int,
    n: int,
    *,
    num: int | None = None,
    generator: torch.Generator | None = None,
    seed: int | None = None,
    device: DeviceLike = None,
    dtype: torch.dtype | None = None,
) -> Tensor:
    r"""Random sign matrix of shape ``(k, n)``, or ``(num, k, n)``: i.i.d. entries :math:`\pm 1/\sqrt{k}`.

    :math:`\mathbb{E}[S^\top S] = I_n` for each matrix. With ``num``, the ``num`` matrices are
    independent (one draw of ``num·k·n`` signs). The signs are the bits of
    ``torch.randint(0, 2, shape)`` from the same generator, whatever ``dtype`` is.

    Args:
        k: rows (> 0); sets the scale ``1/√k``.
        n: columns (> 0).
        num: optional leading batch size (> 0). Default: None (a single matrix).
        generator, seed, device, dtype: as for :class:`SignSketch`.

    Raises:
        TypeError, ValueError: as for :class:`SignSketch`, and a non-positive ``num``.

    Example:
        >>> from panther.sketch import sign_matrix
        >>> U = sign_matrix(16, 64, num=3, seed=0)
        >>> U.shape
        torch.Size([3, 16, 64])
        >>> U.abs().unique()
        tensor([0.2500])
    """
    return _dense_draw("sign", k, n, num, generator, seed, device, dtype)


def gaussian_matrix(
    k: int,
    n: int,
    *,
    num: int | None = None,
    generator: torch.Generator | None = None,
    seed: int | None = None,
    device: DeviceLike = None,
    dtype: torch.dtype | None = None,
) -> Tensor:
    r"""Gaussian matrix of shape ``(k, n)``, or ``(num, k, n)``: i.i.d. entries :math:`\mathcal{N}(0, 1/k)`.

    Arguments and errors as for :func:`sign_matrix`.

    Example:
        >>> from panther.sketch import gaussian_matrix
        >>> gaussian_matrix(8, 32, seed=0).shape
        torch.Size([8, 32])
    """
    return _dense_draw("gaussian", k, n, num, generator, seed, device, dtype)


def srht(x: Tensor, k: int, dim: int = -1, *, generator=None, seed=None) -> Tensor:
    """Sketch ``x`` along ``dim`` with a fresh :class:`SRHT` of size ``k``.

    Same as ``SRHT(k, x.shape[dim], generator=generator, seed=seed, device=x.device).apply(x, dim)``;
    see :class:`SRHT` and :meth:`Sketch.apply` for the math, shapes and errors.

    Example:
        >>> import torch
        >>> from panther.sketch import srht
        >>> srht(torch.randn(4, 100, 7), 16, dim=1, seed=0).shape
        torch.Size([4, 16, 7])
    """
    x, dim = _check_x(x, dim)
    return SRHT(k, _size_along(x, dim), generator=generator, seed=seed, device=x.device)._apply(x, dim)


def count_sketch(x: Tensor, k: int, dim: int = -1, *, generator=None, seed=None) -> Tensor:
    """Sketch ``x`` along ``dim`` with a fresh :class:`CountSketch` of size ``k``.

    Same as ``CountSketch(k, x.shape[dim], ..., device=x.device).apply(x, dim)``.

    Example:
        >>> import torch
        >>> from panther.sketch import count_sketch
        >>> count_sketch(torch.randn(100, 3), 10, dim=0, seed=0).shape
        torch.Size([10, 3])
    """
    x, dim = _check_x(x, dim)
    return CountSketch(k, _size_along(x, dim), generator=generator, seed=seed, device=x.device)._apply(x, dim)


def sjlt(x: Tensor, k: int, s: int, dim: int = -1, *, generator=None, seed=None) -> Tensor:
    """Sketch ``x`` along ``dim`` with a fresh :class:`SJLT` of size ``k`` and ``s`` nonzeros per column.

    Same as ``SJLT(k, x.shape[dim], s, ..., device=x.device).apply(x, dim)``.

    Example:
        >>> import torch
        >>> from panther.sketch import sjlt
        >>> sjlt(torch.randn(5, 200), 20, 3, seed=0).shape
        torch.Size([5, 20])
    """
    x, dim = _check_x(x, dim)
    return SJLT(k, _size_along(x, dim), s, generator=generator, seed=seed, device=x.device)._apply(x, dim)

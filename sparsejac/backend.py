"""The few array operations the writers need, for numpy and for torch (CPU or GPU).

One implementation of the closed form (:mod:`sparsejac.structure`, :mod:`sparsejac.formats`)
serves both: it calls these methods instead of ``numpy`` directly. The numpy backend writes
large arrays in slabs on a few threads; the torch backend runs where its tensors live (a CUDA
device writes in parallel by itself), so the structure and values of a Jacobian of CUDA
operands are built on the GPU with no round trip through the host.

>>> NUMPY.arange(3, NUMPY.index(4)).tolist()
[0, 1, 2]
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterator, Sequence

import numpy as np

# Writing nnz-sized arrays is memory-bound; numpy releases the GIL in copies and ufuncs, so
# splitting one write into contiguous slabs on a few threads uses every core's bandwidth (and
# spreads the page faults of fresh allocations).
_CPUS = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
THREADS = max(1, min(_CPUS, 8))
SLAB_BYTES = 16 << 20
_pool: ThreadPoolExecutor | None = None


def slabs(shape: tuple[int, ...], pieces: int) -> Iterator[tuple]:
    """Basic-slicing indexes that cut a C-ordered array of ``shape`` into about ``pieces``
    contiguous blocks (so the same index on a broadcast source is a view too)."""
    lead = 0
    while lead < len(shape) and math.prod(shape[: lead + 1]) < pieces:
        lead += 1
    if lead == len(shape):
        yield (Ellipsis,)  # the whole array, as a view even when 0-d
        return
    outer = shape[:lead]
    n = shape[lead]
    cuts = max(1, min(n, -(-pieces // max(math.prod(outer), 1))))
    bounds = [n * c // cuts for c in range(cuts + 1)]
    for head in np.ndindex(*outer):
        for a, b in zip(bounds[:-1], bounds[1:]):
            if b > a:
                yield head + (slice(a, b),)


def broadcast_base(x: np.ndarray) -> np.ndarray:
    """``x`` with its broadcast (zero-stride) dimensions cut to length 1: the data it holds,
    from which ``np.broadcast_to(base, x.shape)`` gives ``x`` back.

    >>> broadcast_base(np.broadcast_to(np.arange(3.0), (1000, 3))).shape
    (1, 3)
    """
    return x[tuple(slice(0, 1) if st == 0 and n > 1 else slice(None)
                   for st, n in zip(x.strides, x.shape))]


class NumpyBackend:
    """numpy arrays on the host; large writes split across threads."""

    name = "numpy"

    def index(self, itemsize: int) -> np.dtype:
        return np.dtype(np.int32 if itemsize == 4 else np.int64)

    def empty(self, shape, dtype) -> np.ndarray:
        return np.empty(shape, dtype=dtype)

    def zeros(self, shape, dtype) -> np.ndarray:
        return np.zeros(shape, dtype=dtype)

    def ones(self, shape, dtype) -> np.ndarray:
        return np.ones(shape, dtype=dtype)

    def arange(self, n: int, dtype) -> np.ndarray:
        return np.arange(n, dtype=dtype)

    def cumsum(self, x: np.ndarray, dtype) -> np.ndarray:
        return np.cumsum(x, dtype=dtype)

    def cumsum_(self, x: np.ndarray) -> np.ndarray:
        """The running sum of ``x``, written over ``x`` (no temporary)."""
        return np.cumsum(x, out=x)

    def scale_(self, x: np.ndarray, k: int) -> np.ndarray:
        """``x * k``, written over ``x`` (no temporary)."""
        return np.multiply(x, k, out=x)

    def permute(self, x: np.ndarray, order: Sequence[int]) -> np.ndarray:
        return np.transpose(x, order)

    def contiguous(self, x: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(x)

    def broadcast_to(self, x: np.ndarray, shape) -> np.ndarray:
        return np.broadcast_to(x, shape)

    def flat(self, x: np.ndarray) -> np.ndarray:
        return np.reshape(x, -1)

    def einsum(self, *args) -> np.ndarray:
        return np.einsum(*args, optimize=len(args) >= 5)  # two or more operands

    def cast(self, x: Any, dtype) -> np.ndarray:
        return np.asarray(x, dtype=dtype)

    def strides(self, x: np.ndarray) -> tuple[int, ...]:
        return np.asarray(x).strides

    def write(self, out: np.ndarray, write: Callable[[tuple], None]) -> None:
        """Call ``write(index)`` for slabs covering ``out`` (C-contiguous), on a few threads."""
        global _pool
        pieces = out.nbytes // SLAB_BYTES
        if THREADS == 1 or pieces < 2:
            write((Ellipsis,))
            return
        if _pool is None:
            _pool = ThreadPoolExecutor(THREADS, thread_name_prefix="sparsejac")
        for future in [_pool.submit(write, index) for index in slabs(out.shape, pieces)]:
            future.result()

    def copy_into(self, out: np.ndarray, source: np.ndarray) -> None:
        source = np.broadcast_to(source, out.shape)
        self.write(out, lambda at: np.copyto(out[at], source[at]))

    def add_into(self, out: np.ndarray, a: np.ndarray, b: np.ndarray) -> None:
        a, b = np.broadcast_arrays(a, b)
        self.write(out, lambda at: np.add(a[at], b[at], out=out[at]))


class TorchBackend:
    """torch tensors on one device (CPU or CUDA)."""

    name = "torch"

    def __init__(self, device: Any) -> None:
        import torch

        self.torch = torch
        self.device = device

    def index(self, itemsize: int):
        return self.torch.int32 if itemsize == 4 else self.torch.int64

    def empty(self, shape, dtype):
        return self.torch.empty(shape, dtype=dtype, device=self.device)

    def zeros(self, shape, dtype):
        return self.torch.zeros(shape, dtype=dtype, device=self.device)

    def ones(self, shape, dtype):
        return self.torch.ones(shape, dtype=dtype, device=self.device)

    def arange(self, n: int, dtype):
        return self.torch.arange(n, dtype=dtype, device=self.device)

    def cumsum(self, x, dtype):
        return self.torch.cumsum(x, 0, dtype=dtype)

    def cumsum_(self, x):
        return x.cumsum_(0)

    def scale_(self, x, k: int):
        return x.mul_(k)

    def permute(self, x, order: Sequence[int]):
        return x.permute(*order) if x.dim() else x

    def contiguous(self, x):
        return x.contiguous()

    def broadcast_to(self, x, shape):
        return self.torch.broadcast_to(x, tuple(shape))

    def flat(self, x):
        return x.reshape(-1)

    def einsum(self, *args):
        return self.torch.einsum(*args)

    def cast(self, x, dtype):
        return x.to(device=self.device, dtype=dtype)

    def strides(self, x) -> tuple[int, ...]:
        return tuple(x.stride())

    def copy_into(self, out, source) -> None:
        out.copy_(self.torch.broadcast_to(source, out.shape))

    def add_into(self, out, a, b) -> None:
        self.torch.add(a, b, out=out)


NUMPY = NumpyBackend()


def torch_dtype(dtype: np.dtype, prefix: str = ""):
    """The torch dtype of a numpy dtype (``OperandTypeError`` where torch has none)."""
    import torch

    try:
        return torch.from_numpy(np.empty(0, dtype=dtype)).dtype
    except TypeError:
        from .errors import OperandTypeError

        raise OperandTypeError(
            f"{prefix}the result dtype {np.dtype(dtype)} has no torch equivalent; "
            "use a torch-supported dtype for the torch formats"
        ) from None

"""Turning what users pass as operands into numpy arrays, and choosing the result dtype.

Accepted: numpy arrays (read-only and zero-stride views too, never copied), anything
``numpy.asarray`` accepts, and torch tensors (detached; a GPU tensor is copied to the host;
torch dtypes numpy lacks are upcast exactly: bfloat16 and the float8 kinds to float32, complex32
to complex64; a meta tensor, which holds no data, is refused).
Numeric means integer, floating or complex; booleans, strings and objects are refused.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from .backend import broadcast_base
from .errors import OperandTypeError, context

NUMERIC_KINDS = "iufc"


def is_torch_tensor(x: Any) -> bool:
    """True for a torch tensor, without importing torch."""
    return type(x).__module__.startswith("torch") and hasattr(x, "detach")


def as_array(x: Any, index: int, subscripts: str) -> np.ndarray:
    """Operand ``index`` as a numeric numpy array (no copy where none is needed)."""
    if is_torch_tensor(x):
        import torch

        t = x.detach()
        if t.layout != torch.strided:
            raise OperandTypeError(
                f"{context(subscripts)}operand {index} is a torch tensor with layout "
                f"{t.layout}; pass a dense (strided) tensor"
            )
        if t.device.type == "meta":
            raise OperandTypeError(
                f"{context(subscripts)}operand {index} is a torch tensor on the meta device, "
                "which holds no values; pass a tensor with data"
            )
        if t.device.type != "cpu":
            t = t.cpu()
        if numpy_dtype(t.dtype) is None:
            # numpy has no such dtype (bfloat16, float8 kinds, complex32): upcast exactly.
            if t.is_complex():
                t = t.to(torch.complex64)
            elif t.is_floating_point():
                t = t.to(torch.float32)
            else:
                raise OperandTypeError(
                    f"{context(subscripts)}operand {index} has torch dtype {t.dtype}, which has "
                    "no numeric numpy equivalent"
                )
        t = t.resolve_conj().resolve_neg()
        x = t.numpy()
    module = type(x).__module__
    if module.startswith(("sparse", "scipy.sparse")) or hasattr(x, "tocsr"):
        raise OperandTypeError(
            f"{context(subscripts)}operand {index} is a sparse array ({type(x).__name__}); "
            "pass a dense array (the operands of an einsum are dense here)"
        )
    try:
        array = np.asarray(x)
    except (ValueError, TypeError) as error:
        raise OperandTypeError(
            f"{context(subscripts)}operand {index} cannot be read as an array: {error}"
        ) from None
    if array.dtype.kind not in NUMERIC_KINDS:
        raise OperandTypeError(
            f"{context(subscripts)}operand {index} has dtype {array.dtype}; expected a numeric "
            "(integer, floating or complex) array"
        )
    return array


def as_arrays(operands: Sequence[Any], subscripts: str) -> list[np.ndarray]:
    return [as_array(x, i, subscripts) for i, x in enumerate(operands)]


def result_dtype(arrays: Sequence[np.ndarray]) -> np.dtype:
    """numpy's einsum result dtype for these operands."""
    return np.result_type(*arrays)


def cuda_device(operands: Sequence[Any]):
    """The device of the first CUDA tensor among ``operands``, or None."""
    for x in operands:
        if is_torch_tensor(x) and x.device.type == "cuda":
            return x.device
    return None


def as_tensors(operands: Sequence[Any], device: Any, subscripts: str):
    """Operands as detached torch tensors on ``device``, and the numpy dtype of the result.

    Tensors already there in a numeric dtype are not copied; anything else goes through
    :func:`as_array` (the same checks and messages) and is moved to ``device``.
    """
    import torch

    tensors, dtypes = [], []
    for i, x in enumerate(operands):
        kind = numpy_dtype(x.dtype) if is_torch_tensor(x) and x.layout == torch.strided else None
        if kind is not None and kind.kind in NUMERIC_KINDS:
            tensors.append(x.detach().resolve_conj().resolve_neg().to(device))
        else:
            array = as_array(x, i, subscripts)
            # Only the data a broadcast array holds travels; the device re-broadcasts it.
            base = torch.from_numpy(np.array(broadcast_base(array), order="C"))
            tensors.append(base.to(device).expand(array.shape))
            kind = array.dtype
        dtypes.append(kind)
    return tensors, np.result_type(*dtypes)


def numpy_dtype(torch_dtype) -> np.dtype | None:
    import torch

    try:
        return torch.empty(0, dtype=torch_dtype).numpy().dtype
    except (TypeError, RuntimeError):  # bfloat16, float8, complex32...: no numpy twin
        return None

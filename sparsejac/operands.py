"""Turning what users pass as operands into numpy arrays, and choosing the result dtype.

Accepted: numpy arrays (read-only and zero-stride views too, never copied), anything
``numpy.asarray`` accepts, and torch tensors (detached; a GPU tensor is copied to the host).
Numeric means integer, floating or complex; booleans, strings and objects are refused.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

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
        if t.device.type != "cpu":
            t = t.cpu()
        if t.dtype in (torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2):
            t = t.to(torch.float32)  # numpy has no such dtype; float32 holds it exactly
        t = t.resolve_conj().resolve_neg()
        x = t.numpy()
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

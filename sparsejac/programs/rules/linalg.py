"""Linear algebra: einsum, the matmul family, linear layers. Each is an einsum of its operands,
so each rule is the product rule over one einsum (:func:`sums.einsum`)."""

from __future__ import annotations

import string

import torch

from ...errors import UnsupportedOperationError
from .. import sums as S
from ..registry import rule
from ..second import bilinear as second_einsum
from ..tracer import PREFIX


@rule("einsum", "equation *operands",
      second=second_einsum(lambda equation, operands: (equation, operands)))
def einsum(cx, result, equation, operands):
    if not isinstance(equation, str):
        raise UnsupportedOperationError(f"{PREFIX}einsum: only the string form is supported")
    return S.einsum(cx, result, equation, operands)


def matmul_spec(na: int, nb: int) -> str:
    """torch.matmul (and mm, bmm, mv, dot): a 1-D operand is a vector, batches broadcast."""
    if na == 1 and nb == 1:
        return "i,i->"
    if nb == 1:
        return "...ij,j->...i"
    if na == 1:
        return "j,...jk->...k"
    return "...ij,...jk->...ik"


def inner_spec(na: int, nb: int) -> str:
    """torch.inner: the last axes contracted, the output ``a.shape[:-1] + b.shape[:-1]``."""
    letters = string.ascii_letters
    if na == 0 or nb == 0:
        both = letters[: na + nb]
        return f"{both[:na]},{both[:nb]}->{both}"
    la, lb, k = letters[: na - 1], letters[na - 1 : na + nb - 2], letters[na + nb - 2]
    return f"{la}{k},{lb}{k}->{la}{lb}"


def _matmul_of(a, b):
    return matmul_spec(a.dim(), b.dim()), (a, b)


@rule(("matmul", "__matmul__"), "input other",
      second=second_einsum(lambda input, other: _matmul_of(input, other)))
def matmul(cx, result, input, other):
    return S.einsum(cx, result, matmul_spec(input.dim(), other.dim()), (input, other))


@rule("__rmatmul__", "other input",
      second=second_einsum(lambda other, input: _matmul_of(input, other)))
def rmatmul(cx, result, other, input):
    return matmul(cx, result, input, other)


@rule(("mm", "bmm"), "input mat2", second=second_einsum(lambda input, mat2: _matmul_of(input, mat2)))
def mm(cx, result, input, mat2):
    return matmul(cx, result, input, mat2)


@rule("mv", "input vec", second=second_einsum(lambda input, vec: _matmul_of(input, vec)))
def mv(cx, result, input, vec):
    return matmul(cx, result, input, vec)


@rule("dot", "input tensor", second=second_einsum(lambda input, tensor: _matmul_of(input, tensor)))
def dot(cx, result, input, tensor):
    return matmul(cx, result, input, tensor)


@rule("inner", "input other", second=second_einsum(
    lambda input, other: (inner_spec(input.dim(), other.dim()), (input, other))))
def inner(cx, result, input, other):
    input, other = S.value(input, result), S.value(other, result)
    return S.einsum(cx, result, inner_spec(input.dim(), other.dim()), (input, other))


@rule(("outer", "ger"), "input vec2",
      second=second_einsum(lambda input, vec2: ("i,j->ij", (input, vec2))))
def outer(cx, result, input, vec2):
    return S.einsum(cx, result, "i,j->ij", (input, vec2))


def _linear_spec(weight):
    return "...i,oi->...o" if weight.dim() == 2 else "...i,i->..."


@rule("linear", "input weight bias=None", second=second_einsum(
    lambda input, weight, bias: (_linear_spec(weight), (input, weight))))
def linear(cx, result, input, weight, bias):
    # weight (out, in), or (in,) for a single output (no output axis)
    lin = S.einsum(cx, result, _linear_spec(weight), (input, weight))
    if bias is None:
        return lin
    return S.add(cx, lin, S.broadcast(cx, bias, tuple(result.shape)))


@rule("bilinear", "input1 input2 weight bias=None", second=second_einsum(
    lambda input1, input2, weight, bias: ("...i,...j,oij->...o", (input1, input2, weight))))
def bilinear(cx, result, input1, input2, weight, bias):
    lin = S.einsum(cx, result, "...i,...j,oij->...o", (input1, input2, weight))
    if bias is None:
        return lin
    return S.add(cx, lin, S.broadcast(cx, bias, tuple(result.shape)))


def _addmm_of(input, mat1, mat2, beta, alpha):
    return "ij,jk,->ik", (mat1, mat2, torch.tensor(float(alpha), dtype=mat1.dtype))


@rule(("addmm",), "input mat1 mat2 beta=1 alpha=1", second=second_einsum(_addmm_of))
def addmm(cx, result, input, mat1, mat2, beta, alpha):
    prod = S.times(cx, S.einsum(cx, None, "ij,jk->ik", (mat1, mat2)), alpha)
    return S.add(cx, prod, S.times(cx, S.broadcast(cx, input, tuple(result.shape)), beta))

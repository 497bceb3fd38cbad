"""Linear algebra: einsum, the matmul family (``addmm``, ``addmv``, ``baddbmm``, ``addbmm``,
``tensordot``, ``linalg.multi_dot``), linear layers. Each is an einsum of its operands, so each
rule is the product rule over one einsum (:func:`sums.einsum`)."""

from __future__ import annotations

import string

import torch

from ...errors import UnsupportedOperationError
from .. import sums as S
from ..registry import decomposition, rule
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



def _scaled(cx, result, input, spec, a, b, beta, alpha):
    """``beta * input + alpha * einsum(spec, a, b)`` (the addmm family): torch's derivative of
    ``input`` is ``beta`` times the identity, zero where ``beta`` is 0."""
    prod = S.times(cx, S.einsum(cx, None, spec, (a, b)), alpha)
    return S.add(cx, prod, S.times(cx, S.broadcast(cx, input, tuple(result.shape)), beta))


def _alpha_of(spec):
    left, out = spec.split("->")
    return lambda input, a, b, beta, alpha: (
        f"{left},->{out}", (a, b, torch.tensor(float(alpha), dtype=a.dtype)))


@rule("addmv", "input mat vec beta=1 alpha=1", second=second_einsum(
    lambda input, mat, vec, beta, alpha: _alpha_of("ij,j->i")(input, mat, vec, beta, alpha)))
def addmv(cx, result, input, mat, vec, beta, alpha):
    return _scaled(cx, result, input, "ij,j->i", mat, vec, beta, alpha)


@rule("baddbmm", "input batch1 batch2 beta=1 alpha=1", second=second_einsum(
    lambda input, batch1, batch2, beta, alpha: _alpha_of("bij,bjk->bik")(
        input, batch1, batch2, beta, alpha)))
def baddbmm(cx, result, input, batch1, batch2, beta, alpha):
    return _scaled(cx, result, input, "bij,bjk->bik", batch1, batch2, beta, alpha)


@rule("addbmm", "input batch1 batch2 beta=1 alpha=1", second=second_einsum(
    lambda input, batch1, batch2, beta, alpha: _alpha_of("bij,bjk->ik")(
        input, batch1, batch2, beta, alpha)))
def addbmm(cx, result, input, batch1, batch2, beta, alpha):
    return _scaled(cx, result, input, "bij,bjk->ik", batch1, batch2, beta, alpha)


def tensordot_spec(na: int, nb: int, dims) -> str:
    """torch.tensordot's contraction as an einsum: ``dims`` an int (the last ``dims`` axes of
    ``a`` with the first of ``b``), a pair of axis lists, or a tensor holding either."""
    if isinstance(dims, torch.Tensor):
        dims = dims.tolist()
    if isinstance(dims, int):
        if dims < 0:
            raise UnsupportedOperationError(f"{PREFIX}'tensordot' with dims={dims}")
        da, db = list(range(na - dims, na)), list(range(dims))
    else:
        da, db = dims
        da = [da] if isinstance(da, int) else list(da)
        db = [db] if isinstance(db, int) else list(db)
    da, db = [d % na for d in da], [d % nb for d in db]
    letters = iter(string.ascii_letters)
    la = [next(letters) for _ in range(na)]
    lb = [next(letters) for _ in range(nb)]
    for i, j in zip(da, db):
        lb[j] = la[i]
    out = [la[i] for i in range(na) if i not in da] + [lb[j] for j in range(nb) if j not in db]
    return f"{''.join(la)},{''.join(lb)}->{''.join(out)}"


def _tensordot_of(a, b, dims, out):
    return tensordot_spec(a.dim(), b.dim(), dims), (a, b)


@rule("tensordot", "a b dims=2 out=None", traced="a b", second=second_einsum(_tensordot_of))
def tensordot(cx, result, a, b, dims, out):
    return S.einsum(cx, result, *_tensordot_of(a, b, dims, out))


@decomposition("linalg_multi_dot", "tensors out=None", traced="tensors")
def multi_dot(tensors, out):
    """A chain of matrix products (a 1-D first or last operand a row or a column vector)."""
    if len(tensors) < 2:
        raise UnsupportedOperationError(f"{PREFIX}'linalg.multi_dot' takes at least 2 tensors")
    first, last = tensors[0], tensors[-1]
    chain = list(tensors)
    if first.dim() == 1:
        chain[0] = first.unsqueeze(0)
    if last.dim() == 1:
        chain[-1] = last.unsqueeze(-1)
    y = chain[0]
    for m in chain[1:]:
        y = y @ m
    if last.dim() == 1:
        y = y.squeeze(-1)
    if first.dim() == 1:
        y = y.squeeze(0)
    return y

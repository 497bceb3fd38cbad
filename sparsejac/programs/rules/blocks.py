"""Operations dense within a small block: linear algebra on batches of small matrices
(``linalg.solve``, ``inv``, ``det``, ``slogdet``, ``cholesky``, ``matrix_exp``, ``eigvalsh``,
``pinv``, ``lu_solve``, ``householder_product``, ``ormqr``, ...). Each batch entry's output
depends on all of that entry's input and on no other, so the Jacobian is one dense block per
batch entry: a factor over the batch letters, read from torch's own derivative of one entry
(``torch.func.jacrev``, vectorised over the batch by ``torch.func.vmap``), so its kinks and
conventions are torch's. ``tensorinv``, ``tensorsolve`` and ``cond`` are written with these
rules, as torch writes them.
"""

from __future__ import annotations

import math
import string

import torch

from ...errors import UnsupportedOperationError
from .. import sums as S
from ..registry import decomposition, rule
from ..tracer import PREFIX


def _vector_rhs(a: torch.Tensor, b: torch.Tensor) -> bool:
    """torch.linalg.solve reads ``B`` as a batch of vectors where it is one dimension short."""
    return b.dim() == 1 or (b.dim() == a.dim() - 1 and b.shape == a.shape[:-1])


def blocked(cx, result, inputs, cores, out_core, fn):
    """The terms of ``result = fn(*inputs)`` (one differentiable output, batched over the
    leading dimensions that the inputs broadcast to): ``cores[k]`` trailing dimensions of input
    ``k`` are its core, ``out_core`` those of the result."""
    out = result if isinstance(result, torch.Tensor) else result[0]
    batch = tuple(out.shape[:out.dim() - out_core])
    nb = math.prod(batch)
    flat = []
    for x, c in zip(inputs, cores):
        core = tuple(x.shape[x.dim() - c:]) if c else ()
        # contiguous: vmapped over a strided batch, some kernels read other entries' data
        # (torch 2.13: linalg.lu_solve of lu_factor's column-major batch of factors)
        flat.append(x.detach().expand(batch + core).reshape((nb,) + core).contiguous())
    parts = []
    letters = iter(string.ascii_letters)
    bl = "".join(next(letters) for _ in batch)
    ol = "".join(next(letters) for _ in range(out_core))
    for k, (x, c) in enumerate(zip(inputs, cores)):
        if not isinstance(x, torch.Tensor) or cx.terms(x) is None:
            continue
        il = "".join(next(letters) for _ in range(c))
        size = nb * math.prod(out.shape[out.dim() - out_core:]) * math.prod(
            x.shape[x.dim() - c:])
        cx.labels.guard((size,), out.element_size(), "the dense blocks of a batched operation")
        if nb:
            # with grad mode on: under no_grad, vmap over jacrev of some linear algebra kernels
            # gives other batch entries' blocks wrong (torch 2.13, linalg.det)
            with torch.enable_grad():
                block = torch.func.vmap(torch.func.jacrev(fn, argnums=k))(*flat)
        else:
            block = torch.zeros((0,) + tuple(out.shape[out.dim() - out_core:])
                                + tuple(x.shape[x.dim() - c:]), dtype=out.dtype)
        block = block.reshape(batch + tuple(block.shape[1:]))
        xl = bl[len(bl) - (x.dim() - c):] if x.dim() - c else ""
        spec = f"{bl}{ol}{il},{xl}{il}->{bl}{ol}"
        parts.append(S.einsum(cx, out, spec, (block, x)))
    terms = S.add(cx, *parts)
    return terms if isinstance(result, torch.Tensor) else [terms] + [None] * (len(result) - 1)


def _square(name, a):
    if a.dim() < 2 or a.shape[-1] != a.shape[-2]:
        raise UnsupportedOperationError(f"{PREFIX}{name!r} takes square matrices")


@rule(("linalg_inv", "inverse"), "input")
def inv(cx, result, input):
    return blocked(cx, result, (input,), (2,), 2, torch.linalg.inv)


@rule("linalg_solve", "input other left=True", traced="input other")
def solve(cx, result, input, other, left):
    vector = _vector_rhs(input, other)
    return blocked(cx, result, (input, other), (2, 1 if vector else 2), 1 if vector else 2,
                   lambda a, b: torch.linalg.solve(a, b, left=left))


@rule(("linalg_det", "det"), "input")
def det(cx, result, input):
    return blocked(cx, result, (input,), (2,), 0, torch.linalg.det)


@rule("logdet", "input")
def logdet(cx, result, input):
    return blocked(cx, result, (input,), (2,), 0, torch.logdet)


@rule(("linalg_slogdet", "slogdet"), "input")
def slogdet(cx, result, input):  # the sign is piecewise constant: only the log carries terms
    terms = blocked(cx, result[1], (input,), (2,), 0, lambda a: torch.linalg.slogdet(a)[1])
    return [None, terms]


@rule(("linalg_cholesky",), "input upper=False")
def cholesky(cx, result, input, upper):
    return blocked(cx, result, (input,), (2,), 2, lambda a: torch.linalg.cholesky(a, upper=upper))


@rule(("cholesky",), "input upper=False")
def cholesky_legacy(cx, result, input, upper):
    return blocked(cx, result, (input,), (2,), 2, lambda a: torch.cholesky(a, upper=upper))


@rule(("linalg_matrix_exp", "matrix_exp"), "input")
def matrix_exp(cx, result, input):
    return blocked(cx, result, (input,), (2,), 2, torch.linalg.matrix_exp)


@rule("linalg_eigvalsh", "input UPLO='L'")
def eigvalsh(cx, result, input, UPLO):
    return blocked(cx, result, (input,), (2,), 1, lambda a: torch.linalg.eigvalsh(a, UPLO))


@rule("linalg_matrix_power", "input n")
def matrix_power(cx, result, input, n):
    return blocked(cx, result, (input,), (2,), 2, lambda a: torch.linalg.matrix_power(a, n))


@rule("matrix_power", "input n")
def matrix_power_legacy(cx, result, input, n):
    return blocked(cx, result, (input,), (2,), 2, lambda a: torch.matrix_power(a, n))


@rule("linalg_solve_triangular", "input B upper left=True unitriangular=False",
      traced="input B")
def solve_triangular(cx, result, input, B, upper, left, unitriangular):
    return blocked(cx, result, (input, B), (2, 2), 2, lambda a, b: torch.linalg.solve_triangular(
        a, b, upper=upper, left=left, unitriangular=unitriangular))


@rule("cholesky_solve", "input input2 upper=False", traced="input input2")
def cholesky_solve(cx, result, input, input2, upper):
    return blocked(cx, result, (input, input2), (2, 2), 2,
                   lambda b, u: torch.cholesky_solve(b, u, upper=upper))


@rule("cholesky_inverse", "input upper=False")
def cholesky_inverse(cx, result, input, upper):
    return blocked(cx, result, (input,), (2,), 2, lambda a: torch.cholesky_inverse(a, upper))


@rule(("linalg_pinv", "pinverse"), "input rcond=None hermitian=False atol=None rtol=None")
def pinv(cx, result, input, rcond, hermitian, atol, rtol):
    def one(a):
        if rcond is not None:
            return torch.linalg.pinv(a, rcond=rcond, hermitian=hermitian)
        return torch.linalg.pinv(a, atol=atol, rtol=rtol, hermitian=hermitian)

    return blocked(cx, result, (input,), (2,), 2, one)


@rule("linalg_svdvals", "A driver=None")
def svdvals(cx, result, A, driver):
    return blocked(cx, result, (A,), (2,), 1, lambda a: torch.linalg.svdvals(a, driver=driver))


@rule("lu_solve", "input LU_data LU_pivots", traced="input LU_data")
def lu_solve_legacy(cx, result, input, LU_data, LU_pivots):
    # the pivots are integers: an operand of each block, never differentiated
    return blocked(cx, result, (input, LU_data, LU_pivots), (2, 2, 1), 2, torch.lu_solve)


@rule("linalg_lu_solve", "LU pivots B left=True adjoint=False", traced="LU B")
def lu_solve(cx, result, LU, pivots, B, left, adjoint):
    return blocked(cx, result, (LU, pivots, B), (2, 1, 2), 2,
                   lambda lu, p, b: torch.linalg.lu_solve(lu, p, b, left=left, adjoint=adjoint))


@rule(("linalg_householder_product", "orgqr"), "input tau", traced="input tau")
def householder_product(cx, result, input, tau):
    return blocked(cx, result, (input, tau), (2, 1), 2, torch.linalg.householder_product)


@rule("ormqr", "input input2 input3 left=True transpose=False", traced="input input2 input3")
def ormqr(cx, result, input, input2, input3, left, transpose):
    return blocked(cx, result, (input, input2, input3), (2, 1, 2), 2,
                   lambda a, t, c: torch.ormqr(a, t, c, left=left, transpose=transpose))


# --- written with the rules above, as torch's own implementations are (LinearAlgebra.cpp) ---

@decomposition("linalg_tensorinv", "input ind=2")
def tensorinv(input, ind):
    if ind <= 0:
        raise UnsupportedOperationError(f"{PREFIX}'linalg.tensorinv' with ind={ind}")
    head, tail = tuple(input.shape[:ind]), tuple(input.shape[ind:])
    n = math.prod(tail)
    if math.prod(head) != n:
        raise UnsupportedOperationError(
            f"{PREFIX}'linalg.tensorinv': shape {tuple(input.shape)} with ind={ind} is not a "
            "square matrix")
    return torch.linalg.inv(input.reshape(n, n)).reshape(tail + head)


@decomposition("linalg_tensorsolve", "A B dims=None", traced="A B")
def tensorsolve(A, B, dims):
    if dims is not None:
        dims = [dims] if isinstance(dims, int) else list(dims)
        A = torch.movedim(A, dims, list(range(A.dim() - len(dims), A.dim())))
    shape = tuple(A.shape[B.dim():])
    return torch.linalg.solve(A.reshape(B.numel(), math.prod(shape)),
                              B.reshape(B.numel())).reshape(shape)


@decomposition("linalg_cond", "input p=None")
def cond(input, p):
    """torch's: the ratio of extreme singular values for ``p`` in (None, 2, -2), else the
    matrix norm of the input times that of its inverse."""
    if input.dim() < 2:
        raise UnsupportedOperationError(f"{PREFIX}'linalg.cond' takes matrices")
    if input.numel() == 0:  # torch's 0 for empty matrices
        return input.sum((-2, -1)) * 0
    if p is None or p in (2, -2):
        s = torch.linalg.svdvals(input)
        big, small = s.narrow(-1, 0, 1), s.narrow(-1, s.shape[-1] - 1, 1)
        return (small / big if p == -2 else big / small).squeeze(-1)
    _square("linalg.cond", input)
    if bool((torch.linalg.inv_ex(input.detach()).info > 0).any()):
        # torch fills the inverse of a singular matrix with inf in place
        raise UnsupportedOperationError(
            f"{PREFIX}'linalg.cond' with p={p!r} of a singular matrix is not supported")
    return torch.linalg.matrix_norm(input, p) * torch.linalg.matrix_norm(
        torch.linalg.inv(input), p)

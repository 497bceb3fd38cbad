"""Layout and selection: reshapes, broadcasts, permutations, and every operation that moves
entries without arithmetic (indexing, slicing, concatenation, padding, flips, rolls, repeats,
diagonals, triangles, gathers, windows).

The selections share one rule, :func:`selection`: the operation is run on the *positions* of
its input (``1 .. n``, zero standing for "no entry"), which gives for every entry of the
result the entry of the input it came from. That map becomes an index map on the Jacobian's
terms (:func:`terms.gather`, or :func:`terms.remap` to place a part of a concatenation), never
a dense factor; labels the map does not mix stay labels (a batch stays a delta)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ...errors import UnsupportedOperationError
from .. import sums as S
from ..registry import rule
from ..tracer import PREFIX


@rule(("reshape", "view", "flatten", "unflatten", "squeeze", "unsqueeze", "view_as",
       "reshape_as", "ravel", "atleast_1d", "atleast_2d", "atleast_3d"),
      "input *args **kwargs", traced="input args", second="linear")
def reshape(cx, result, input, args, kwargs):
    if not isinstance(result, torch.Tensor) or result.dtype != input.dtype:
        raise UnsupportedOperationError(f"{PREFIX}'view' as another dtype is not supported")
    return S.reshape(cx, S.of(cx, input), tuple(result.shape))


@rule(("expand", "expand_as", "broadcast_to"), "input *args **kwargs", traced="input args",
      second="linear")
def expand(cx, result, input, args, kwargs):
    return S.broadcast(cx, input, tuple(result.shape))


@rule(("contiguous", "clone", "to", "double", "float", "type_as", "__pos__", "positive",
       "cpu", "cuda", "type", "alias"),
      "input *args **kwargs", traced="input args", second="linear")
def identity(cx, result, input, args, kwargs):
    return S.of(cx, input)


@rule(("t", "T"), "input", second="linear")
def reverse_axes(cx, result, input):
    return S.permute(cx, S.of(cx, input), list(range(input.dim()))[::-1])


@rule(("mT", "mH", "H", "adjoint"), "input", second="linear")
def swap_last(cx, result, input):
    n = input.dim()
    return S.permute(cx, S.of(cx, input), list(range(n - 2)) + [n - 1, n - 2])


@rule("permute", "input *dims", second="linear")
def permute(cx, result, input, dims):
    return S.permute(cx, S.of(cx, input), [S.dim(d, input.dim()) for d in dims])


@rule("swapaxes", "input axis0 axis1", second="linear")
def swapaxes(cx, result, input, axis0, axis1):
    return transpose(cx, result, input, axis0, axis1)


@rule(("transpose", "swapdims"), "input dim0 dim1", second="linear")
def transpose(cx, result, input, dim0, dim1):
    n = input.dim()
    if n == 0:  # torch takes dims 0 and -1 of a scalar as the scalar itself
        return S.of(cx, input)
    perm = list(range(n))
    a, b = S.dim(dim0, n), S.dim(dim1, n)
    perm[a], perm[b] = perm[b], perm[a]
    return S.permute(cx, S.of(cx, input), perm)


@rule(("movedim", "moveaxis"), "input source destination", second="linear")
def movedim(cx, result, input, source, destination):
    n = input.dim()
    src = [S.dim(d, n) for d in (source if isinstance(source, (list, tuple)) else [source])]
    dst = [S.dim(d, n) for d in
           (destination if isinstance(destination, (list, tuple)) else [destination])]
    order = [None] * n
    for s_, d_ in zip(src, dst):
        order[d_] = s_
    rest = iter(d for d in range(n) if d not in src)
    perm = [o if o is not None else next(rest) for o in order]
    return S.permute(cx, S.of(cx, input), perm)


# --- selections: run the operation on positions ---------------------------------------------


def positions(x, offset: int = 1) -> torch.Tensor:
    """``offset, offset + 1, ...`` in ``x``'s shape (float64: exact up to 2**53, and every
    selection op accepts floats)."""
    n = math.prod(x.shape)
    return (torch.arange(n, dtype=torch.float64, device=x.device) + offset).reshape(x.shape)


def distinct_positions(flat: torch.Tensor) -> bool:
    """Whether the int64 positions ``flat`` are all different (increasing ones, a slice's,
    without counting them)."""
    return (flat.numel() <= 1 or bool((flat[1:] > flat[:-1]).all())
            or int(torch.bincount(flat).max()) <= 1)


def place(cx, result, x, pos: torch.Tensor, part: bool = False):
    """The terms of ``result`` given ``pos``: for each entry of ``result``, 1 + the flat
    position in ``x`` it came from (0: not from ``x``). ``part``: ``x`` is one of several
    sources (a concatenation), placed rather than gathered where that enumerates less."""
    terms = S.of(cx, x)
    if not terms:
        return {}
    index = pos.round().to(torch.int64)
    index -= 1  # (in place: at a million entries each temporary is 8 MB)
    n = math.prod(x.shape)
    flat = S.reshape(cx, terms, (n,))
    valid = index >= 0
    chosen = index if bool(valid.all()) else index[valid]
    flat_chosen = chosen.reshape(-1)
    injective = distinct_positions(flat_chosen)
    shape = tuple(result.shape)
    if injective and (chosen.numel() < index.numel() or part):
        # a part of the result (a concatenation, padding): send each entry to its place
        table = torch.full((n,), -1, dtype=torch.int64, device=index.device)
        table[flat_chosen] = torch.arange(index.numel(), device=index.device)[valid.reshape(-1)]
        placed = S.remap(cx, flat, (0,), table, math.prod(shape))
        return S.reshape(cx, placed, shape)
    return S.gather(cx, flat, 0, index)


def selection(names, params: str, call, traced: str = "input", method: str | None = None):
    """Register a selection: ``call(**params)`` moves entries of its traced parameters (the
    names in ``traced``; a list parameter counts each tensor in it) without arithmetic."""

    def jacobian(cx, result, **p):
        outputs = [result] if isinstance(result, torch.Tensor) else list(result)
        parts = [dict() for _ in outputs]
        sources = []
        for name in traced.split():
            v = p[name]
            items = list(v) if isinstance(v, (list, tuple)) else [v]
            for i, x in enumerate(items):
                if isinstance(x, torch.Tensor) and cx.terms(x) is not None:
                    sources.append((name, i, x))
        for name, i, x in sources:
            q = dict(p)
            for other in traced.split():  # every other source reads zeros: "not from x"
                v = p[other]
                if isinstance(v, (list, tuple)):
                    q[other] = [torch.zeros(y.shape, dtype=torch.float64, device=y.device)
                                if isinstance(y, torch.Tensor) else y for y in v]
                elif isinstance(v, torch.Tensor):
                    q[other] = torch.zeros(v.shape, dtype=torch.float64, device=v.device)
            if isinstance(p[name], (list, tuple)):
                q[name] = list(q[name])
                q[name][i] = positions(x)
            else:
                q[name] = positions(x)
            pos = call(**q)
            pos = [pos] if isinstance(pos, torch.Tensor) else list(pos)
            for k, (r, pk) in enumerate(zip(outputs, pos)):
                parts[k] = S.add(cx, parts[k], place(cx, r, x, pk, len(sources) > 1))
        return parts[0] if isinstance(result, torch.Tensor) else parts

    jacobian.__name__ = names if isinstance(names, str) else names[0]
    jacobian.__module__ = __name__
    rule(names, params, traced=traced, method=method, second="linear")(jacobian)


selection("__getitem__", "input index", lambda input, index: input[index])
selection("select", "input dim index", torch.select)
selection("narrow", "input dim start length", torch.narrow)
selection("index_select", "input dim index", torch.index_select)
selection("gather", "input dim index sparse_grad=False",
          lambda input, dim, index, sparse_grad: torch.gather(input, dim, index))
selection("take_along_dim", "input indices dim=None", torch.take_along_dim)
selection("take", "input index", torch.take)
selection("masked_select", "input mask", torch.masked_select)
selection(("chunk",), "input chunks dim=0", torch.chunk)
selection(("split",), "tensor split_size_or_sections dim=0",
          lambda tensor, split_size_or_sections, dim: torch.split(tensor, split_size_or_sections, dim),
          traced="tensor")
selection(("tensor_split",), "input indices_or_sections dim=0",
          lambda input, indices_or_sections, dim: torch.tensor_split(input, indices_or_sections, dim))
selection(("unbind",), "input dim=0", torch.unbind)
selection(("cat", "concat", "concatenate"), "tensors dim=0", torch.cat, traced="tensors")
selection(("stack",), "tensors dim=0", torch.stack, traced="tensors")
selection(("hstack",), "tensors", torch.hstack, traced="tensors")
selection(("vstack", "row_stack"), "tensors", torch.vstack, traced="tensors")
selection(("dstack",), "tensors", torch.dstack, traced="tensors")
selection(("flip",), "input *dims", lambda input, dims: torch.flip(input, dims))
selection(("fliplr",), "input", torch.fliplr)
selection(("flipud",), "input", torch.flipud)
selection(("roll",), "input shifts dims=None",
          lambda input, shifts, dims: torch.roll(input, shifts, dims if dims is not None else ()))
# (a tuple, not unpacked: ``x.repeat([])`` of a scalar is valid and ``x.repeat()`` is not)
selection(("repeat",), "input *repeats", lambda input, repeats: input.repeat(tuple(repeats)))
selection(("tile",), "input dims", torch.tile)
selection(("repeat_interleave",), "input repeats=None dim=None output_size=None",
          lambda input, repeats, dim, output_size: torch.repeat_interleave(
              input, repeats, dim, output_size=output_size))
selection(("diagonal",), "input offset=0 dim1=0 dim2=1", torch.diagonal)
selection(("diag",), "input diagonal=0", torch.diag)
selection(("diag_embed",), "input offset=0 dim1=-2 dim2=-1", torch.diag_embed)
selection(("tril",), "input diagonal=0", torch.tril)
selection(("triu",), "input diagonal=0", torch.triu)
selection(("pixel_shuffle",), "input upscale_factor", F.pixel_shuffle)
selection(("pixel_unshuffle",), "input downscale_factor", F.pixel_unshuffle)
selection(("channel_shuffle",), "input groups", F.channel_shuffle)


@rule("pad", "input pad mode='constant' value=None", second="linear")
def pad(cx, result, input, pad, mode, value):
    if mode not in ("constant", "reflect", "replicate", "circular"):
        raise UnsupportedOperationError(f"{PREFIX}'pad' with mode={mode!r} is not supported")
    return place(cx, result, input, F.pad(positions(input), pad, mode=mode))


@rule("embedding", "input weight padding_idx=None max_norm=None norm_type=2.0 "
      "scale_grad_by_freq=False sparse=False", traced="weight", second="linear")
def embedding(cx, result, input, weight, padding_idx, max_norm, norm_type, scale_grad_by_freq,
              sparse):
    if max_norm is not None:
        raise UnsupportedOperationError(
            f"{PREFIX}'embedding' with max_norm renormalises the table in place; not supported")
    pos = F.embedding(input, positions(weight))
    if padding_idx is not None:  # torch gives the padding row no gradient
        pos = pos.masked_fill((input == padding_idx % weight.shape[0]).unsqueeze(-1), 0)
    terms = place(cx, result, weight, pos)
    if scale_grad_by_freq:  # torch divides each row's gradient by its count in ``input``
        count = torch.bincount(input.reshape(-1), minlength=weight.shape[0])[input]
        g = (1.0 / count.to(cx.dtype)).unsqueeze(-1).expand(result.shape).contiguous()
        terms = S.scaled(cx, terms, g)
    return terms


# --- more selections: aten's slice, combinations, strided views of the storage ---------------

selection(("slice.Tensor", "slice"), "input dim=0 start=None end=None step=1",
          lambda input, dim, start, end, step: torch.ops.aten.slice.Tensor(
              input, dim, start, end, step))
selection(("combinations",), "input r=2 with_replacement=False", torch.combinations)


@rule("constant_pad_nd", "input pad value=0", second="linear")
def constant_pad_nd(cx, result, input, pad, value):
    return place(cx, result, input, torch.constant_pad_nd(positions(input), pad, 0))


selection(("column_stack",), "tensors", torch.column_stack, traced="tensors")


def storage_positions(x: torch.Tensor, name: str) -> torch.Tensor:
    """A float64 copy of ``x``'s storage holding, at each element of ``x``, 1 + its flat
    position (0 elsewhere): ``as_strided`` on it reads, for each element it gives, the element
    of ``x`` it came from. Refused where ``x`` holds one element of storage twice."""
    if any(st == 0 and n > 1 for n, st in zip(x.shape, x.stride())) or (
            x.numel() and torch._debug_has_internal_overlap(x) == 1):
        raise UnsupportedOperationError(
            f"{PREFIX}{name!r} of a tensor whose elements share memory (an expanded view) is "
            "not supported; pass a contiguous copy")
    size = x.untyped_storage().nbytes() // x.element_size()
    store = torch.zeros(size, dtype=torch.float64, device=x.device)
    if x.numel():
        store.as_strided(x.shape, x.stride(), x.storage_offset()).copy_(positions(x))
    return store


def _strided(cx, result, input, size, stride, storage_offset, name):
    store = storage_positions(input, name)
    off = input.storage_offset() if storage_offset is None else storage_offset
    pos = store.as_strided(size, stride, off)
    if pos.numel() and bool((pos == 0).any()):
        raise UnsupportedOperationError(
            f"{PREFIX}{name!r} reads memory outside its input's elements; not supported")
    return place(cx, result, input, pos)


@rule("as_strided", "input size stride storage_offset=None", second="linear")
def as_strided(cx, result, input, size, stride, storage_offset):
    """An index map over the input's storage: each element read is the input's element
    stored there (a view whose elements overlap reads one element several times)."""
    return _strided(cx, result, input, size, stride, storage_offset, "as_strided")


@rule("as_strided_copy", "input size stride storage_offset=None", second="linear")
def as_strided_copy(cx, result, input, size, stride, storage_offset):
    return _strided(cx, result, input, size, stride, storage_offset, "as_strided_copy")

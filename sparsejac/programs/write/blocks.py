"""Writing a program's Jacobian (or Hessian) block in the requested format.

A block that is one term without index maps has the structure of an einsum's Jacobian
(:class:`sparsejac.structure.Structure` over the term's atoms), so it is written as
:func:`sparsejac.jacobian` writes: the format's own pattern writer and the values spread from
the factor, straight into the format's arrays; nothing goes through another format. On a CUDA
device the torch formats are written there (the factor never leaves the GPU); the scipy and
pydata formats copy the factor to the CPU once.

A sum of terms, or a term through index maps, has entries that several terms (or several
assignments of one term) hit: :func:`merged` sums them once, in the format's own order, and
writes the format's arrays from the merge; no format goes through another. The merge is
:func:`sparsejac.programs.write.materialise.materialise` over the format's major axis: rows for CSR, COO
and the torch formats (row-major is COO's lexicographic order), columns for CSC (the terms
transposed: the CSR of ``J.T`` is the CSC of ``J``). COO's coordinates are written over the
tensors' own axes from the merged rows and columns; the torch formats' tensors are made from
the merged arrays, on a CUDA argument's device.

>>> import torch
>>> from sparsejac.programs import terms as T
>>> labels = T.Labels()
>>> x = T.identity((2, 3), labels, torch.float64)
>>> w = torch.arange(12.0, dtype=torch.float64).reshape(3, 4)
>>> j = T.compose(x, ((0, 1), (1, 2)), (0, 2), (2, 3, 4), 0, [None, w], labels)   # x @ w
>>> write([j], (2, 4), (2, 3), labels, torch.float64, "coo").shape
(2, 4, 2, 3)
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from ... import formats
from ...backend import NUMPY, TorchBackend
from ...operands import numpy_dtype
from ...structure import Structure, distinct
from .. import terms as T
from . import materialise as M

if TYPE_CHECKING:
    import torch


def direct(terms: Sequence[T.Term], labels: T.Labels) -> bool:
    """Whether the block is written directly: one term, or terms whose patterns all lie in
    the largest one's (:func:`nesting`), without index maps."""
    if not terms or any(t.mapped(labels) for t in terms):
        return False
    big = largest(terms, labels)
    return all(t is big or nesting(big, t, labels) is not None for t in terms)


def largest(terms: Sequence[T.Term], labels: T.Labels) -> T.Term:
    return max(terms, key=lambda t: t.nnz(labels))


def nesting(big: T.Term, small: T.Term, labels: T.Labels) -> dict[int, int] | None:
    """Where ``small``'s pattern lies in ``big``'s: the map from ``big``'s labels to
    ``small``'s under which their atoms agree position by position (a label of ``small`` may
    stand for several of ``big``'s: a diagonal of ``big``'s pattern), or None.

    Attention's query path (the same token in and out) lies in its key and value paths (every
    pair of tokens): the sum is one term, written directly."""
    if len(big.out) != len(small.out) or len(big.inp) != len(small.inp):
        return None
    phi: dict[int, int] = {}
    for b_axis, s_axis in zip(big.out + big.inp, small.out + small.inp):
        if len(b_axis) != len(s_axis):
            return None
        for b, a in zip(b_axis, s_axis):
            if phi.setdefault(b, a) != a or labels.sizes[b] != labels.sizes[a]:
                return None
    return phi


def _add_nested(data, structure: Structure, big: T.Term, terms: Sequence[T.Term],
                labels: T.Labels, dtype: "torch.dtype", xp) -> None:
    """Add every term but ``big`` into ``data`` (``big``'s values, laid out over
    ``structure.free``, big's labels renamed as :func:`terms._structure` renames them) on the
    diagonal its pattern occupies: a strided view, one entry per assignment of its labels."""
    import torch

    rename = {l: k for k, l in enumerate(distinct(big.out_atoms + big.inp_atoms))}
    free = structure.free
    # torch's strided add on numpy's memory too (shared, no copy): numpy's ufuncs buffer
    # strided operands, torch's do not
    grid = (torch.from_numpy(data) if xp is NUMPY else data).reshape(structure.free_shape)
    for t in terms:
        if t is big:
            continue
        phi = nesting(big, t, labels)
        own = t.free(labels)
        strides = [sum(grid.stride(free.index(rename[l])) for l in phi if phi[l] == a)
                   for a in own]
        # distinct assignments of ``own`` land on distinct entries: an in-place add is exact
        value = T.aligned(t, own).detach().to(dtype=grid.dtype, device=grid.device)
        grid.as_strided(labels.shape(own), strides).add_(value)


def _on_gpu(fmt: formats.Format, device: Any) -> bool:
    """Whether ``fmt``'s results belong on ``device``: a torch format and a CUDA device."""
    return fmt.on_torch and device is not None and getattr(device, "type", "cpu") == "cuda"


def backend(fmt: formats.Format, device: Any):
    """Where a block is written: on ``device`` for a torch format on a CUDA device, else numpy."""
    return TorchBackend(device) if _on_gpu(fmt, device) else NUMPY


def factor_on(term: T.Term, dtype: "torch.dtype", xp) -> Any:
    """The term's factor in ``dtype`` on the backend ``xp`` (a numpy view where it can be)."""
    if xp is NUMPY:
        return M.numpy_factor(term, dtype)
    return term.factor.detach().to(dtype=dtype, device=xp.device)


def coo_pattern(term: T.Term, structure: Structure, out_shape: Sequence[int],
                inp_shape: Sequence[int], idx: int, xp) -> Any:
    """The ``(ndim, nnz)`` coordinates of the term's entries over the tensors' own axes, in
    C order over ``V``: sorted, as the einsum writer's. Each side's flat index is the
    mixed-radix number of its atoms (they need not align with the axes: a reshape may merge
    the argument's axes into one), a table over that side's labels (at most the side's size);
    each axis' coordinate is a digit of it, broadcast over the entries."""
    dtype = xp.index(idx)
    shapes = (tuple(out_shape), tuple(inp_shape))
    coords = xp.empty((len(shapes[0]) + len(shapes[1]), structure.nnz), dtype)
    if not structure.nnz:
        return coords
    rename = {l: k for k, l in enumerate(distinct(term.out_atoms + term.inp_atoms))}
    free, free_shape = structure.free, structure.free_shape
    d = 0
    for atoms, shape in ((term.out_atoms, shapes[0]), (term.inp_atoms, shapes[1])):
        flat = np.zeros([1] * len(free), dtype=np.int64)
        stride = 1
        for atom in reversed(atoms):
            label = rename[atom]
            n = structure.sizes[label]
            flat = flat + (np.arange(n, dtype=np.int64) * stride).reshape(
                [n if l == label else 1 for l in free])
            stride *= n
        stride = math.prod(shape)
        for n in shape:
            stride //= n
            digit = (flat // stride) % n if n > 1 else np.zeros([1] * len(free), np.int64)
            digit = digit.astype(np.int32 if idx == 4 else np.int64)
            if xp is not NUMPY:
                import torch

                digit = torch.from_numpy(digit).to(xp.device)
            xp.copy_into(coords[d].reshape(free_shape), digit)
            d += 1
        del flat
    return coords


def pattern(term: T.Term, structure: Structure, fmt: formats.Format, out_shape, inp_shape,
            xp=NUMPY) -> Any:
    """The index arrays of one direct term in ``fmt`` (torch tensors for a torch format)."""
    if fmt.layout is formats.COO:
        idx = fmt.index_itemsize(structure.nnz, out_shape, inp_shape)
        coords = coo_pattern(term, structure, out_shape, inp_shape, idx, xp)
        return formats.as_tensor(coords) if fmt.on_torch else coords
    return fmt.write_pattern(structure, xp)


def values(terms: Sequence[T.Term], labels: T.Labels, fmt: formats.Format,
           dtype: "torch.dtype", xp=NUMPY) -> Any:
    """The values of a direct block, in ``fmt``'s order (CSC: that of ``J.T``): the largest
    term's spread from its factor, the nested ones added where they lie."""
    big = largest(terms, labels)
    structure, fl = M.structure_of(big, labels)
    target = fmt.layout.target(structure)
    data = xp.empty(structure.nnz, xp_dtype(dtype, xp))
    formats.fill_values(target, factor_on(big, dtype, xp), fl, data, xp)
    if len(terms) > 1:
        _add_nested(data, target, big, terms, labels, dtype, xp)
    if xp is NUMPY and fmt.value_dtype(data.dtype) != data.dtype:
        data = data.astype(fmt.value_dtype(data.dtype))
    return data


def xp_dtype(dtype: "torch.dtype", xp) -> Any:
    return numpy_dtype(dtype) if xp is NUMPY else dtype


def write(terms: Sequence[T.Term], out_shape: Sequence[int], inp_shape: Sequence[int],
          labels: T.Labels, dtype: "torch.dtype", fmt: Any, device: Any = None) -> Any:
    """The sum of ``terms`` in the container of ``fmt`` (see the module's docstring)."""
    fmt = formats.get(fmt, require=False)
    out_shape, inp_shape = tuple(out_shape), tuple(inp_shape)
    if direct(terms, labels):
        xp = backend(fmt, device)
        term = largest(terms, labels)
        structure, _ = M.structure_of(term, labels)
        p = pattern(term, structure, fmt, out_shape, inp_shape, xp)
        return container(terms, labels, fmt, dtype, xp, p, out_shape, inp_shape)
    return merged(terms, out_shape, inp_shape, labels, dtype, fmt, device)


def transposed(term: T.Term) -> T.Term:
    """The term of the transposed block (the same factor and labels, sides swapped)."""
    return T.Term(term.inp, term.out, term.stored, term.flabels)  # a lazy product stays so


def oriented(terms: Sequence[T.Term], out_shape: tuple, inp_shape: tuple,
             fmt: formats.Format) -> tuple[list[T.Term], tuple, tuple]:
    """The terms and shapes whose canonical CSR holds ``fmt``'s compressed arrays: those given
    (rows major: CSR, and COO's row-major order), or the transposed block for CSC."""
    if fmt.layout is formats.CSC:
        return [transposed(t) for t in terms], inp_shape, out_shape
    return list(terms), out_shape, inp_shape


def merged(terms: Sequence[T.Term], out_shape: tuple, inp_shape: tuple, labels: T.Labels,
           dtype: "torch.dtype", fmt: formats.Format, device: Any = None) -> Any:
    """A block that is not :func:`direct` (index maps, or a sum of terms not nested in one),
    its terms' entries merged once (duplicates summed) along ``fmt``'s major axis and written
    into ``fmt``'s arrays. Stored entries: the union of the terms' structural entries, those
    an index map drops (-1) dropped, structural zeros kept (as :func:`M.materialise`).
    :func:`nbytes` predicts what this allocates: keep the two in step."""
    terms, major, minor = oriented(terms, out_shape, inp_shape, fmt)
    csr = M.materialise(terms, major, minor, labels, dtype)
    nnz, data = csr.nnz, csr.data
    idx = fmt.index_itemsize(nnz, out_shape, inp_shape)
    if fmt.layout is formats.COO:
        pattern = formats.csr_to_coords(csr.indptr, csr.indices, out_shape, inp_shape,
                                        NUMPY.index(idx))
    else:
        pattern = fmt.layout.map(formats.CompressedPattern(csr.indices, csr.indptr, csr.shape),
                                 lambda a: a.astype(NUMPY.index(idx), copy=False))
    del csr  # the compressed arrays COO does not keep are freed here
    if fmt.value_dtype(data.dtype) != data.dtype:
        data = data.astype(fmt.value_dtype(data.dtype))
    if fmt.on_torch:  # the torch tensors from the merged arrays, on a CUDA argument's device
        gpu = _on_gpu(fmt, device)
        pattern = fmt.layout.map(pattern, lambda a: _torch_on(a, device, gpu))
        data = _torch_on(data, device, gpu)
    return fmt.container(pattern, data, out_shape, inp_shape)


def _torch_on(array: np.ndarray, device: Any, gpu: bool) -> "torch.Tensor":
    """A numpy array as a torch tensor: the same memory on the CPU, a copy on a GPU."""
    tensor = formats.as_tensor(array)
    return tensor.to(device) if gpu else tensor


def container(terms: Sequence[T.Term], labels: T.Labels, fmt: formats.Format,
              dtype: "torch.dtype", xp, pattern: Any, out_shape, inp_shape) -> Any:
    """A direct block's values (:func:`values`) in ``fmt``'s container around ``pattern``."""
    data = values(terms, labels, fmt, dtype, xp)
    if fmt.on_torch and xp is NUMPY:
        data = formats.as_tensor(data)
    return fmt.container(pattern, data, out_shape, inp_shape)


def on_device(result: Any, fmt: formats.Format, device: Any) -> Any:
    """A torch-format result moved to ``device`` (once, at the end) where that is a GPU."""
    if _on_gpu(fmt, device):
        moved = result.to(device)
        setattr(moved, formats.OUT_NDIM, getattr(result, formats.OUT_NDIM))
        return moved
    return result


def nbytes(terms: Sequence[T.Term], out_shape: Sequence[int], inp_shape: Sequence[int],
           labels: T.Labels, dtype: "torch.dtype", fmt: Any) -> tuple[int, int]:
    """``(peak, kept)``: the bytes :func:`write` holds at its peak, and those its result keeps
    (the factor itself, alive already, not counted)."""
    fmt = formats.get(fmt, require=False)
    out_shape, inp_shape = tuple(out_shape), tuple(inp_shape)
    itemsize = dtype.itemsize
    if direct(terms, labels):
        term = largest(terms, labels)
        structure, fl = M.structure_of(term, labels)
        nnz = structure.nnz
        value = np.dtype(fmt.value_dtype(numpy_dtype(dtype))).itemsize
        kept = fmt.nbytes(nnz, out_shape, inp_shape, value)
        if fmt.layout is formats.COO:
            idx = fmt.index_itemsize(nnz, out_shape, inp_shape)
            # the coordinates, a side's flat-index table and one digit of it (int64 and cast)
            ramp = max(math.prod(out_shape), math.prod(inp_shape)) * (8 + 8 + 8 + idx) * bool(nnz)
            build = nnz * (len(out_shape) + len(inp_shape)) * idx + ramp
        else:
            build = fmt.pattern_peak_nbytes(structure)
        copy = M.copy_nbytes(term, fmt.layout.target(structure), fl, dtype)
        upcast = nnz * itemsize if value != itemsize else 0  # float16 values held as float32
        return max(build, kept + copy + upcast), kept
    return merged_nbytes(terms, out_shape, inp_shape, labels, dtype, fmt)


def merged_nbytes(terms: Sequence[T.Term], out_shape: tuple, inp_shape: tuple,
                  labels: T.Labels, dtype: "torch.dtype", fmt: formats.Format) -> tuple[int, int]:
    """``(peak, kept)`` bytes of :func:`merged` (a bound: every entry enumerated counts as
    stored): the merge along the format's major axis, then COO's coordinates beside the
    merged arrays (:func:`formats.csr_to_coords_nbytes`). The compressed formats keep the merged
    arrays (a narrower index rule than the merge's would cast them: the merge's is that of
    the entries enumerated, at least as wide). Torch tensors share the numpy arrays on the CPU; a GPU's
    copies are not host memory."""
    major_terms, major, minor = oriented(terms, out_shape, inp_shape, fmt)
    peak, csr_bytes = M.materialise_nbytes(major_terms, major, minor, labels, dtype)
    if fmt.layout is not formats.COO:
        return peak, csr_bytes
    n = sum(t.nnz(labels) for t in terms)
    idx = fmt.index_itemsize(n, out_shape, inp_shape)
    matrix_idx = formats.index_dtype(n, (math.prod(out_shape), math.prod(inp_shape))).itemsize
    coords = n * (len(out_shape) + len(inp_shape)) * idx
    write = csr_bytes + coords + formats.csr_to_coords_nbytes(n, out_shape, inp_shape, idx,
                                                             matrix_idx)
    return max(peak, write), n * dtype.itemsize + coords

"""The writer of a block that is one plain term, or terms nested in one: written from its
structure, as :func:`sparsejac.jacobian` writes an einsum's Jacobian.

A term without index maps has the structure of an einsum's Jacobian
(:class:`sparsejac.structure.Structure` over its atoms, docs/how-it-works.md "## 1. One
einsum"): the format's own pattern writer and the values spread from the factor, straight into
the format's arrays; nothing goes through another format. Terms whose patterns lie in the
largest one's (:func:`nesting`: attention's query path inside its key and value paths) are
added where they lie. On a CUDA device the torch formats are written there (the factor never
leaves the GPU); the scipy and pydata formats copy the factor to the CPU once.

This module reads terms (their public names in :mod:`sparsejac.programs.terms`) and the
formats; it never imports the tracer or the rules.

>>> import torch
>>> from sparsejac.programs import terms as T
>>> labels = T.Labels()
>>> x = T.identity((2, 3), labels, torch.float64)
>>> w = torch.arange(12.0, dtype=torch.float64).reshape(3, 4)
>>> j = T.compose(x, ((0, 1), (1, 2)), (0, 2), (2, 3, 4), 0, [None, w], labels)   # x @ w
>>> Structured((2, 4), (2, 3)).write([j], labels, torch.float64, "coo").shape
(2, 4, 2, 3)
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from ... import formats
from ...backend import NUMPY
from ...operands import numpy_dtype
from ...structure import Structure, distinct
from .. import terms as T
from .base import CSR, Writer, backend
from .plans import KeptCsr

if TYPE_CHECKING:
    import torch


def structure_of(term: T.Term, labels: T.Labels) -> tuple[Structure, tuple[int, ...]]:
    """The structure of a term without index maps (its atoms renamed densely), and its
    factor's labels so renamed."""
    used = distinct(term.out_atoms + term.inp_atoms)
    rename = {l: k for k, l in enumerate(used)}
    structure = Structure(
        tuple(rename[a] for a in term.out_atoms),
        tuple(rename[a] for a in term.inp_atoms),
        tuple(labels.sizes[l] for l in used),
        tuple(rename[l] for l in term.free(labels) if l in term.flabels),
    )
    return structure, tuple(rename[l] for l in term.flabels)


def numpy_factor(term: T.Term, dtype: "torch.dtype") -> np.ndarray:
    """The term's factor in ``dtype`` as a numpy array (a view where it can be)."""
    return term.factor.detach().to(dtype).cpu().resolve_conj().resolve_neg().numpy()


def copy_nbytes(term: T.Term, structure: Structure, fl: Sequence[int],
                dtype: "torch.dtype") -> int:
    """Bytes of the copies of a factor that writing its values makes: the cast to ``dtype``,
    and :meth:`Structure.spread`'s layout in ``V`` order (where it is not so already)."""
    factor = term.factor
    size = factor.numel() * dtype.itemsize
    cast = size if factor.dtype != dtype else 0
    if factor.dim() == 0:
        return cast
    free = structure.free
    order = sorted(range(len(fl)), key=lambda axis: free.index(fl[axis]))
    laid_out = factor.permute(order).is_contiguous()
    return cast + (size if structure.spread_copies(factor.numel()) and not laid_out else 0)


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


def direct(terms: Sequence[T.Term], labels: T.Labels) -> bool:
    """Whether :class:`Structured` writes the block: one term, or terms whose patterns all lie
    in the largest one's (:func:`nesting`), without index maps."""
    if not terms or any(t.mapped(labels) for t in terms):
        return False
    big = largest(terms, labels)
    return all(t is big or nesting(big, t, labels) is not None for t in terms)


def _add_nested(data, structure: Structure, big: T.Term, terms: Sequence[T.Term],
                labels: T.Labels, dtype: "torch.dtype", xp) -> None:
    """Add every term but ``big`` into ``data`` (``big``'s values, laid out over
    ``structure.free``, big's labels renamed as :func:`structure_of` renames them) on the
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


def factor_on(term: T.Term, dtype: "torch.dtype", xp) -> Any:
    """The term's factor in ``dtype`` on the backend ``xp`` (a numpy view where it can be)."""
    if xp is NUMPY:
        return numpy_factor(term, dtype)
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
    """The index arrays of one plain term in ``fmt`` (torch tensors for a torch format)."""
    if fmt.layout is formats.COO:
        idx = fmt.index_itemsize(structure.nnz, out_shape, inp_shape)
        coords = coo_pattern(term, structure, out_shape, inp_shape, idx, xp)
        return formats.as_tensor(coords) if fmt.on_torch else coords
    return fmt.write_pattern(structure, xp)


def xp_dtype(dtype: "torch.dtype", xp) -> Any:
    return numpy_dtype(dtype) if xp is NUMPY else dtype


def values(terms: Sequence[T.Term], labels: T.Labels, fmt: formats.Format,
           dtype: "torch.dtype", xp=NUMPY) -> Any:
    """The values of a structured block, in ``fmt``'s order (CSC: that of ``J.T``): the
    largest term's spread from its factor, the nested ones added where they lie."""
    big = largest(terms, labels)
    structure, fl = structure_of(big, labels)
    target = fmt.layout.target(structure)
    data = xp.empty(structure.nnz, xp_dtype(dtype, xp))
    formats.fill_values(target, factor_on(big, dtype, xp), fl, data, xp)
    if len(terms) > 1:
        _add_nested(data, target, big, terms, labels, dtype, xp)
    if xp is NUMPY and fmt.value_dtype(data.dtype) != data.dtype:
        data = data.astype(fmt.value_dtype(data.dtype))
    return data


class Structured(Writer):
    """One plain term, or terms nested in the largest (:func:`direct`), written from the
    largest one's structure straight into the format's arrays.

    For a plan (after :meth:`keep`) each format's pattern is made once, on the device it is
    written on, and kept read-only (the CSR's is the kept CSR itself); a refill writes values
    only."""

    writes_directly = True

    def __init__(self, out_shape: Sequence[int], inp_shape: Sequence[int]) -> None:
        super().__init__(out_shape, inp_shape)
        self.patterns: dict[tuple, Any] | None = None  # a plan's patterns; None: none kept

    def _kept_pattern(self, f: formats.Format, xp, device: Any) -> Any:
        """The pattern a plan keeps for ``f`` on ``xp``, or None where none is."""
        if self.patterns is None:
            return None
        if f.layout is formats.CSR and xp is NUMPY:
            return self.kept.arrays(f)  # the kept CSR arrays themselves
        return self.patterns.get((f.name, xp.name, str(device)))

    def write(self, terms, labels, dtype, fmt, device=None):
        """The block in ``fmt``'s container: the pattern (a plan's, where kept) and the values
        written straight into the format's order."""
        f = formats.get(fmt, require=False)
        xp = backend(f, device)
        p = self._kept_pattern(f, xp, device)
        if p is None:
            term = largest(terms, labels)
            structure, _ = structure_of(term, labels)
            p = pattern(term, structure, f, self.out_shape, self.inp_shape, xp)
            if self.patterns is not None:
                for a in f.layout.arrays(p):
                    if isinstance(a, np.ndarray):
                        a.flags.writeable = False  # shared by every refill: read-only
                self.patterns[(f.name, xp.name, str(device))] = p
        data = values(terms, labels, f, dtype, xp)
        if f.on_torch and xp is NUMPY:
            data = formats.as_tensor(data)
        return f.container(p, data, self.out_shape, self.inp_shape)

    def nbytes(self, fmt, terms, labels, dtype, device=None):
        """The pattern (where it is not kept) with its writer's temporaries, then the values
        beside it with the factor's copies (:func:`copy_nbytes`) and a cast to the format's
        value dtype (float16 held as float32)."""
        f = formats.get(fmt, require=False)
        term = largest(terms, labels)
        structure, fl = structure_of(term, labels)
        nnz, itemsize = structure.nnz, dtype.itemsize
        value = np.dtype(f.value_dtype(numpy_dtype(dtype))).itemsize
        copy = copy_nbytes(term, f.layout.target(structure), fl, dtype)
        fill = max(nnz * itemsize + copy, nnz * (itemsize + value) if value != itemsize else 0)
        if self._kept_pattern(f, backend(f, device), device) is not None:
            return fill, nnz * value
        kept = f.nbytes(nnz, self.out_shape, self.inp_shape, value)
        if f.layout is formats.COO:
            idx = f.index_itemsize(nnz, self.out_shape, self.inp_shape)
            # the coordinates, a side's flat-index table and one digit of it (int64 and cast)
            ramp = (max(math.prod(self.out_shape), math.prod(self.inp_shape))
                    * (8 + 8 + 8 + idx) * bool(nnz))
            build = nnz * (len(self.out_shape) + len(self.inp_shape)) * idx + ramp
        else:
            build = f.pattern_peak_nbytes(structure)
        return max(build, kept - nnz * value + fill), kept

    def csr(self, terms, labels, dtype):
        return self.write(terms, labels, dtype, CSR)

    def csr_nbytes(self, terms, labels, dtype):
        return self.nbytes(CSR, terms, labels, dtype)

    def keep(self, terms, labels, dtype) -> KeptCsr:
        """The largest term's CSR pattern (the others' lie in it), kept; each other format's
        is made by its first refill."""
        structure, _ = structure_of(largest(terms, labels), labels)
        self.kept = KeptCsr(formats.csr_pattern(structure), self.out_shape, self.inp_shape)
        self.patterns = {}
        return self.kept

    def values(self, terms, labels, dtype) -> np.ndarray:
        return values(terms, labels, CSR, dtype)

    def values_nbytes(self, terms, labels, dtype):
        """The values, and the factor's copies beside them (:func:`copy_nbytes`)."""
        term = largest(terms, labels)
        structure, fl = structure_of(term, labels)
        data = structure.nnz * np.dtype(numpy_dtype(dtype)).itemsize
        return data + copy_nbytes(term, structure, fl, dtype), data

    def swap(self, terms, labels, mirror):
        """Where the block is one plain term whose transpose swaps labels of ``V`` (rows
        ``(b, i)`` and columns ``(b, k)``: ``V = (b, i, k)``, the mirror of ``v`` is ``v``
        with ``i`` and ``k`` swapped): ``(shape of V, that permutation of its axes)``, so that
        the values are averaged with a transposed view of themselves, without a gather
        (:meth:`averaged`). Checked against ``mirror``, found from the pattern."""
        term = largest(terms, labels)
        out, inp = term.out_atoms, term.inp_atoms
        sigma: dict[int, int] = {}
        for a, b in zip(out, inp):
            if sigma.setdefault(a, b) != b or sigma.setdefault(b, a) != a:
                return None  # a label paired with two others: no permutation of V says it
        free = term.free(labels)
        if len(out) != len(inp) or set(sigma) != set(free):
            return None
        perm = tuple(free.index(sigma[l]) for l in free)
        shape = labels.shape(free)
        order = np.arange(len(mirror), dtype=np.int64).reshape(shape).transpose(perm).reshape(-1)
        return (shape, perm) if np.array_equal(order, mirror) else None

    def averaged(self, terms, labels, dtype, swap: tuple) -> np.ndarray:
        """The values averaged with their mirror image, ``(a + b) / 2`` with ``b`` the values
        with ``V``'s axes permuted (:meth:`swap`)."""
        shape, perm = swap
        if len(terms) == 1:  # the values are the factor spread: a view, no copy
            s, fl = structure_of(terms[0], labels)
            spread = s.spread(numpy_factor(terms[0], dtype), fl)
        else:  # nested terms: the largest's values with the others added
            spread = values(terms, labels, CSR, dtype).reshape(shape)
        data = np.empty(math.prod(shape), dtype=numpy_dtype(dtype))
        view = data.reshape(shape)
        np.add(spread, spread.transpose(perm), out=view)
        np.multiply(view, 0.5, out=view)
        return data

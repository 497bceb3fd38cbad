"""From the blocks a trace collected to the result: every block guarded, written once, nested.

:func:`build` is the one-shot path of :func:`~sparsejac.programs.api.jacobian_of` and
:func:`~sparsejac.programs.api.hessian_of`: each block's predicted peak is checked against the
memory limit and the process's headroom before it is written. It reads the collected blocks
(their terms, shapes and layout) and never runs the tracer.
"""

from __future__ import annotations

import numpy as np

from ... import formats, options
from ..ledger import storage_nbytes
from ..naming import PREFIX
from . import blocks as B
from . import materialise as M


def conversion_nbytes(fmt, nnz, out_shape, inp_shape, itemsize, csr_bytes):
    """``(extra, final)``: the bytes :func:`formats.from_csr` allocates beside the CSR of ``nnz``
    entries (``csr_bytes``) to give ``fmt``, and those the result keeps."""
    return formats.get(fmt, require=False).from_csr_nbytes(nnz, out_shape, inp_shape, itemsize,
                                                          csr_bytes)


def factors_nbytes(c) -> int:
    """Bytes of the dense factors alive while the blocks are written: those of the blocks'
    terms, or the tracer's live factors where it holds more."""
    held = storage_nbytes([f for terms in c.blocks for t in terms for f in t.held()])
    return max(held, c.labels.live()) + c.labels.tables_nbytes


def symmetrise(csr):
    """Average a matrix with its transpose in place, where its pattern is symmetric (the two
    halves of a Hessian block are summed in other orders, so they differ by rounding)."""
    t = csr.T.tocsr()
    t.sort_indices()
    if np.array_equal(t.indptr, csr.indptr) and np.array_equal(t.indices, csr.indices):
        # in place: the mirror's values are t's copy (at 3e6 entries each temporary is 24 MB)
        np.add(csr.data, t.data, out=csr.data)
        np.multiply(csr.data, 0.5, out=csr.data)
    return csr


def transposed_csr(csr):
    t = csr.T.tocsr()
    t.sort_indices()
    return t


def build(c, fmt: str):
    """Write every block once (guarded), straight into ``fmt``'s arrays (:func:`.write.write`):
    a block that is one term (or terms nested in one) without index maps from its structure,
    the others (index maps, sums) merged once along the format's major axis. A Hessian's
    symmetric blocks (averaged with their transposes) and the blocks it also uses transposed
    (below the diagonal) keep the CSR path: merged once as CSR, which the average and the
    transpose need, then converted to ``fmt``."""
    live = factors_nbytes(c)  # the factors stay alive while the blocks are written
    alive = ""
    if c.labels.peak:  # what the trace itself reached (checked before each allocation)
        alive = f", after a trace that peaked at {c.labels.peak:,} bytes of factors,"
    held, built = 0, []
    transposed = {b for b, tr in c.layout if tr}
    for i, (terms, (s1, s2)) in enumerate(zip(c.blocks, c.shapes)):
        nnz = sum(t.nnz(c.labels) for t in terms)
        copies = sum(1 for b, tr in c.layout if b == i)
        merged = i in c.symmetric or i in transposed
        if merged:
            peak, csr_bytes = M.materialise_nbytes(terms, s1, s2, c.labels, c.dtype)
            convert, final = conversion_nbytes(fmt, nnz, s1, s2, c.dtype.itemsize, csr_bytes)
            peak = max(peak, csr_bytes + convert)
        else:
            peak, final = B.nbytes(terms, s1, s2, c.labels, c.dtype, fmt)
        what = (f"{c.what[i]} ({nnz:,} entries enumerated in {len(terms)} "
                f"term(s), format {fmt!r}){alive}")
        options.guard(held + peak, c.limit, PREFIX, what, used=live)
        if c.labels.room is not None:  # (what is written now is counted in the headroom)
            options.guard_room(peak, c.labels.room(), c.labels.reserve, PREFIX, what)
        if merged:
            csr = M.materialise(terms, s1, s2, c.labels, c.dtype)
            # its factors are written: freed before the average makes its transposed copy (a
            # Rosenbrock Hessian of 1e6 variables: 40 MB of factors beside 40 MB of copy); in
            # place, as the loop's zip and enumerate still hold the list
            terms.clear()
            built.append(symmetrise(csr) if i in c.symmetric else csr)
        else:
            built.append(B.write(terms, s1, s2, c.labels, c.dtype, fmt, c.device))
        held += final * copies
    results = []
    for b, tr in c.layout:
        s1, s2 = c.shapes[b]
        if not (b in c.symmetric or b in transposed):
            results.append(built[b])
        else:
            f = formats.get(fmt, require=False)
            result = (f.from_csr(transposed_csr(built[b]), s2, s1) if tr
                      else f.from_csr(built[b], s1, s2))
            results.append(B.on_device(result, f, c.device))
    return c.nest(results)

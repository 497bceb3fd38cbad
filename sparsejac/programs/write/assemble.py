"""From the blocks a trace collected to the result: every block guarded, written once, nested.

:func:`build` is the one-shot path of :func:`~sparsejac.programs.api.jacobian_of` and
:func:`~sparsejac.programs.api.hessian_of`: each block's writer is chosen once
(:func:`~.choose.writer_for`), and its predicted peak is checked against the memory limit and
the process's headroom before it writes. It reads the collected blocks (their terms, shapes
and layout) and never runs the tracer.
"""

from __future__ import annotations

from typing import Any

from ... import options
from ..ledger import storage_nbytes
from ..naming import PREFIX
from .choose import writer_for


def factors_nbytes(c) -> int:
    """Bytes of the dense factors alive while the blocks are written: those of the blocks'
    terms, or the tracer's live factors where it holds more."""
    held = storage_nbytes([f for terms in c.blocks for t in terms for f in t.held()])
    return max(held, c.labels.live()) + c.labels.tables_nbytes


def build(c, fmt: str) -> Any:
    """Write every block once (guarded) by its writer, and from that each place it is used in
    the nested result (a Hessian's block below the diagonal: the transpose of one above)."""
    live = factors_nbytes(c)  # the factors stay alive while the blocks are written
    alive = ""
    if c.labels.peak:  # what the trace itself reached (checked before each allocation)
        alive = f", after a trace that peaked at {c.labels.peak:,} bytes of factors,"
    held, results = 0, {}
    transposed = {b for b, tr in c.layout if tr}
    for i, (terms, (s1, s2)) in enumerate(zip(c.blocks, c.shapes)):
        w = writer_for(terms, s1, s2, c.labels, fmt, i in c.symmetric, i in transposed)
        nnz = sum(t.nnz(c.labels) for t in terms)
        places = [place for place in c.layout if place[0] == i]
        peak, final = w.nbytes(fmt, terms, c.labels, c.dtype, c.device)
        what = (f"{c.what[i]} ({nnz:,} entries enumerated in {len(terms)} "
                f"term(s), format {fmt!r}){alive}")
        options.guard(held + peak, c.limit, PREFIX, what, used=live)
        if c.labels.room is not None:  # (what is written now is counted in the headroom)
            options.guard_room(peak, c.labels.room(), c.labels.reserve, PREFIX, what)
        written = w.write(terms, c.labels, c.dtype, fmt, c.device)
        for place in places:  # each place's result now: what was written goes with them
            results[place] = w.result(written, fmt, place[1], c.device)
        del written
        held += final * len(places)
    return c.nest([results[place] for place in c.layout])

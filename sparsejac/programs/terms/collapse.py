"""The collapse (:func:`collapse`): a term's entries that land on the same input entry summed
during the trace, by re-expressing the input side's index maps over window labels
(docs/how-it-works.md, "## 3. Index maps").

Of :mod:`sparsejac.programs.terms` it imports :mod:`.labels`, :mod:`.factors` and
:mod:`.term`; no other module of the algebra imports it. The tracer applies it after every
rule, and looks it up on the package (a test traces without it by patching that name).

>>> import torch
>>> from sparsejac.programs.terms import compose, gather, identity
>>> labels = Labels()
>>> x = identity((6,), labels, torch.float64)
>>> y = gather(x, 0, torch.arange(4)[:, None] + torch.arange(3), labels)   # x.unfold(0, 3, 1)
>>> s = compose(y, ((0, 1),), (), (4, 3), 0, [None], labels)             # y.sum()
>>> s.nnz(labels), collapse(s, labels).nnz(labels), collapse(s, labels).factor.tolist()
(12, 6, [1.0, 2.0, 3.0, 3.0, 2.0, 1.0])
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

from ...structure import distinct
from .factors import align
from .labels import Labels, arange
from .term import Term

if TYPE_CHECKING:  # annotations only
    import torch


@dataclass(frozen=True)
class _Collapse:
    """How one group of input-side index maps collapses (:func:`collapse`): the labels
    ``summed`` and ``kept`` they are over, the new map of each old one (over ``kept`` and the
    window labels ``windows``, one per map, none where a map's window has one entry), and
    ``target``: for each ``(kept, summed)`` assignment flat, the flat ``(kept, windows)`` entry
    it lands on (one past the last, ``span`` times the kept size, where it has none)."""

    summed: tuple[int, ...]
    kept: tuple[int, ...]
    windows: tuple[int, ...]
    span: int  # the windows' size
    new: dict[int, int]
    target: "torch.Tensor"


def _collapse_group(maps: Sequence[int], summed: Sequence[int], labels: Labels) -> _Collapse | None:
    """The collapse of the input-side maps ``maps`` over the labels ``summed`` (which no other
    atom carries), or None where no two assignments of ``summed`` land on one place (nothing
    to gain). Memoised on ``labels``: it depends on the maps alone, not on any factor."""
    import torch

    key = (tuple(maps), tuple(summed))
    if key in labels.collapses:
        return labels.collapses[key]
    kept = distinct([l for a in maps for l in labels.derived[a][1] if l not in summed])
    dom = tuple(kept) + tuple(summed)
    shape = labels.shape(dom)
    nk = labels.size(kept)
    # the maps' tables over (kept, summed), their bounds and where each entry lands: int64
    labels.guard((len(maps) + 4, math.prod(shape)), 8, "a collapse's index tables")
    tables = []
    for a in maps:
        table, over = labels.derived[a]
        tables.append(align(table, over, dom).expand(shape).reshape(nk, -1))
    valid = tables[0] >= 0
    for t in tables[1:]:
        valid = valid & (t >= 0)
    # each map's lowest and highest place per kept assignment, over the entries that exist
    hi_int = torch.iinfo(torch.int64).max
    flat = torch.zeros(tables[0].shape, dtype=torch.int64, device=tables[0].device)
    los, spans = [], []
    for t in tables:
        lo = t.masked_fill(~valid, hi_int).amin(1, keepdim=True)
        lo = lo.masked_fill(lo == hi_int, 0)  # a kept assignment with no entry: any base
        hi = t.masked_fill(~valid, -1).amax(1, keepdim=True)
        span = max(int((hi - lo + 1).max()), 1)
        flat = flat * span + (t - lo)
        los.append(lo.reshape(-1))
        spans.append(span)
    span = math.prod(spans)
    if span >= labels.size(summed):
        labels.collapses[key] = None
        return None
    # where each entry lands, flat over (kept, windows); entries that do not exist: one past
    slots = nk * span
    target = (arange(nk, flat)[:, None] * span + flat).masked_fill(~valid, slots).reshape(-1)
    hit = torch.zeros(slots + 1, dtype=torch.bool, device=flat.device)
    hit[target] = True
    missed = ~hit[:slots].reshape(nk, span)
    # one window label per map, so that a window that is the whole input axis is that axis
    windows = tuple(w for n in spans for w in labels.fresh(n))
    over = tuple(kept) + windows
    new, stride = {}, span
    r = arange(span, flat)[None, :]
    for i, (a, lo, n) in enumerate(zip(maps, los, spans)):
        stride //= n
        table = lo[:, None] + (r // stride) % n
        if i == 0:  # a window entry that no entry reaches does not exist: on one map is enough
            table = table.masked_fill(missed, -1)
        new[a] = labels.derive(table.reshape(labels.shape(over)), over, labels.sizes[a])
    result = _Collapse(tuple(summed), tuple(kept), windows, span, new, target)
    labels.collapses[key] = result
    return result


def _collapse_groups(term: Term, labels: Labels) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """``(maps, summed)``: the term's input-side index maps grouped by the labels they are over
    that no other atom carries (the labels a sum left only in the maps and the factor), maps
    that share such a label in one group."""
    maps = distinct([a for a in term.inp_atoms if a in labels.derived])
    kept = set(labels.base(term.out_atoms)) | {a for a in term.inp_atoms if a not in labels.derived}
    groups: list[tuple[list[int], set[int]]] = []
    for a in maps:
        own = set(labels.derived[a][1]) - kept
        if not own:
            continue
        joined = [g for g in groups if g[1] & own]
        group = ([x for g in joined for x in g[0]] + [a], own.union(*(g[1] for g in joined)))
        groups = [g for g in groups if not g[1] & own] + [group]
    order = labels.base(term.inp_atoms)
    return [(tuple(ms), tuple(l for l in order if l in ls)) for ms, ls in groups]


def collapse(term: Term, labels: Labels) -> Term:
    """The term with the entries that land on the same place summed.

    A sum over a convolution's kernel offsets, a pooling's window or a linear layer's cells
    leaves labels that only the input side's index maps (and the factor) carry: the term then
    enumerates every combination of them, and combinations that reach the same input entry
    are only added by the final write (a CNN's offsets through two convolutions and poolings:
    a factor hundreds of times the Jacobian). Each group of such maps (maps that share one of
    these labels) is re-expressed over a *window* label per map instead, the offset from the
    lowest input entry the other labels (``kept``) reach, with the factor scatter-added onto
    it; where nothing is kept, the window is the input axis itself (a plain label). Entries
    that do not exist (padding, -1) stay dropped, and window entries that nothing reaches are
    -1 too, so the stored entries are unchanged: the union of the places the old entries
    reach. Applied only where it enumerates fewer entries (decided from the maps, before
    anything is allocated)."""
    import torch

    plans = [p for p in (_collapse_group(maps, summed, labels)
                         for maps, summed in _collapse_groups(term, labels)) if p is not None]
    while plans:
        # groups over disjoint kept labels (a CNN's rows and columns) in one scatter: the factor
        # is laid out (a copy) and added once
        batch: list[_Collapse] = []
        for p in list(plans):
            if not any(set(p.kept) & set(q.kept) for q in batch):
                batch.append(p)
                plans.remove(p)
        factor, fl = term.factor, term.flabels
        done = tuple(l for p in batch for l in p.kept + p.summed)
        # the other labels in the factor's memory order (outermost first): the copy below
        # then reads runs of contiguous memory
        rest = tuple(sorted((l for l in fl if l not in done),
                            key=lambda l: -factor.stride(fl.index(l))))
        lead = labels.shape(rest)
        ins = [labels.size(p.kept + p.summed) for p in batch]
        outs = [labels.size(p.kept) * p.span for p in batch]
        # the factor laid out as (kept, summed, ...) per group, then ``rest``: one row of
        # ``rest`` per entry, added onto the row of (kept, windows, ...) it lands on; beside
        # them its index (int64 targets and boolean drops, with their temporaries): one guard
        # for all that is alive at once
        index = math.prod(ins) * 16
        rows = (math.prod(ins) + math.prod(outs) + 1) * math.prod(lead) * factor.element_size()
        labels.guard((index + rows,), 1,
                     "a factor to collapse, its collapse and the collapse's index")
        target = torch.zeros((), dtype=torch.int64, device=factor.device)
        dropped = torch.zeros((), dtype=torch.bool, device=factor.device)
        for p, n_out in zip(batch, outs):
            t = p.target.to(factor.device)
            target = (target.unsqueeze(-1) * n_out + t.clamp(max=n_out - 1)).reshape(-1)
            dropped = (dropped.unsqueeze(-1) | (t == n_out)).reshape(-1)
        slots = math.prod(outs)
        target = target.masked_fill(dropped, slots)
        source = align(factor, fl, done + rest).expand(labels.shape(done) + lead)
        source = source.reshape(math.prod(ins), math.prod(lead))
        total = factor.new_zeros((slots + 1, math.prod(lead)))
        total.index_add_(0, target, source)
        del source
        fl = tuple(l for p in batch for l in p.kept + p.windows) + rest
        factor = total[:slots].reshape(labels.shape(fl))  # contiguous: a view
        new = {a: b for p in batch for a, b in p.new.items()}
        sub = lambda atoms: tuple(new.get(x, x) for x in atoms)  # noqa: E731
        term = Term(term.out, tuple(sub(a) for a in term.inp), factor, fl)
    return term

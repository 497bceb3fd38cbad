"""Second order: exact sparse Hessians of scalar programs, in structured form.

For ``f = h(y)`` with ``y = g(u_1, ..., u_k)`` a step of the program, the chain rule twice
gives ``H_f = sum over steps of sum_ij J_ui^T W_ij J_uj``, where ``J_ui`` is the structured
Jacobian of the step's input ``u_i`` (what the first-order trace carries) and
``W_ij = sum_o ybar[o] d2 y[o] / du_i du_j`` is the step's second derivative contracted with the
adjoint ``ybar = df/dy`` that reaches it (torch's reverse mode gives every adjoint at once).
Linear steps (sums, layouts, selections, an einsum with one traced operand) have ``W = 0``. An
elementwise step has diagonal ``W`` (``ybar * g''``); an einsum of two traced operands a
cross term ``W`` made of the other operands and ``ybar`` on the einsum's letters.

Each ``J_ui^T W J_uj`` is one einsum of two terms (:func:`pair`): the second term gets fresh
labels, the labels of the two that index the same entry of ``u`` are identified (a delta:
a batch stays block-diagonal), and what neither argument side carries is summed
(docs/how-it-works.md, "## 5. Hessians").

It builds on the term algebra (:mod:`~sparsejac.programs.terms`), the tracer's terms and the
helpers of :mod:`~sparsejac.programs.sums`; the rules import it, never the reverse, and it never
imports a writer.
"""

from __future__ import annotations

from typing import Any, Sequence

from ..structure import distinct
from . import sums as S
from . import terms as T
from .tracer import Tracer


def fresh_copy(term: T.Term, labels: T.Labels) -> T.Term:
    """The term over new labels of the same sizes (index maps re-read on them)."""
    rename = {l: labels.fresh(labels.sizes[l])[0] for l in term.free(labels)}
    derived = {}
    for a in term.out_atoms + term.inp_atoms:
        if a in labels.derived and a not in derived:
            table, over = labels.derived[a]
            derived[a] = labels.derive(table, tuple(rename[o] for o in over), labels.sizes[a])
    sub = lambda atoms: tuple(derived[a] if a in derived else rename[a] for a in atoms)  # noqa
    return T.Term(tuple(sub(a) for a in term.out), tuple(sub(a) for a in term.inp), term.factor,
                  tuple(rename[l] for l in term.flabels))


def _plain(atoms: Sequence[int], labels: T.Labels) -> bool:
    return not any(a in labels.derived for a in atoms)


def pair(t1: T.Term, l1: Sequence[int], t2: T.Term, l2: Sequence[int],
         others: Sequence[tuple[Any, Sequence[int]]], labels: T.Labels) -> T.Term:
    """``sum over the letters of t1[l1, a] * t2[l2, b] * prod(others)``: the Hessian term with
    rows ``t1``'s argument axes and columns ``t2``'s (``others``: values on einsum letters)."""
    t2 = fresh_copy(t2, labels)
    while True:
        t1, a1 = T.bind(t1, l1, labels)
        t2, a2 = T.bind(t2, l2, labels)
        bad = next((e for e in a1 if e in a2 and not (
            labels.shape(a1[e]) == labels.shape(a2[e]) and _plain(a1[e] + a2[e], labels))), None)
        if bad is None:
            break
        # different granularity or index maps on a shared letter: one base label each side
        t1 = T.resolve(t1, list(l1).index(bad), labels)
        t2 = T.resolve(t2, list(l2).index(bad), labels)
    for e in a1:
        if e in a2:
            for x, y in zip(a1[e], a2[e]):
                if x != y:
                    t2 = T.substitute(t2, y, x, labels)
                    a2 = {k: tuple(x if z == y else z for z in v) for k, v in a2.items()}
    amap = {**a2, **a1}
    # t1, then W, then t2: contracting W into t1 first keeps the intermediates at a term's size
    # (t1 with t2 first would span both argument sides and W's letters at once)
    ops = [(t1.factor, t1.flabels)]
    for value, letters in others:
        value = value.detach().to(t1.factor.dtype)
        shape = [s for e in letters for s in labels.shape(amap[e])]
        ops.append(T.on_base(value.reshape(shape), [a for e in letters for a in amap[e]], labels))
    free = labels.base(t1.inp_atoms + t2.inp_atoms)
    carried = {l for _, ls in ops for l in ls} | set(t2.flabels)
    fl = tuple(l for l in free if l in carried)
    factor = T.einsum([_left(ops, fl, t2.flabels, labels), (t2.factor, t2.flabels)], fl, labels)
    term = T.Term(t1.inp, t2.inp, factor, fl)
    bound = labels.base([a for atoms in amap.values() for a in atoms])
    uncarried = set(bound) - set(free) - carried
    if uncarried:
        term = T.multiply(term, labels.size(sorted(uncarried)), labels)
    return term


def _left(ops: list, fl: Sequence[int], right: Sequence[int], labels: T.Labels):
    """``t1`` times the weights (``ops``), over the labels the result ``fl`` or ``t2``
    (``right``) still needs, laid out as the product with ``t2`` reads it: the result's labels
    first (in ``fl`` order), then those ``t2`` sums. ``torch.matmul`` then takes it as it is;
    in :func:`~sparsejac.programs.terms.einsum`'s own order (the operands' labels as they come)
    it is copied to that layout first, a strided copy as large as a Hessian block, a large part
    of a refill."""
    have = {l for _, ls in ops for l in ls}
    keep = ([l for l in fl if l in have]
            + [l for l in distinct([l for _, ls in ops for l in ls])
               if l in right and l not in fl])
    if len(ops) == 1 and tuple(ops[0][1]) == tuple(keep):
        return ops[0]
    return T.einsum(ops, keep, labels), tuple(keep)


def pairs(hx: Tracer, left, l1, right, l2, others) -> list:
    """Every ``(key1, key2, term)`` of ``pair`` over the terms of two Jacobians (dicts); the
    pairs :func:`defer` takes are left to :func:`flush`."""
    out = []
    for k1, ts1 in left.items():
        for k2, ts2 in right.items():
            for t1 in ts1:
                for t2 in ts2:
                    if not defer(hx, k1, t1, l1, k2, t2, l2, others):
                        out.append((k1, k2, pair(t1, l1, t2, l2, others, hx.labels)))
    return out


def defer(hx: Tracer, k1, t1: T.Term, l1, k2, t2: T.Term, l2, others) -> bool:
    """Keep a pair with a diagonal weight (``others`` one value on all the letters, as
    elementwise steps and products have) in ``hx.pending`` instead of contracting it, where
    its terms spread a smaller factor over more entries (a weight shared by a batch).

    Such a term that is ``diag(g) J`` (an elementwise step's Jacobian, :func:`terms.unscaled`)
    is replaced by ``J``, ``g`` moving into the weight; pairs of the same two terms (from
    several steps: ``tanh`` and the square after it) then add their weights and are
    contracted once, by :func:`flush`: ``J^T (W1 + g W2 g) J`` in one einsum, not two."""
    if hx.pending is None or len(others) != 1:
        return False
    w, letters = others[0]
    letters = tuple(letters)
    if not (tuple(l1) == tuple(l2) == letters) or tuple(w.shape) != tuple(
            n for axis in t1.out for n in [hx.labels.size(axis)]):
        return False
    (b1, g1), (b2, g2) = T.unscaled(t1, hx.labels), T.unscaled(t2, hx.labels)
    labels = hx.labels
    if (b1.mapped(labels) or b2.mapped(labels)
            or b1.factor.numel() + b2.factor.numel() + w.numel() > min(b1.nnz(labels),
                                                                       b2.nnz(labels))):
        return False
    w = w.detach().to(b1.factor.dtype)
    for g in (g1, g2):
        if g is not None:
            w = w * g
    key = (k1, k2, letters) + tuple((id(b.factor), b.out, b.inp, b.flabels) for b in (b1, b2))
    if key in hx.pending:
        w = hx.pending[key][2] + w
    hx.pending[key] = (b1, b2, w)
    return True


def flush(hx: Tracer) -> list:
    """The terms of the pairs :func:`defer` kept, each contracted once."""
    out = []
    for (k1, k2, letters, *_), (t1, t2, w) in hx.pending.items():
        out.append((k1, k2, pair(t1, letters, t2, letters, [(w, letters)], hx.labels)))
    hx.pending.clear()
    return out


def elementwise(call, traced: Sequence[str], closed=None):
    """The second order of an elementwise ``call(**params)`` in its traced parameters: the
    diagonal ``W_ij = ybar * d2 call / dx_i dx_j`` from nested forward-mode tangents (or from
    ``closed(**params)``'s second derivative where ``input`` alone is traced)."""
    import torch

    def second(hx, result, ybar, **p):
        names = [n for n in traced if hx.terms(p.get(n)) is not None]
        vals = {n: p[n].detach().contiguous() for n in names}
        shape = tuple(result.shape)

        def d1(i, at):
            def f(t):
                return call(**{**p, **at, i: t})

            ones = torch.ones(at[i].shape, dtype=at[i].dtype, device=at[i].device)
            return torch.func.jvp(f, (at[i],), (ones,))[1]

        letters = tuple(range(len(shape)))
        out = []
        forms = closed(**{**p, "input": vals["input"]}) if closed and names == ["input"] else None
        if forms is not None:
            w = (ybar * forms[1].broadcast_to(shape)).detach()
            t = S.broadcast(hx, p["input"], shape)
            return pairs(hx, t, letters, t, letters, [(w, letters)])
        for a, i in enumerate(names):
            for j in names[a:]:
                def g(s, i=i, j=j):
                    return d1(i, {**vals, j: s})

                ones = torch.ones(vals[j].shape, dtype=vals[j].dtype, device=vals[j].device)
                gij = torch.func.jvp(g, (vals[j],), (ones,))[1]
                if torch._is_zerotensor(gij):  # identically zero (linear in these): no term
                    continue
                w = (ybar * gij.broadcast_to(shape)).detach()
                ti, tj = S.broadcast(hx, p[i], shape), S.broadcast(hx, p[j], shape)
                out += pairs(hx, ti, letters, tj, letters, [(w, letters)])
                if i != j:
                    out += pairs(hx, tj, letters, ti, letters, [(w, letters)])
        return out

    return second


def cross(fn):
    """Mark a second-order rule whose terms are cross terms between two traced operands
    only: a step with fewer traced operands has none, and the tracer does not record it."""
    fn.cross = True
    return fn


@cross
def product(hx, result, ybar, input, other) -> list:
    """The second order of ``input * other``: only the cross term, ``W = ybar``."""
    if hx.terms(input) is None or hx.terms(other) is None:
        return []
    shape = tuple(result.shape)
    letters = tuple(range(len(shape)))
    a, b = S.broadcast(hx, input, shape), S.broadcast(hx, other, shape)
    w = [(ybar, letters)]
    return pairs(hx, a, letters, b, letters, w) + pairs(hx, b, letters, a, letters, w)


def bilinear(spec_of):
    """The second order of an einsum whose ``spec_of(**params)`` gives ``(spec, operands)``:
    a cross term for each ordered pair of traced operands."""
    from ..grammar import bind, parse

    def second(hx, result, ybar, **p):
        spec, operands = spec_of(**p)
        e = bind(parse(spec, len(operands)), [tuple(v.shape) for v in operands])
        traced = [k for k, v in enumerate(operands) if hx.terms(v) is not None]
        out = []
        for k1 in traced:
            for k2 in traced:
                if k1 == k2:
                    continue
                others = [(operands[j], e.inputs[j]) for j in range(len(operands))
                          if j not in (k1, k2)] + [(ybar, e.output)]
                out += pairs(hx, hx.terms(operands[k1]), e.inputs[k1],
                             hx.terms(operands[k2]), e.inputs[k2], others)
        return out

    return cross(second)

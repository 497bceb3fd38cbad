"""Hypothesis strategies for random einsum problems in numpy's grammar.

A problem is ``(subscripts, shapes)``: 1-4 operands, letters repeated within and across terms,
``...`` with broadcasting (different ranks under the ellipsis, size-1 dimensions), size-1
broadcasting of named letters, implicit or explicit output, scalar operands and sizes 0-4.
The Jacobians stay small enough for dense references.
"""

from __future__ import annotations

import math

import numpy as np
from hypothesis import strategies as st

POOL = "abcdAB"


@st.composite
def einsum_problems(draw, max_operands: int = 4, max_jacobian: int = 4096):
    n = draw(st.integers(1, max_operands))
    sizes = {c: draw(st.sampled_from([0, 1, 2, 3, 4] if draw(st.booleans()) else [1, 2, 3]))
             for c in POOL}
    n_broadcast = draw(st.integers(0, 2))
    broadcast_sizes = [draw(st.integers(1, 3)) for _ in range(n_broadcast)]

    terms, shapes = [], []
    for _ in range(n):
        letters = draw(st.lists(st.sampled_from(POOL), min_size=0, max_size=3))
        ellipsis = n_broadcast > 0 and draw(st.booleans())
        shape = []
        for c in letters:
            size = sizes[c]
            if letters.count(c) == 1 and size > 1 and draw(st.integers(0, 5)) == 0:
                size = 1  # numpy broadcasts a size-1 dimension of a named letter
            shape.append(size)
        term = "".join(letters)
        if ellipsis:
            k = draw(st.integers(0, n_broadcast))
            dims = [draw(st.sampled_from([s, 1])) for s in broadcast_sizes[n_broadcast - k:]]
            at = draw(st.integers(0, len(letters)))
            term = term[:at] + "..." + term[at:]
            shape = shape[:at] + dims + shape[at:]
        terms.append(term)
        shapes.append(tuple(shape))

    any_ellipsis = any("..." in t for t in terms)
    if draw(st.booleans()):
        subscripts = ",".join(terms)  # implicit output
    else:
        used = sorted(set("".join(terms).replace(".", "")))
        out = draw(st.permutations(used))
        out = list(out[: draw(st.integers(0, len(out)))])
        covered = max((len(s) - len(t.replace("...", "")) for t, s in zip(terms, shapes)
                       if "..." in t), default=0)
        if any_ellipsis and (covered or draw(st.booleans())):
            out.insert(draw(st.integers(0, len(out))), "...")
        subscripts = ",".join(terms) + "->" + "".join(out)

    z = np.einsum(subscripts, *[np.empty(s) for s in shapes])
    biggest = max(math.prod(s) for s in shapes)
    if max(z.size, 1) * max(biggest, 1) > max_jacobian:
        from hypothesis import reject
        reject()
    return subscripts, shapes


def operands_for(shapes, dtype, seed: int):
    """Random operands of ``shapes``; zeros appear so that numeric zeros stay structural."""
    rng = np.random.default_rng(seed)
    out = []
    for shape in shapes:
        x = np.asarray(rng.standard_normal(shape))
        if np.dtype(dtype).kind == "c":
            x = np.asarray(x + 1j * rng.standard_normal(shape))
        x[rng.random(shape) < 0.1] = 0
        out.append(x.astype(dtype))
    return out

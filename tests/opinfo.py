"""torch's operator database (OpInfo) as the reference set: samples, torch's Jacobians, and the
verdict on one entry. Shared by tests/test_opinfo_edges.py and benchmarks/opinfo_census.py."""

from __future__ import annotations

import warnings

import torch

import sparsejac
from sparsejac.errors import SparsejacError

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from torch.testing._internal.common_methods_invocations import op_db
    from torch.testing._internal.opinfo.core import SampleInput

ORDINARY = 2  # ordinary samples kept per entry, beside every zero-size or 0-dim one
MAX_INPUT = 200  # entries of an ordinary sample's input (the reference is dense)
MAX_JACOBIAN = 40_000  # entries of an ordinary sample's dense Jacobian


def differentiable_entries() -> list:
    """The entries torch differentiates in float64 on the CPU."""
    return [op for op in op_db if op.supports_autograd
            and torch.float64 in op.supported_dtypes("cpu")]


def rule_name(op, rules) -> str | None:
    """The registered name the tracer would look the entry's operation up by, if any."""
    names = [op.name, op.name.split(".")[-1], *(a.name for a in op.aliases or ()),
             getattr(op.op, "__name__", "")]
    for n in names:
        if n in rules and rules[n].kind in ("rule", "decomposition"):
            return n
    return None


def entry_id(op) -> str:
    return ".".join(filter(None, (op.name, op.variant_test_name)))


def inputs(s) -> tuple | None:
    """The sample's differentiated tensors: its input, or each tensor of an input list
    (``cat``, ``stack``, ``einsum``); None if it holds anything else."""
    x = s.input
    xs = tuple(x) if isinstance(x, (list, tuple)) else (x,)
    if not xs or not all(isinstance(t, torch.Tensor) and t.is_floating_point() for t in xs):
        return None
    return xs


def edge(xs) -> bool:
    return any(x.dim() == 0 or 0 in x.shape for x in xs)


def samples(op):
    """The entry's float64 samples of tensor inputs: every edge one, a few small ordinary
    ones (the smallest of the first few when none is small)."""
    ordinary, large = 0, []
    for s in op.sample_inputs("cpu", torch.float64, requires_grad=False):
        xs = inputs(s)
        if xs is None:
            continue
        if edge(xs):
            yield s, xs
        elif ordinary < ORDINARY and sum(x.numel() for x in xs) <= MAX_INPUT:
            ordinary += 1
            yield s, xs
        elif len(large) < 4:
            large.append((s, xs))
    if not ordinary and large:
        s, xs = min(large, key=lambda p: sum(x.numel() for x in p[1]))
        if not any(isinstance(a, torch.Tensor) for a in (*s.args, *s.kwargs.values())):
            # nothing to broadcast against: a corner of the input stands for all of it
            xs = tuple(x[(slice(0, 3),) * x.dim()].clone() for x in xs)
            s = SampleInput(list(xs) if isinstance(s.input, (list, tuple)) else xs[0],
                            args=s.args, kwargs=s.kwargs)
        yield s, xs


def reference(f, xs, y):
    """torch's Jacobians, dense (tiny sizes, in the test only), one per input; torch's own
    jacobian cannot stack an empty one, which is all zeros of its shape."""
    def zeros(x):
        return torch.zeros(tuple(y.shape) + tuple(x.shape), dtype=y.dtype)

    if y.numel() == 0:
        return tuple(zeros(x) for x in xs)
    full = [i for i, x in enumerate(xs) if x.numel()]

    def g(*parts):
        args = list(xs)
        for i, p in zip(full, parts):
            args[i] = p
        return f(*args)

    args = tuple(xs[i] for i in full)
    try:  # one batched backward pass; per row where an operation has no batching rule
        got = torch.autograd.functional.jacobian(g, args, vectorize=True)
    except Exception:
        got = torch.autograd.functional.jacobian(g, args)
    out = [zeros(x) for x in xs]
    for i, j in zip(full, got):
        out[i] = j
    return tuple(out)


def verdicts(op):
    """For each checkable sample of ``op``: ``(where, verdict, detail)``, the verdict one of
    "exact", "refused" (the package's own error), "wrong" (a Jacobian unlike torch's), "crash"
    (any other exception); samples torch itself cannot run or differentiate are left out."""
    for s, xs in samples(op):
        listed = isinstance(s.input, (list, tuple))

        def f(*xs, s=s, listed=listed):
            return op.op(list(xs) if listed else xs[0], *s.args, **s.kwargs)

        where = f"{[tuple(x.shape) for x in xs]} {s.args} {s.kwargs}"
        try:
            y = f(*(x.clone() for x in xs))
        except Exception:
            continue
        if not isinstance(y, torch.Tensor) or not y.is_floating_point():
            continue
        if not edge(xs) and y.numel() * sum(x.numel() for x in xs) > MAX_JACOBIAN:
            continue
        try:
            refs = reference(f, tuple(x.clone() for x in xs), y)
        except Exception:
            continue
        try:
            got = sparsejac.jacobian_of(f, *(x.clone() for x in xs), format="coo",
                                        wrt=tuple(range(len(xs))))
        except SparsejacError as e:
            yield where, "refused", str(e)
            continue
        except Exception as e:  # noqa: BLE001 (what the census counts as a crash)
            yield where, "crash", f"{type(e).__name__}: {e}"
            continue
        yield where, *_compare(xs, y, got, refs)


def _compare(xs, y, got, refs) -> tuple[str, str]:
    finite = bool(torch.isfinite(y).all())
    for x, J, ref in zip(xs, got, refs):
        if J.shape != tuple(y.shape) + tuple(x.shape):
            return "wrong", f"shape {J.shape}"
        J = torch.as_tensor(J.todense()).reshape(ref.shape)
        if not (finite and torch.isfinite(ref).all()):
            # past an inf or a nan a forward product keeps a nan that torch's backward pass
            # drops (where's gradient is a selection; 0 * inf is not): compared where both are
            # finite
            mask = torch.isfinite(ref) & torch.isfinite(J)
            J, ref = J[mask], ref[mask]
        try:
            torch.testing.assert_close(J, ref, rtol=1e-7, atol=1e-10)
        except AssertionError as e:
            return "wrong", str(e).splitlines()[0]
    return "exact", ""

"""The tracer: runs ``fn`` once under a ``TorchFunctionMode`` and carries, for every tensor
that depends on a differentiated argument, its Jacobian as a sum of structured terms.

It knows no operation by name: each call on a traced tensor is looked up in the registry
(:mod:`~sparsejac.programs.registry`), its arguments bound to the rule's parameters, and the
rule applied. What it checks itself is what holds for every operation: in-place forms and
``out=`` are refused, integer and boolean results are constants, complex results are refused,
and results computed where torch records no gradient (:func:`recording`: ``no_grad``,
``inference_mode``) are constants. Custom ``autograd.Function`` calls and custom operators
arrive as one operation each (:mod:`~sparsejac.programs.custom`).
"""

from __future__ import annotations

import contextlib
import functools
import threading
import weakref
from typing import Any

from ..errors import UnsupportedOperationError
from . import custom, registry
from .ledger import WeakCall, storage_nbytes
from . import terms as T
from .naming import PREFIX, display_name

Terms = dict  # leaf key -> list[T.Term]: the Jacobian of one tensor w.r.t. each argument leaf

# torch.func's transforms and the tracer's label state are not thread-safe: one trace at a time.
LOCK = threading.RLock()


def name_of(func: Any) -> str:
    name = getattr(func, "__name__", repr(func))
    if name in ("__get__", "__set__"):  # a property such as .T, .mT, .shape
        owner = getattr(func, "__self__", None)
        name = getattr(owner, "__name__", name)
    return name


def leaves(obj: Any):
    if isinstance(obj, (list, tuple)):
        for o in obj:
            yield from leaves(o)
    elif isinstance(obj, dict):
        for o in obj.values():
            yield from leaves(o)
    else:
        yield obj


class Tracer:
    """The state of one trace; :func:`make_tracer` mixes in ``TorchFunctionMode``."""

    def __init__(self, labels: T.Labels, dtype: Any) -> None:
        super().__init__()
        self.labels = labels
        self.dtype = dtype
        # id -> (weak reference to the tensor, terms). An entry goes when its tensor does
        # (weakref callback), so an id is never reused while its entry stands, and the terms
        # of intermediates the program dropped are freed as it runs.
        self._traced: dict[int, tuple[Any, Terms]] = {}
        labels.live = WeakCall(self, "live_bytes", default=0)  # weakly: no cycle
        # For the second order: the steps taken, (rule, params, result's meta stand-in, the
        # slot its adjoint lands in), in order; None when only first derivatives are wanted.
        self.tape: list | None = None
        # Hessian pairs kept to be contracted together (:func:`second.defer`); None: none kept
        self.pending: dict | None = None
        # Rule calls, counted in order; for the second order (:meth:`dead_calls`): the calls
        # each one read terms from, and those the tape keeps. ``skip``: calls (index -> name)
        # whose results' terms a refill does not form (:data:`DEAD`); ``read_dead``: set where
        # a rule asked for such terms after all (the path changed: the trace is not usable).
        self.calls = 0
        self.reads: list[tuple[str, frozenset]] | None = None
        self.taped: list[int] = []
        self._producer: dict[int, int] = {}
        self.skip: dict[int, str] | None = None
        self.read_dead = False

    def record(self, tensor: Any, terms: Terms | None, value: bool = True) -> None:
        """Carry ``terms`` for ``tensor``; the guard counts the tensors the terms hold and,
        with ``value``, ``tensor`` itself (a value the program made and holds; the
        differentiated arguments are the caller's, outside the limit), while they live."""
        if terms is not DEAD:
            terms = {k: v for k, v in (terms or {}).items() if v}
        if terms or terms is DEAD:
            key = id(tensor)
            self._traced[key] = (weakref.ref(tensor, WeakCall(self, "_forget", key)), terms)
            for ts in terms.values():
                for t in ts:
                    self.labels.ledger.track_all(t.held())
        if value and _is_tensor(tensor):  # (a rule's stand-in has no values)
            self.labels.ledger.track(tensor)

    def _forget(self, key: int) -> None:
        self._traced.pop(key, None)

    def collapsed(self, terms: Terms | None) -> Terms | None:
        """A rule's result terms with the entries that land on one place summed
        (:func:`~sparsejac.programs.terms.collapse`): after every rule, so that the labels a
        sum leaves on the input side's index maps never pile up through later layers."""
        if not terms:
            return terms
        return {k: T.merge([T.collapse(t, self.labels) for t in ts], self.labels)
                for k, ts in terms.items()}

    def terms(self, x: Any) -> Terms | None:
        entry = self._traced.get(id(x))
        if entry is None or entry[0]() is not x:
            return None
        if entry[1] is DEAD:  # a refill skipped these terms, and a rule reads them
            self.read_dead = True
            return None
        return entry[1]

    def _has_terms(self, x: Any) -> bool:
        """Whether ``x`` is traced (its terms formed or skipped), without reading them."""
        entry = self._traced.get(id(x))
        return entry is not None and entry[0]() is x

    def dead_calls(self) -> dict[int, str]:
        """After a second-order trace: the rule calls (index -> name) whose results' terms
        nothing reads, neither a taped step's second-order rule nor, through the calls after
        it, any of those: the tail of the program after its last curvature (``tanh(x @ W) **
        2``'s square and sum: a 1M-entry factor each at tanh64), and linear branches that end
        in the output. A refill skips them (:attr:`skip`)."""
        need: set[int] = set()
        taped = set(self.taped)
        for i in range(len(self.reads) - 1, -1, -1):
            if i in need or i in taped:
                need |= self.reads[i][1]
        return {i: name for i, (name, _) in enumerate(self.reads) if i not in need}

    def live_bytes(self) -> int:
        """Bytes of the distinct storages the guard counts: the factors held by the terms of
        live tensors and those a rule has made but not yet recorded, and the program's values
        (a running count, :class:`~sparsejac.programs.ledger.Ledger`: no walk per check)."""
        return self.labels.ledger.nbytes

    def walked_bytes(self) -> int:
        """:meth:`live_bytes` recounted by a walk over every live traced tensor, its terms'
        tensors and every tracked one (a check of the running count; it visits them all)."""
        tensors = [f for _, terms in list(self._traced.values())
                   for ts in terms.values() for t in ts for f in t.held()]
        return storage_nbytes(tensors + self.labels.ledger.tensors())

    def keep_only(self, obj: Any) -> None:
        """Drop the terms of every traced tensor but the leaves of ``obj``."""
        kept = {id(x) for x in leaves(obj)}
        for key in [k for k in self._traced if k not in kept]:
            self._forget(key)

    def _operands(self, rule: Any, params: dict) -> int:
        """How many traced tensors ``params`` pass in the rule's traced parameters."""
        return sum(1 for name in rule.traced for x in leaves(params.get(name))
                   if self._has_terms(x))

    def traced(self, obj: Any) -> bool:
        return any(self._has_terms(x) for x in leaves(obj))

    def _quiet(self):
        """The grad mode the tracer's own work runs in: the first order records nothing for
        torch's autograd (parameters that require grad would otherwise grow graphs under every
        factor); the second order needs autograd's graph of the program for its adjoints."""
        import torch

        return contextlib.nullcontext() if self.tape is not None else torch.no_grad()

    def _unrecorded(self, name: str, func: Any, args: tuple, kwargs: dict) -> Any:
        """A call where torch records no derivative (``no_grad``, ``inference_mode``,
        ``set_grad_enabled(False)``): its results are constants, as torch's autograd and
        ``torch.func`` have them. A write into a traced tensor there would change the values
        under terms already formed from them, so it is refused; so is a custom Function's
        forward that torch runs there itself (:func:`custom.running_function`)."""
        cls = custom.running_function()
        if cls is not None:
            raise UnsupportedOperationError(custom.bypassed(cls, PREFIX))
        if _writes(name, kwargs) and self.traced(_written(args, kwargs)):
            raise UnsupportedOperationError(
                f"{PREFIX}in-place operation {name!r} on a traced tensor inside a region where "
                "torch records no gradient (no_grad, inference_mode) is not supported; write "
                "into a copy, or detach the tensor first")
        return func(*args, **kwargs)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        import torch

        kwargs = kwargs or {}
        if not self.traced((args, kwargs)):
            # run as the program wrote it, in its grad mode: this is also how torch's own
            # switches (``_set_grad_enabled``, called by ``no_grad`` and ``enable_grad``) arrive
            return func(*args, **kwargs)
        name = name_of(func)
        if not recording():
            return self._unrecorded(name, func, args, kwargs)
        declared = custom.key_of(func)  # a custom Function or operator: declared by users
        rule = registry.lookup(name, declared)
        if rule is None and declared is not None:
            raise UnsupportedOperationError(custom.refusal(declared, PREFIX))
        if rule is not None and rule.kind in ("metadata", "constant"):
            return func(*args, **kwargs)
        if rule is not None and rule.kind == "python":
            raise UnsupportedOperationError(
                f"{PREFIX}{name!r} turns a traced tensor into a Python value, which would drop "
                "its dependence on the differentiated argument; keep the computation in torch"
            )
        if _writes(name, kwargs):
            raise UnsupportedOperationError(
                f"{PREFIX}in-place operation {name!r} on a traced tensor is not supported; "
                "write it out of place (y = y + 1, not y += 1, y.add_(1) or inplace=True)"
            )
        if rule is None:
            with self._quiet():
                result = func(*args, **kwargs)
            if _constant(result):
                return result
            raise UnsupportedOperationError(
                f"{PREFIX}operation {display_name(func)} on a traced tensor is not supported. "
                "See sparsejac.programs.RULES (or the docs' operation table) for the supported "
                "operations; write it with those, or pass the tensor in as a constant"
            )
        method = getattr(torch.Tensor, name, None) is func
        try:
            params = registry.bind(rule, args, dict(kwargs), method)
        except TypeError as error:
            raise UnsupportedOperationError(f"{PREFIX}{name!r}: {error}") from None
        if params.get("inplace") is True:
            raise UnsupportedOperationError(
                f"{PREFIX}{name!r} with inplace=True on a traced tensor is not supported; pass "
                "inplace=False (nn modules: construct them with inplace=False)")
        for key, value in params.items():
            if key not in rule.traced and self.traced(value):
                raise UnsupportedOperationError(
                    f"{PREFIX}{name!r}: a traced tensor as {key!r} is not supported; "
                    "its derivative there is not followed (detach it if it is a constant)"
                )
        with self._quiet():
            result = func(*args, **kwargs)
        if _constant(result):
            return result
        outputs = [result] if isinstance(result, torch.Tensor) else list(result)
        for r in outputs:
            if isinstance(r, torch.Tensor) and r.is_complex():
                raise UnsupportedOperationError(
                    f"{PREFIX}{name!r} gives a complex tensor; complex values are not supported"
                )
            if isinstance(r, torch.Tensor) and r.is_floating_point():
                # counted from now, not from when the rule records it: the rule's own factors
                # are guarded with the result already alive
                self.labels.ledger.track(r)
        self.labels.prefix = f"{PREFIX}{name!r}: "
        second = self.tape is not None
        expand = rule.expand if second and rule.kind == "rule" and rule.second is None else None
        if second and rule.kind == "rule" and rule.second is None and expand is None:
            if declared is not None:
                raise UnsupportedOperationError(
                    f"{PREFIX}{custom.describe(declared)} has no declared second order, so "
                    "hessian_of cannot follow it: register it with a rule and second=..., or "
                    "as \"forward\" where its backward is the forward's true derivative")
            raise UnsupportedOperationError(
                f"{PREFIX}{name!r} has no second-order rule, so hessian_of cannot follow it; "
                "write it with operations that have one (see the docs' operation table)")
        try:
            for r in outputs:
                if isinstance(r, torch.Tensor):
                    self.labels.guard(tuple(r.shape), self.dtype.itemsize, "derivative values")
            if rule.kind == "decomposition" or expand is not None:
                with self:
                    value = (expand or rule.fn)(**params)
                if second:  # the adjoints must flow through the steps that were traced
                    return value
                values = [value] if isinstance(value, torch.Tensor) else list(value)
                parts = [self.terms(v) for v in values]
            else:
                index, self.calls = self.calls, self.calls + 1
                if self.skip is not None and self.skip.get(index, name) != name:
                    self.skip = None  # another path than the one traced: skip no more
                if self.skip is not None and index in self.skip:
                    parts = [DEAD] * len(outputs)
                else:
                    with self._quiet():
                        got = rule.fn(self, result, **params)
                    parts = [got] if isinstance(result, torch.Tensor) else list(got)
                    parts = [self.collapsed(p) for p in parts]
                if self.reads is not None:
                    self.reads.append((name, frozenset(
                        self._producer[id(x)] for x in leaves(params)
                        if self._has_terms(x) and id(x) in self._producer)))
                    for r in outputs:
                        self._producer[id(r)] = index
            for r, t in zip(outputs, parts):
                if isinstance(r, torch.Tensor) and (r.is_floating_point()):
                    self.record(r, t)
            if second and rule.second != "linear" and not (
                    getattr(rule.second, "cross", False) and self._operands(rule, params) < 2):
                # (a cross term needs two traced operands: a product or matmul with a
                # constant is linear, and taping it would keep its input and terms alive)
                self.taped.append(self.calls - 1)
                r = result if isinstance(result, torch.Tensor) else result[0]
                if r.requires_grad:
                    # the tape keeps no result (at a million variables each is 8 MB, and its
                    # first-order terms live as long as it does): a hook keeps its adjoint when
                    # the backward pass reaches it, and its shape and dtype stand in for it
                    slot: dict = {}
                    r.register_hook(functools.partial(_keep_adjoint, slot))
                    self.tape.append((rule, params, torch.empty(r.shape, dtype=r.dtype,
                                                                device="meta"), slot))
        except T.TooManyLabelsError as error:
            raise UnsupportedOperationError(f"{PREFIX}{name!r}: {error}") from None
        finally:
            self.labels.prefix = PREFIX
        return result


def recording() -> bool:
    """Whether torch records derivatives here: grad mode on and inference mode off (an
    ``enable_grad`` inside ``inference_mode`` records nothing either)."""
    import torch

    return torch.is_grad_enabled() and not torch.is_inference_mode_enabled()


def _writes(name: str, kwargs: dict) -> bool:
    """Whether a call writes into one of its arguments: an in-place method (``add_``,
    ``__iadd__``, ``__setitem__``), ``out=`` or ``inplace=True``."""
    return ((name.endswith("_") and not name.startswith("__")) or name.startswith("__i")
            or name == "__setitem__" or kwargs.get("out") is not None
            or kwargs.get("inplace") is True)


def _written(args: tuple, kwargs: dict) -> Any:
    """The tensors a writing call writes into: ``out=``, else its first argument."""
    if kwargs.get("out") is not None:
        return kwargs["out"]
    return args[:1]


def _keep_adjoint(slot: dict, grad: Any) -> None:
    """A taped step's adjoint, kept as the backward pass gives it (the gradient unchanged)."""
    slot["ybar"] = grad


class _Dead(dict):
    """The terms a refill did not form (:meth:`Tracer.dead_calls`): traced, never read."""


DEAD: Terms = _Dead()


def _is_tensor(x: Any) -> bool:
    import torch

    return isinstance(x, torch.Tensor)


def _constant(result: Any) -> bool:
    """Integer and boolean results (casts, indices, masks) carry no derivative in torch."""
    import torch

    return isinstance(result, torch.Tensor) and not (result.is_floating_point() or result.is_complex())


@functools.cache
def _tracer_class() -> type:
    from torch.overrides import TorchFunctionMode

    return type("Tracer", (Tracer, TorchFunctionMode), {})


def make_tracer(labels: T.Labels, dtype: Any) -> Tracer:
    return _tracer_class()(labels, dtype)

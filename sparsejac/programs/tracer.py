"""The tracer: runs ``fn`` once under a ``TorchFunctionMode`` and carries, for every tensor
that depends on a differentiated argument, its Jacobian as a sum of structured terms.

It knows no operation by name: each call on a traced tensor is looked up in the registry
(:mod:`~sparsejac.programs.registry`), its arguments bound to the rule's parameters, and the
rule applied. What it checks itself is what holds for every operation: integer and boolean
results are constants, complex results are refused, and results computed where torch records
no gradient (:func:`recording`: ``no_grad``, ``inference_mode``) are constants. Calls that write
into an argument (in-place forms, ``out=``, ``inplace=True``, slice assignment) go to the one
registered writer (:data:`registry.WRITES`), and so do views read after their base was written
(torch's version counter tells which). Custom ``autograd.Function`` calls and custom operators
arrive as one operation each (:mod:`~sparsejac.programs.intercept`).

This is the first-order dispatch. For a Hessian the tracer also holds a
:class:`~sparsejac.programs.tape.Tape`, which records the steps with curvature and what each
call read; running the backward pass and the second-order rules over it is the driver's
(:mod:`~sparsejac.programs.collect`). It imports the registry, the terms, the tape and the
interception hooks, never the rules, the declarations (:mod:`~sparsejac.programs.custom`), the
driver or the writers.
"""

from __future__ import annotations

import contextlib
import functools
import weakref
from typing import Any, Iterator

from ..errors import UnsupportedOperationError
from . import intercept, registry
from . import terms as T
from .ledger import WeakCall, storage_key, storage_nbytes
from .naming import PREFIX, display_name, name_of
from .tape import DEAD, Tape

Terms = dict  # leaf key -> list[T.Term]: the Jacobian of one tensor w.r.t. each argument leaf


def leaves(obj: Any) -> Iterator[Any]:
    """What ``obj`` holds, through its lists, tuples and dicts (a call's arguments)."""
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
        # of intermediates the program dropped are freed as it runs. With them, the tensor's
        # version (torch's count of writes into its storage) when they were recorded: a write
        # through another view of the storage makes them stale (:meth:`terms`).
        self._traced: dict[int, tuple[Any, Terms, int]] = {}
        self.arguments: set[int] = set()  # ids of the differentiated arguments' tensors
        # Bases the program wrote into (id -> weak reference), and views of them that are
        # constants as they were made (under no_grad, or with no terms), with their version
        # then: a view of a written base that is neither traced nor such a constant sees the
        # base's values, so it takes its terms from the base's (:meth:`_aliased`).
        self.written: dict[int, Any] = {}
        self.frozen: dict[int, tuple[Any, int]] = {}
        labels.live = WeakCall(self, "live_bytes", default=0)  # weakly: no cycle
        # The second order's record of the trace (:mod:`~sparsejac.programs.tape`); None when
        # only first derivatives are wanted, and once the trace is done.
        self.tape: Tape | None = None
        # Hessian pairs kept to be contracted together (:func:`second.defer`); None: none kept
        self.pending: dict | None = None
        # set where a rule asked for terms a refill skipped (:data:`DEAD`) after all: the path
        # changed, and the trace is not usable
        self.read_dead = False
        # Recording the steps (an order of accumulation other than forward,
        # :mod:`~sparsejac.programs.accumulate`): step key -> the step's own Jacobian, terms
        # keyed by the tensors it read (their step keys, or an argument's); the tensor a step
        # makes then carries the identity on its own step key. None: forward accumulation.
        self.steps: dict | None = None

    def record(self, tensor: Any, terms: Terms | None, value: bool = True) -> None:
        """Carry ``terms`` for ``tensor``; the guard counts the tensors the terms hold and,
        with ``value``, ``tensor`` itself (a value the program made and holds; the
        differentiated arguments are the caller's, outside the limit), while they live."""
        if terms is not DEAD:
            terms = {k: v for k, v in (terms or {}).items() if v}
            if self.steps is not None and value and terms and _is_tensor(tensor):
                terms = self._step(tensor, terms)
        key = id(tensor)
        if not value:
            self.arguments.add(key)
        if terms or terms is DEAD:
            self._traced[key] = (weakref.ref(tensor, WeakCall(self, "forget", key)), terms,
                                 _version(tensor))
            for ts in terms.values():
                for t in ts:
                    self.labels.ledger.track_all(t.held())
        if value and _is_tensor(tensor):  # (a rule's stand-in has no values)
            self.labels.ledger.track(tensor)

    def _step(self, tensor: Any, terms: Terms) -> Terms:
        """Keep ``terms`` as a new step's own Jacobian; ``tensor`` then carries the identity
        on that step (none where it is empty: nothing depends on it)."""
        key = ("step", len(self.steps))
        self.steps[key] = terms
        for ts in terms.values():
            for t in ts:
                self.labels.ledger.track_all(t.held())
        if not tensor.numel():
            return {}
        return {key: [T.identity(tuple(tensor.shape), self.labels, self.dtype, tensor.device)]}

    def forget(self, key: int) -> None:
        """Drop the terms of the tensor whose id is ``key`` (nothing if it has none)."""
        self._traced.pop(key, None)

    def is_argument(self, x: Any) -> bool:
        """Whether ``x`` is a differentiated argument's tensor itself."""
        entry = self._traced.get(id(x))
        return id(x) in self.arguments and entry is not None and entry[0]() is x

    def holds(self, x: Any) -> bool:
        """Whether a derivative recorded so far reads the values in ``x``'s storage: a factor
        of a live tensor's terms, or (second order) a step the tape keeps."""
        key = storage_key(x)
        for entry in list(self._traced.values()):
            if entry[1] is DEAD:
                continue
            for ts in entry[1].values():
                for t in ts:
                    if any(storage_key(f) == key for f in t.held()):
                        return True
        for params in self.tape.inputs() if self.tape is not None else ():
            if any(storage_key(v) == key for v in leaves(params) if _is_tensor(v)):
                return True
        return False

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
            if self.written and _is_tensor(x) and self._aliased(x):  # a view of a written base
                self.record(x, registry.WRITES.handler.alias(self, x, False))
                return self.terms(x) if self._has_terms(x) else None
            return None
        if entry[1] is not DEAD and entry[2] != _version(x):  # written since: read from the base
            self.forget(id(x))
            self.record(x, registry.WRITES.handler.alias(self, x, True))
            return self.terms(x) if self._has_terms(x) else None
        if entry[1] is DEAD:  # a refill skipped these terms, and a rule reads them
            self.read_dead = True
            return None
        return entry[1]

    def _as_shaped(self, terms: Terms | None, value: Any, result: Any) -> Terms | None:
        """A decomposition's terms for torch's own result: reshaped where its value has the
        result's entries in another shape (a 0-dim input's ``vander``)."""
        if not terms or not _is_tensor(value) or not _is_tensor(result) or (
                tuple(value.shape) == tuple(result.shape)):
            return terms
        if value.numel() != result.numel():
            raise UnsupportedOperationError(
                f"{PREFIX}a decomposition gave shape {tuple(value.shape)} for a result of shape "
                f"{tuple(result.shape)}")
        shape = tuple(result.shape)
        return {k: [T.reshape(t, shape, self.labels) for t in ts] for k, ts in terms.items()}

    def _has_terms(self, x: Any) -> bool:
        """Whether ``x`` is traced (its terms formed or skipped), without reading them."""
        entry = self._traced.get(id(x))
        return entry is not None and entry[0]() is x

    def _aliased(self, x: Any) -> bool:
        """Whether ``x``, not traced itself, is a view of a base the program wrote into (made
        before the write, or a constant view made before a later write): it sees the base's
        values, so it is traced through it."""
        base = getattr(x, "_base", None)
        if base is None or id(base) not in self.written or self.written[id(base)]() is not base:
            return False
        frozen = self.frozen.get(id(x))
        if frozen is not None and frozen[0]() is x and frozen[1] == _version(x):
            return False  # a constant view, its base not written since
        return True

    def wrote(self, root: Any) -> None:
        """Note that the program wrote into ``root`` (views of it now see new values)."""
        self.written[id(root)] = weakref.ref(root)

    def freeze(self, results: Any) -> None:
        """Keep, for views among ``results`` that carry no terms, the version they were made
        at: they are constants until their base is written."""
        for r in leaves(results):
            if _is_tensor(r) and r._base is not None and not self._has_terms(r):
                try:
                    self.frozen[id(r)] = (weakref.ref(r), _version(r))
                except TypeError:
                    pass

    def live_bytes(self) -> int:
        """Bytes of the distinct storages the guard counts: the factors held by the terms of
        live tensors and those a rule has made but not yet recorded, and the program's values
        (a running count, :class:`~sparsejac.programs.ledger.Ledger`: no walk per check)."""
        return self.labels.ledger.nbytes

    def walked_bytes(self) -> int:
        """:meth:`live_bytes` recounted by a walk over every live traced tensor, its terms'
        tensors and every tracked one (a check of the running count; it visits them all)."""
        tensors = [f for _, terms, _ in list(self._traced.values())
                   for ts in terms.values() for t in ts for f in t.held()]
        return storage_nbytes(tensors + self.labels.ledger.tensors())

    def keep_only(self, obj: Any) -> None:
        """Drop the terms of every traced tensor but the leaves of ``obj``."""
        kept = {id(x) for x in leaves(obj)}
        for key in [k for k in self._traced if k not in kept]:
            self.forget(key)

    def _operands(self, rule: Any, params: dict) -> int:
        """How many traced tensors ``params`` pass in the rule's traced parameters."""
        return sum(1 for name in rule.traced for x in leaves(params.get(name))
                   if self._has_terms(x))

    def traced(self, obj: Any) -> bool:
        # (a view of a written base counts only once the program has written one: the check
        # is on every call's arguments)
        return any(self._has_terms(x) or (bool(self.written) and _is_tensor(x) and self._aliased(x))
                   for x in leaves(obj))

    def quiet(self):
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
        forward that torch runs there itself (:func:`intercept.running_function`)."""
        cls = intercept.running_function()
        if cls is not None:
            raise UnsupportedOperationError(intercept.bypassed(cls, PREFIX))
        if _writes(name, kwargs) and self.traced(_written(args, kwargs)):
            raise UnsupportedOperationError(
                f"{PREFIX}in-place operation {name!r} on a traced tensor inside a region where "
                "torch records no gradient (no_grad, inference_mode) is not supported; write "
                "into a copy, or detach the tensor first")
        result = func(*args, **kwargs)
        self.freeze(result)
        return result

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
        declared = intercept.key_of(func)  # a custom Function or operator: declared by users
        rule = registry.lookup(name, declared)
        if rule is None and declared is None:  # written with registered ones, where torch has it
            rule = registry.fallback(name, func)
        if rule is None and declared is not None:
            raise UnsupportedOperationError(intercept.refusal(declared, PREFIX))
        if rule is not None and rule.kind in ("metadata", "constant"):
            return func(*args, **kwargs)
        if rule is not None and rule.kind == "python":
            raise UnsupportedOperationError(
                f"{PREFIX}{name!r} turns a traced tensor into a Python value, which would drop "
                "its dependence on the differentiated argument; keep the computation in torch"
            )
        if _writes(name, kwargs):
            return registry.WRITES.handler.write(self, name, func, args, kwargs,
                                                 kwargs.get("inplace") is True)
        if rule is None:
            with self.quiet():
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
        if params.get("inplace") is True:  # given by position
            return registry.WRITES.handler.write(self, name, func, args, kwargs, True)
        for key, value in params.items():
            if key not in rule.traced and self.traced(value):
                raise UnsupportedOperationError(
                    f"{PREFIX}{name!r}: a traced tensor as {key!r} is not supported; "
                    "its derivative there is not followed (detach it if it is a constant)"
                )
        with self.quiet():
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
        tape = self.tape
        expand = tape.expansion(rule, name, declared) if tape is not None else None
        try:
            for r in outputs:
                if isinstance(r, torch.Tensor):
                    self.labels.guard(tuple(r.shape), self.dtype.itemsize, "derivative values")
            if rule.kind == "decomposition" or expand is not None:
                with self:
                    value = (expand or rule.fn)(**params)
                if tape is not None:  # the adjoints must flow through the steps traced
                    return value
                values = [value] if isinstance(value, torch.Tensor) else list(value)
                parts = [self._as_shaped(self.terms(v), v, r) for v, r in zip(values, outputs)]
            else:
                index, skipped = tape.call(name) if tape is not None else (None, False)
                if skipped:
                    parts = [DEAD] * len(outputs)
                else:
                    with self.quiet():
                        got = rule.fn(self, result, **params)
                    parts = [got] if isinstance(result, torch.Tensor) else list(got)
                    parts = [self.collapsed(p) for p in parts]
                if tape is not None:
                    tape.read(index, name, (x for x in leaves(params) if self._has_terms(x)),
                              outputs)
            for r, t in zip(outputs, parts):
                if isinstance(r, torch.Tensor) and (r.is_floating_point()):
                    self.record(r, t)
            if self.written:
                self.freeze(outputs)
            if tape is not None:
                tape.step(rule, params, result, index, lambda: self._operands(rule, params))
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


def _version(x: Any) -> int:
    """torch's count of writes into ``x``'s storage (0 for a rule's stand-in)."""
    return getattr(x, "_version", 0)


def _is_tensor(x: Any) -> bool:
    import torch

    return isinstance(x, torch.Tensor)


def _constant(result: Any) -> bool:
    """Integer and boolean results (casts, indices, masks) carry no derivative in torch."""
    import torch

    return isinstance(result, torch.Tensor) and not (result.is_floating_point()
                                                     or result.is_complex())


@functools.cache
def _tracer_class() -> type:
    from torch.overrides import TorchFunctionMode

    return type("Tracer", (Tracer, TorchFunctionMode), {})


def make_tracer(labels: T.Labels, dtype: Any) -> Tracer:
    return _tracer_class()(labels, dtype)

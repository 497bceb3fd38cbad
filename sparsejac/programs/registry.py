"""The registry of operation rules: what the tracer looks up, by the name torch reports.

A rule is one small uniform registration (as HIPS autograd's ``defvjp``): the spellings torch
reports for the operation (``torch.op``, ``Tensor.op`` and ``torch.nn.functional.op`` share a
``__name__``; ``nn`` modules call the functional form), its parameters in torch's order with
their defaults, and a function from the traced call to the Jacobian terms of its result. The
tracer (:mod:`~sparsejac.programs.tracer`) knows no operation by name; it binds the call's
arguments to the rule's parameters and calls it.

Kinds of registration:

- :func:`rule`: ``jacobian(cx, result, **params) -> Terms`` (or a list of Terms, one per
  output of a tuple result), built with :mod:`~sparsejac.programs.sums`.
- :func:`decomposition`: ``value(**params) -> tensor``, the operation written with other
  registered operations; the tracer follows it, so its Jacobian comes from theirs.
- :func:`passive`: operations on traced tensors whose results carry no derivative (metadata
  queries, comparisons, ``*_like`` constructors) or which must be refused (Python values).

>>> from sparsejac.programs import RULES
>>> RULES["relu"].params[:2]
(('input', <class 'inspect._empty'>), ('inplace', False))
"""

from __future__ import annotations

import ast
import functools
import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

EMPTY = inspect.Parameter.empty


def parse_params(spec: str) -> tuple[tuple[str, Any], ...]:
    """``"input weight bias=None *shape"`` -> ``(("input", EMPTY), ..., ("*shape", ()))``."""
    params = []
    for word in spec.split():
        if word.startswith("**"):
            params.append((word, {}))
        elif word.startswith("*"):
            params.append((word, ()))
        elif "=" in word:
            name, default = word.split("=", 1)
            params.append((name, ast.literal_eval(default)))
        else:
            params.append((word, EMPTY))
    return tuple(params)


@dataclass(frozen=True)
class Rule:
    """One registered operation."""

    names: tuple[str, ...]
    kind: str  # "rule", "decomposition", "metadata", "constant", "python"
    params: tuple[tuple[str, Any], ...] = ()
    method_params: tuple[tuple[str, Any], ...] | None = None  # Tensor method's own order
    fn: Callable | None = None
    group: str = ""
    # names of parameters that may hold traced tensors (others traced are refused by name)
    traced: tuple[str, ...] = field(default=())
    # Second order (:func:`sparsejac.hessian_of`): "linear" (no curvature: sums, layouts,
    # selections, piecewise-linear maxima), or ``fn(hx, result, ybar, **params)`` giving the
    # Hessian terms of the step, or None where ``expand`` (a decomposition used for the
    # second order only) or nothing provides it (then refused by name).
    second: Any = None
    expand: Callable | None = None

    @property
    def name(self) -> str:
        return self.names[0]


RULES: dict[str, Rule] = {}


def _register(rule: Rule) -> Rule:
    for n in rule.names:
        if n in RULES and RULES[n].fn is not rule.fn:
            raise RuntimeError(f"operation {n!r} registered twice")  # a programming error
        RULES[n] = rule
    return rule


def _names(names: str | Sequence[str]) -> tuple[str, ...]:
    return (names,) if isinstance(names, str) else tuple(names)


def rule(names: str | Sequence[str], params: str = "input", *, method: str | None = None,
         traced: str | None = None, second: Any = None, expand: Callable | None = None
         ) -> Callable:
    """Register ``fn(cx, result, **params)`` giving the Jacobian terms of the result.

    ``traced`` names the parameters that may be traced tensors (default: every parameter
    without a default, and ``weight``/``bias``-like defaults of ``None``); a traced tensor in
    any other parameter is refused by name."""

    def decorate(fn: Callable) -> Callable:
        parsed = parse_params(params)
        _register(Rule(_names(names), "rule", parsed,
                       parse_params(method) if method else None, _unless_empty(fn),
                       fn.__module__.rsplit(".", 1)[-1], _traced(parsed, traced),
                       second if not callable(second) else _unless_empty(second, order=2),
                       expand))
        return fn

    return decorate


def _empty(result: Any) -> bool:
    """Whether every tensor ``result`` holds has no entries (a zero-size axis)."""
    parts = result if isinstance(result, (tuple, list)) else (result,)
    sizes = [r.numel() for r in parts if hasattr(r, "numel")]
    return bool(sizes) and not any(sizes)


@functools.lru_cache(maxsize=None)
def _unless_empty(fn: Callable, order: int = 1) -> Callable:
    """``fn`` (a rule's first- or second-order function) that gives no terms for a result with
    no entries: its Jacobian and Hessian are empty, whatever the operands, so the algebra never
    meets a label of size 0 there (a sum, a selection or a division by an axis' size). Cached:
    a function registered under two rules stays one function."""

    @functools.wraps(fn)  # keeps attributes such as ``cross`` (second.py)
    def wrapped(cx: Any, result: Any, *args: Any, **params: Any) -> Any:
        if _empty(result):
            if order == 2:
                return []
            return [{} for _ in result] if isinstance(result, (tuple, list)) else {}
        return fn(cx, result, *args, **params)

    return wrapped


def decomposition(names: str | Sequence[str], params: str = "input", *,
                  method: str | None = None, traced: str | None = None) -> Callable:
    """Register ``fn(**params) -> tensor(s)``: the operation written with registered ones."""

    def decorate(fn: Callable) -> Callable:
        parsed = parse_params(params)
        _register(Rule(_names(names), "decomposition", parsed,
                       parse_params(method) if method else None, fn,
                       fn.__module__.rsplit(".", 1)[-1], _traced(parsed, traced)))
        return fn

    return decorate


def passive(kind: str, names: Sequence[str]) -> None:
    """Register operations whose result carries no derivative (``"metadata"``,
    ``"constant"``) or that turn a traced tensor into a Python value (``"python"``)."""
    _register(Rule(tuple(names), kind))


def _traced(params: tuple[tuple[str, Any], ...], traced: str | None) -> tuple[str, ...]:
    if traced is not None:
        return tuple(traced.split())
    return tuple(n.lstrip("*") for n, d in params if d is EMPTY or d is None or n.startswith("*"))


class Writes:
    """The handler of calls that write into an argument (in-place methods, ``out=``,
    ``inplace=True``, slice assignment) and of views read after their base was written: one
    object, registered by :mod:`.rules.inplace`, so that the tracer knows no write by name."""

    handler: Any = None


WRITES = Writes()


def register_writer(handler: Any) -> None:
    """Make ``handler`` (``write(cx, name, func, args, kwargs, inplace)``, ``alias(cx, x)``)
    the one that follows writes."""
    WRITES.handler = handler


# Where no rule is registered for an operation, these are asked in order for one written with
# registered operations (:mod:`.rules.tables` reads torch's own reference implementations):
# ``provider(name, func) -> Rule | None``. What they give is kept, per name.
FALLBACKS: list[Callable[[str, Any], Rule | None]] = []
_FOUND: dict[Any, Rule | None] = {}


def register_fallback(provider: Callable[[str, Any], Rule | None]) -> None:
    FALLBACKS.append(provider)
    _FOUND.clear()


def fallback(name: str, func: Any) -> Rule | None:
    """A decomposition of an operation with no rule, from the first provider that has one."""
    try:
        key: Any = (name, func)
        hash(key)
    except TypeError:
        key = name
    if key not in _FOUND:
        _FOUND[key] = next((r for r in (p(name, func) for p in FALLBACKS) if r is not None),
                           None)
    return _FOUND[key]


def decomposed(name: str, fn: Callable) -> Rule:
    """A decomposition rule that takes the call as it was made: ``fn(*args, **kwargs)``."""
    return Rule((name,), "decomposition", (("*call", ()), ("**kwargs", {})), None,
                lambda call, kwargs: fn(*call, **kwargs), "tables", ("call", "kwargs"))


# Derivatives users declare (:mod:`~sparsejac.programs.custom`), keyed by a custom
# ``autograd.Function`` class or a custom operator's qualified name; apart from ``RULES`` (the
# operations torch reports by name), which the docs' table and the rule tests enumerate.
CUSTOM: dict[Any, Rule] = {}


def register_custom(key: Any, rule: Rule) -> Rule:
    """Declare (or replace) the rule of a user's operation."""
    CUSTOM[key] = rule
    return rule


def unregister_custom(key: Any) -> None:
    CUSTOM.pop(key, None)


def lookup(name: str, key: Any = None) -> Rule | None:
    """The rule of an operation torch reports as ``name``, or, given ``key`` (a user's
    operation), the one declared for it."""
    return CUSTOM.get(key) if key is not None else RULES.get(name)


def bind(rule: Rule, args: Sequence[Any], kwargs: dict, method: bool) -> dict[str, Any]:
    """The call's arguments by parameter name, defaults filled in. Raises ``TypeError`` naming
    an unexpected keyword or a missing argument (the tracer turns it into the package's
    error)."""
    params = rule.method_params if (method and rule.method_params) else rule.params
    bound: dict[str, Any] = {}
    args = list(args)
    rest_kw = next((n[2:] for n, _ in params if n.startswith("**")), None)
    params = tuple(p for p in params if not p[0].startswith("**"))
    for i, (name, default) in enumerate(params):
        if name.startswith("*"):
            rest = args[i:]
            if len(rest) == 1 and isinstance(rest[0], (list, tuple)) and name != "*call":
                rest = list(rest[0])  # (``*call``: the positional arguments as given)
            key = name[1:]
            bound[key] = tuple(rest) if rest else kwargs.pop(key, default)
            args = args[:i]
            break
        if i < len(args):
            bound[name] = args[i]
        elif name in kwargs:
            bound[name] = kwargs.pop(name)
        elif default is not EMPTY:
            bound[name] = default
        else:
            raise TypeError(f"missing argument {name!r}")
    else:
        if len(args) > len(params):
            raise TypeError(f"{len(args)} positional arguments; it takes {len(params)}")
    for name, default in params:  # keywords named after parameters bound positionally
        if name in kwargs:
            raise TypeError(f"argument {name!r} given twice")
    if rest_kw is not None:
        bound[rest_kw] = dict(kwargs)
        kwargs = {}
    if kwargs:
        raise TypeError(f"unexpected keyword argument(s) {sorted(kwargs)}")
    return bound

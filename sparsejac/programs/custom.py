"""Derivatives that users declare: custom ``torch.autograd.Function`` classes and custom
operators (``torch.library.custom_op``).

torch defines such an operation's derivative by its ``backward`` (or the function given to
``register_autograd``), not by the operations its forward happens to run: a straight-through
estimator rounds in its forward and passes the gradient in its backward. The tracer therefore
never follows a Function's forward. A call to a Function on a traced tensor reaches the tracer
as one operation (:func:`intercepting` routes ``Function.apply`` through the torch-function
protocol while a trace runs on this thread), and a custom operator reaches it as its
``OpOverload``; both are looked up here, in the registry the built-in rules use
(:func:`~sparsejac.programs.registry.register_custom`), and refused by name where nothing was
declared.

What a user can declare (:func:`register_function`):

- ``"elementwise"``: each output entry depends on the same entry of each traced input (all of
  the output's shape); the diagonal is read from the Function's own backward, one pass with a
  gradient of ones, so it is torch's derivative whatever the forward computes.
- ``"forward"``: the backward is the true derivative of the forward (a fused or hand-written
  kernel); the forward's operations are traced as if they were written inline. Functions only.
- a rule ``fn(cx, result, *inputs) -> Terms`` written with :mod:`sparsejac.programs.sums`, as
  the built-in rules are (its parameters are the Function's forward's, without ``ctx``);
  ``second`` gives its second order for :func:`sparsejac.hessian_of`.

>>> import torch, sparsejac
>>> class RoundSTE(torch.autograd.Function):
...     @staticmethod
...     def forward(ctx, x):
...         return torch.round(x)
...     @staticmethod
...     def backward(ctx, g):
...         return g
>>> _ = sparsejac.register_function(RoundSTE, "elementwise")
>>> J = sparsejac.jacobian_of(lambda x: RoundSTE.apply(x) * 2, torch.randn(3), format="csr")
>>> J.toarray().diagonal().tolist()       # the backward's derivative, not round's zero
[2.0, 2.0, 2.0]
"""

from __future__ import annotations

import contextlib
import inspect
import threading
from typing import Any, Callable, Iterator

from ..errors import ArgumentError, ArgumentTypeError, UnsupportedOperationError
from . import registry
from .registry import EMPTY, Rule

DECLARATIONS = ("elementwise", "forward")

_HERE = threading.local()  # .depth: traces running on this thread
_PATCH_LOCK = threading.Lock()
_PATCHED = {"count": 0, "original": None}


class FunctionCall:
    """A custom Function's ``apply``, as the tracer sees it: one operation named after the
    class, keyed in the registry by the class itself."""

    def __init__(self, cls: type, original: Any) -> None:
        self.cls, self._original = cls, original
        self.__name__ = cls.__qualname__

    @property
    def key(self) -> Any:
        return self.cls

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._original.__get__(None, self.cls)(*args, **kwargs)


def key_of(func: Any) -> Any:
    """The registry key of a call the tracer sees, where it is a user-declarable operation: a
    Function's class, or a custom operator's qualified name (``"mylib::op"``); else None."""
    if isinstance(func, FunctionCall):
        return func.cls
    kind = type(func).__name__
    name = (func.name() if kind == "OpOverload" else
            func._qualified_op_name if kind == "OpOverloadPacket" else None)
    if name is not None and not name.startswith(("aten::", "prim::", "prims::")):
        return name.split(".", 1)[0]
    return None


def describe(key: Any) -> str:
    """How a message names a declarable operation."""
    if isinstance(key, type):
        return f"custom autograd.Function {key.__module__}.{key.__qualname__}"
    return f"custom operator {key}"


def refusal(key: Any, prefix: str) -> str:
    """The message for a declarable operation that has no declared derivative."""
    what = describe(key)
    name = key.__qualname__ if isinstance(key, type) else repr(key)
    forward = (f"; sparsejac.register_function({name}, \"forward\") if its backward is the true "
               "derivative of its forward" if isinstance(key, type) else "")
    return (f"{prefix}{what} on a traced tensor: torch defines its derivative by its backward, "
            "which sparsejac does not read, so its forward is not traced. Declare it: "
            f"sparsejac.register_function({name}, \"elementwise\") if each output entry depends "
            f"only on the same entry of each input{forward}; or a rule fn(cx, result, *inputs) "
            "written with sparsejac.programs.sums (see docs/programs.md, 'Custom Functions')")


# --- interception of Function.apply ----------------------------------------------------------


def _apply(cls, *args: Any, **kwargs: Any) -> Any:
    """``Function.apply`` while a trace runs: on the tracing thread, the call goes through the
    torch-function protocol (as ``torch`` functions do), so the tracer sees it as one
    operation; anywhere else it is torch's own."""
    original = _PATCHED["original"]
    if getattr(_HERE, "depth", 0):
        import torch
        from torch.overrides import handle_torch_function, has_torch_function

        from .tracer import leaves

        tensors = tuple(x for x in leaves((args, kwargs)) if isinstance(x, torch.Tensor))
        if tensors and has_torch_function(tensors):
            return handle_torch_function(FunctionCall(cls, original), tensors, *args, **kwargs)
    return original.__get__(None, cls)(*args, **kwargs)


def rebound(fn: Any) -> Any:
    """``fn`` itself, or, where it is ``X.apply`` of a custom Function (bound before the trace
    began), a call that looks ``X.apply`` up when made, so that it reaches the tracer."""
    import torch

    original = torch.autograd.Function.__dict__["apply"]
    cls = getattr(fn, "__self__", None)
    if (isinstance(cls, type) and issubclass(cls, torch.autograd.Function)
            and getattr(fn, "__func__", None) is getattr(original, "__func__", original)):
        return lambda *args, **kwargs: cls.apply(*args, **kwargs)
    return fn


def running_function() -> type | None:
    """The custom Function whose forward torch's own ``apply`` is running on this thread, if
    any: a call that did not pass :func:`_apply` (a reference to ``X.apply`` taken before the
    trace began), whose forward torch runs with grad mode off. The tracer refuses it rather
    than take its operations for constants (:meth:`Tracer._unrecorded`)."""
    import sys

    original = _PATCHED["original"]
    if original is None:
        return None
    code = original.__func__.__code__
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code is code:
            return frame.f_locals.get("cls")
        frame = frame.f_back
    return None


def bypassed(cls: type, prefix: str) -> str:
    """The message for a Function whose call did not reach the tracer."""
    return (f"{prefix}{describe(cls)} ran its forward on a traced tensor through a reference to "
            f"{cls.__qualname__}.apply taken before the trace began, which sparsejac cannot "
            f"intercept: call {cls.__qualname__}.apply(...) inside fn (and pass x.detach() where "
            "it is meant as a constant)")


@contextlib.contextmanager
def intercepting() -> Iterator[None]:
    """While the block runs on this thread, calls of custom Functions reach the tracer."""
    import torch

    with _PATCH_LOCK:
        if _PATCHED["count"] == 0:
            _PATCHED["original"] = torch.autograd.Function.__dict__["apply"]
            torch.autograd.Function.apply = classmethod(_apply)
        _PATCHED["count"] += 1
    _HERE.depth = getattr(_HERE, "depth", 0) + 1
    try:
        yield
    finally:
        _HERE.depth -= 1
        with _PATCH_LOCK:
            _PATCHED["count"] -= 1
            if _PATCHED["count"] == 0:
                torch.autograd.Function.apply = _PATCHED["original"]


# --- declarations ----------------------------------------------------------------------------


def _setup_context_style(cls: type) -> bool:
    """Whether ``cls.forward`` takes no ``ctx`` (the class defines ``setup_context``)."""
    import torch

    return getattr(cls, "setup_context", None) is not torch.autograd.Function.setup_context


def _params_of(signature: inspect.Signature, drop_first: bool) -> tuple[tuple[str, Any], ...]:
    params = list(signature.parameters.values())[1 if drop_first else 0:]
    out = []
    for p in params:
        if p.kind is p.VAR_POSITIONAL:
            out.append((f"*{p.name}", ()))
        elif p.kind is p.VAR_KEYWORD:
            out.append((f"**{p.name}", {}))
        else:
            out.append((p.name, EMPTY if p.default is p.empty else p.default))
    return tuple(out)


def _call_args(params: tuple[tuple[str, Any], ...], bound: dict) -> tuple[list, dict]:
    """``bound`` (the registry's binding) back to positional and keyword arguments."""
    args, kwargs = [], {}
    for name, _ in params:
        if name.startswith("**"):
            kwargs.update(bound.get(name[2:], {}))
        elif name.startswith("*"):
            args.extend(bound.get(name[1:], ()))
        else:
            args.append(bound[name])
    return args, kwargs


def _elementwise_rule(call: Callable, params: tuple, what: str) -> Callable:
    """A rule reading an elementwise operation's diagonal from torch's backward of it."""

    def jacobian(cx, result, **bound):
        import torch

        from . import sums as S
        from .tracer import PREFIX

        if not isinstance(result, torch.Tensor):
            raise UnsupportedOperationError(
                f"{PREFIX}{what} was declared elementwise but returns {type(result).__name__}; "
                "an elementwise declaration needs one tensor out")
        args, kwargs = _call_args(params, bound)
        fresh: dict[int, Any] = {}

        def renew(x):
            if isinstance(x, torch.Tensor) and cx.terms(x) is not None:
                if tuple(x.shape) != tuple(result.shape):
                    raise UnsupportedOperationError(
                        f"{PREFIX}{what} was declared elementwise, but a traced input has shape "
                        f"{tuple(x.shape)} and its output {tuple(result.shape)}; declare a rule "
                        "for it instead")
                fresh[id(x)] = (x, x.detach().clone().requires_grad_(True))
                return fresh[id(x)][1]
            if isinstance(x, (list, tuple)):
                return type(x)(renew(v) for v in x)
            return x

        args, kwargs = renew(args), {k: renew(v) for k, v in kwargs.items()}
        originals = [pair[0] for pair in fresh.values()]
        inputs = [pair[1] for pair in fresh.values()]
        with torch.enable_grad():
            out = call(*args, **kwargs)
            if not isinstance(out, torch.Tensor) or not out.requires_grad:
                grads = [None] * len(inputs)
            else:
                grads = torch.autograd.grad(out, inputs, torch.ones_like(out), allow_unused=True)
        return S.elementwise(cx, result, [(x, g.detach()) for x, g in zip(originals, grads)
                                          if g is not None])

    return jacobian


def _forward_decomposition(cls: type, params: tuple) -> Callable:
    """The Function's forward run on the traced tensors, so its operations are traced."""

    def value(**bound):
        from torch.autograd.function import FunctionCtx

        args, kwargs = _call_args(params, bound)
        if _setup_context_style(cls):
            return cls.forward(*args, **kwargs)
        ctx = FunctionCtx()
        out = cls.forward(ctx, *args, **kwargs)
        dropped = {id(t) for t in getattr(ctx, "non_differentiable", ())}
        if dropped:  # outputs the Function marks non-differentiable carry no derivative
            if isinstance(out, tuple):
                return tuple(o.detach() if id(o) in dropped else o for o in out)
            return out.detach() if id(out) in dropped else out
        return out

    return value


def _key_and_params(target: Any) -> tuple[Any, tuple, Callable | None, str]:
    """(registry key, parameters, the call torch makes, the name users wrote) of ``target``: a
    Function subclass, a ``torch.library.custom_op`` (its ``CustomOpDef``), an
    ``OpOverloadPacket``/``OpOverload``, or a custom operator's name ``"ns::op"``."""
    import torch

    if isinstance(target, type) and issubclass(target, torch.autograd.Function):
        if target is torch.autograd.Function:
            raise ArgumentError("register_function: pass a subclass of torch.autograd.Function")
        params = _params_of(inspect.signature(target.forward),
                            drop_first=not _setup_context_style(target))
        return target, params, target.apply, target.__qualname__
    name = None
    if isinstance(target, str):
        name = target
    elif type(target).__name__ == "CustomOpDef":
        name = target._qualname
    elif type(target).__name__ == "OpOverloadPacket":
        name = target._qualified_op_name
    elif type(target).__name__ == "OpOverload":
        name = target.name()
    if name is None:
        raise ArgumentTypeError(
            "register_function: expected a torch.autograd.Function subclass or a custom "
            f"operator (torch.library.custom_op, torch.ops.ns.op, or 'ns::op'), got "
            f"{type(target).__name__}")
    name = name.split(".", 1)[0]
    if "::" not in name or name.startswith("aten::"):
        raise ArgumentError(
            f"register_function: {name!r} is not a custom operator's qualified name ('ns::op')")
    ns, op = name.split("::", 1)
    try:
        overload = getattr(getattr(torch.ops, ns), op).default
    except (AttributeError, RuntimeError):
        raise ArgumentError(f"register_function: no operator {name!r} is defined") from None
    params = tuple((a.name, a.default_value if a.has_default_value() else EMPTY)
                   for a in overload._schema.arguments)
    return name, params, overload, name


def register_function(target: Any, derivative: str | Callable | None = None, *,
                      second: Any = None) -> Any:
    """Declare the derivative of a custom ``torch.autograd.Function`` or custom operator.

    ``derivative`` is ``"elementwise"`` (each output entry depends only on the same entry of
    each traced input: the diagonal is read from the backward torch would run),
    ``"forward"`` (its backward is the true derivative of its forward: the forward is traced;
    Functions only), or a rule ``fn(cx, result, *inputs) -> Terms`` written with
    :mod:`sparsejac.programs.sums`; ``second``: that rule's second order for
    :func:`~sparsejac.hessian_of` (``"linear"`` where it has none). A later declaration of the
    same target replaces an earlier one. Returns ``target``; ``register_function("forward")``
    alone returns a class decorator.

    >>> import torch, sparsejac
    >>> @sparsejac.register_function("forward")
    ... class FusedTanh(torch.autograd.Function):     # backward: the true derivative
    ...     @staticmethod
    ...     def forward(ctx, x):
    ...         y = torch.tanh(x)
    ...         ctx.save_for_backward(y)
    ...         return y
    ...     @staticmethod
    ...     def backward(ctx, g):
    ...         (y,) = ctx.saved_tensors
    ...         return g * (1 - y * y)
    >>> x = torch.randn(4, dtype=torch.float64)
    >>> J = sparsejac.jacobian_of(FusedTanh.apply, x, format="csr")
    >>> bool(torch.allclose(torch.from_numpy(J.diagonal()), 1 - torch.tanh(x) ** 2))
    True
    """
    if derivative is None:
        if (isinstance(target, str) and target in DECLARATIONS) or inspect.isfunction(target):
            decl = target

            def decorate(t: Any) -> Any:
                return register_function(t, decl, second=second)

            return decorate
        raise ArgumentTypeError("register_function: say what the derivative is: "
                                f"one of {DECLARATIONS} or a rule function")
    key, params, call, name = _key_and_params(target)
    traced = tuple(n.lstrip("*") for n, _ in params)
    if derivative == "elementwise":
        if second is not None:
            raise ArgumentError("register_function: second= goes with a rule function only")
        rule = Rule((name,), "rule", params, None, _elementwise_rule(call, params, describe(key)),
                    "custom", traced)
    elif derivative == "forward":
        if not isinstance(key, type):
            raise ArgumentError(
                f"register_function: {name!r}: 'forward' is for autograd.Function subclasses, "
                "whose forward can be traced; declare 'elementwise' or a rule for an operator")
        rule = Rule((name,), "decomposition", params, None, _forward_decomposition(key, params),
                    "custom", traced)
    elif callable(derivative) and not isinstance(derivative, type):
        rule = Rule((name,), "rule", params, None, derivative, "custom", traced, second)
    else:
        raise ArgumentError(f"register_function: derivative must be one of {DECLARATIONS} or a "
                            f"rule function, got {derivative!r}")
    registry.register_custom(key, rule)
    return target


def unregister_function(target: Any) -> None:
    """Forget a declaration made with :func:`register_function` (no error if there was none)."""
    registry.unregister_custom(_key_and_params(target)[0])

"""Derivatives that users declare: custom ``torch.autograd.Function`` classes and custom
operators (``torch.library.custom_op``).

torch defines such an operation's derivative by its ``backward`` (or the function given to
``register_autograd``), not by the operations its forward happens to run: a straight-through
estimator rounds in its forward and passes the gradient in its backward. The tracer therefore
never follows a Function's forward. A call to a Function on a traced tensor reaches the tracer
as one operation, and a custom operator as its ``OpOverload``
(:mod:`~sparsejac.programs.intercept`); both are looked up in the registry the built-in rules
use, where this module declares them (:func:`~sparsejac.programs.registry.register_custom`), and
refused by name where nothing was declared. This module is the declarations only: the tracer
never imports it.

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

import inspect
from typing import Any, Callable

from ..errors import ArgumentError, ArgumentTypeError, UnsupportedOperationError
from . import registry
from . import sums as S
from .intercept import describe
from .naming import PREFIX
from .registry import EMPTY, Rule

DECLARATIONS = ("elementwise", "forward")


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

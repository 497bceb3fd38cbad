"""How custom ``torch.autograd.Function`` calls and custom operators reach the tracer: the hooks
it needs, apart from what users declare (:mod:`~sparsejac.programs.custom`).

torch defines such an operation's derivative by its ``backward``, so the tracer never follows a
Function's forward: while a trace runs on this thread, :func:`intercepting` routes
``Function.apply`` through the torch-function protocol, so that a call on a traced tensor
arrives as one operation (a :class:`FunctionCall`); a custom operator arrives as its
``OpOverload``. :func:`key_of` gives the registry key either is declared under, and
:func:`running_function` finds a forward that torch runs without passing the tracer (a reference
to ``X.apply`` taken before the trace). The messages that name such an operation are here too.

It imports nothing of the package (no tracer, no registry, no rules): the tracer and the
declarations both import it.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any, Iterator

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


def _apply(cls, *args: Any, **kwargs: Any) -> Any:
    """``Function.apply`` while a trace runs: on the tracing thread, the call goes through the
    torch-function protocol (as ``torch`` functions do), so the tracer sees it as one
    operation; anywhere else it is torch's own."""
    original = _PATCHED["original"]
    if getattr(_HERE, "depth", 0):
        import torch
        from torch.overrides import handle_torch_function, has_torch_function
        from torch.utils import _pytree as pytree

        tensors = tuple(x for x in pytree.tree_leaves((args, kwargs))
                        if isinstance(x, torch.Tensor))
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
    than take its operations for constants (:class:`~sparsejac.programs.tracer.Tracer`)."""
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

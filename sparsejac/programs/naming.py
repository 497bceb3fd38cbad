"""Names in the tracer's messages and lookups: :data:`PREFIX`, the context every message of
the tracing code starts with, and :func:`entry_point`, which names the public entry point in its
place; :func:`name_of`, the name torch reports for a callable (the registry's key); and
:func:`display_name`, the name a user writes for it: ``torch.diff``,
``Tensor.clamp_min``, ``F.interpolate``, ``torch.linalg.solve``, ``torch.ops.aten.sin.default``
rather than the interpreter's repr (``<built-in method diff of type object at 0x...>``).

It imports nothing of the package but its errors: every module of the programs half may use it.

>>> import torch, torch.nn.functional as F
>>> [display_name(f) for f in (torch.diff, torch.Tensor.clamp_min, F.interpolate)]
['torch.diff', 'Tensor.clamp_min', 'F.interpolate']
>>> display_name(torch.linalg.solve), display_name(torch.ops.aten.sin.default)
('torch.linalg.solve', 'torch.ops.aten.sin.default')
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

from ..errors import SparsejacError

# The context every message of the tracing code starts with (the rules, sums, the tracer and
# the driver raise theirs with it): jacobian_of's own name, which the other entry points replace
# with theirs (:func:`entry_point`).
PREFIX = "jacobian_of: "

PREFIX = "jacobian_of: "  # the programs' messages start with it

# torch's submodules whose functions are builtins named ``<prefix>_<name>`` (linalg_solve)
_SUBMODULES = ("linalg", "special", "fft")


@contextlib.contextmanager
def entry_point(name: str) -> Iterator[None]:
    """Within the block, the package's messages that start with :data:`PREFIX` start with
    ``name`` instead: each message is written once, and each public entry point names itself
    at its boundary (the exception itself is raised on, its type and traceback kept).

    >>> from sparsejac.errors import ArgumentError
    >>> try:
    ...     with entry_point("plan_of"):
    ...         raise ArgumentError(PREFIX + "order=3: 1 (Jacobians) or 2 (Hessians)")
    ... except ArgumentError as error:
    ...     print(error)
    plan_of: order=3: 1 (Jacobians) or 2 (Hessians)
    """
    try:
        yield
    except (SparsejacError, ImportError) as error:  # ImportError: load()'s, without torch
        message = error.args[0] if error.args else None
        if isinstance(message, str) and message.startswith(PREFIX):
            message = f"{name}: {message[len(PREFIX):]}"
            error.args = (message, *error.args[1:])
            if isinstance(error, ImportError):
                error.msg = message  # what an ImportError's str gives
        raise


def name_of(func: Any) -> str:
    """The name torch reports for ``func``, by which the registry knows the operation."""
    name = getattr(func, "__name__", repr(func))
    if name in ("__get__", "__set__"):  # a property such as .T, .mT, .shape
        owner = getattr(func, "__self__", None)
        name = getattr(owner, "__name__", name)
    return name


def display_name(func: Any) -> str:
    """``func`` as it is spelt in user code: ``torch.name``, ``torch.linalg.name`` (also
    ``special`` and ``fft``), ``F.name`` (``torch.nn.functional``), ``Tensor.name`` (methods and
    properties), ``torch.ops.ns.op[.overload]``; else its module and qualified name."""
    import torch
    import torch.nn.functional as F

    if isinstance(func, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
        return f"torch.ops.{func}"  # str: "aten.sin.default" (an overload), "aten.sin"
    name = getattr(func, "__name__", None)
    if not isinstance(name, str):
        return repr(func)
    if name in ("__get__", "__set__"):  # a property's accessor: .T, .mT, .shape
        owner = getattr(func, "__self__", None)
        if _is_tensor_attribute(getattr(owner, "__name__", None), owner):
            return f"Tensor.{owner.__name__}"
    if _is_tensor_attribute(name, func):
        return f"Tensor.{name}"
    if getattr(F, name, None) is func:  # F first: F.conv2d is torch.conv2d, spelt as F's
        return f"F.{name}"
    if getattr(torch, name, None) is func:
        return f"torch.{name}"
    for sub in _SUBMODULES:
        short = name[len(sub) + 1:] if name.startswith(sub + "_") else name
        if getattr(getattr(torch, sub), short, None) is func:
            return f"torch.{sub}.{short}"
    module, qualname = getattr(func, "__module__", None), getattr(func, "__qualname__", name)
    return f"{module}.{qualname}" if module and module != "builtins" else qualname


def _is_tensor_attribute(name: Any, obj: Any) -> bool:
    """Whether ``obj`` is ``torch.Tensor``'s attribute ``name`` (a method, or a property's
    descriptor), looked up on the class without invoking it."""
    import torch

    if not isinstance(name, str):
        return False
    for cls in torch.Tensor.__mro__:
        if name in vars(cls):
            return vars(cls)[name] is obj
    return False

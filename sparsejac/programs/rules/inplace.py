"""Writes: in-place operations, ``out=``, ``inplace=True``, slice assignment, and writes through
views, followed with the aliasing torch defines.

A write changes a storage that several tensors may see: the tensor written, the base it is a
view of, and the other views of that base. The tracer keeps terms per tensor, so a write is
turned into its out-of-place form (``x.relu_()`` is ``relu(x)``, ``x += y`` is ``x + y``,
``x[i] = v`` places ``v`` at the positions ``i`` selects), traced as any other operation; the
result's terms replace, in the base's terms, those of the elements written
(:meth:`Writer.write`). A view of the base read after the write takes its terms from the base's
(:meth:`Writer.alias`), as torch's autograd replays a view on its modified base; torch's
version counter tells which recorded terms a write has made stale. What torch itself refuses is
refused here too, by name: a write into the differentiated argument (a leaf that requires
grad), into a tensor whose old values a recorded derivative still reads (torch's "modified by
an inplace operation"), and a base modified after a view of it was made under ``no_grad``.
Two writes of one element in one assignment are refused too: torch keeps one value and
differentiates as if it had kept both.

The second order (:func:`sparsejac.hessian_of`) follows writes the same way: the out-of-place
form reads a copy of the old values, and the written tensor is then a copy of its result, which
torch's autograd follows for the adjoints.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.nn.functional as F

from ...errors import UnsupportedOperationError
from ..ledger import storage_key
from ..registry import register_writer
from ..tracer import PREFIX
from .layout import place
from .scatter import distinct, placed, ramp

# In-place methods that write values read from nothing traced: the written elements become
# constants (``fill_`` with a traced value is a broadcast of it, handled apart).
FILLS = frozenset({"zero_", "fill_", "normal_", "uniform_", "random_", "bernoulli_",
                   "exponential_", "geometric_", "cauchy_", "log_normal_", "fill_diagonal_"})

# In-place methods that change a tensor's shape, strides, storage or autograd state, not its
# values: refused (the tracer follows values).
RESHAPING = frozenset({"resize_", "resize_as_", "set_", "as_strided_", "squeeze_", "unsqueeze_",
                       "t_", "transpose_", "swapdims_", "swapaxes_", "detach_",
                       "share_memory_", "requires_grad_", "retain_grad"})


SAME = object()  # what :meth:`Writer._new` gives where the write changes nothing


def _refuse(message: str) -> UnsupportedOperationError:
    return UnsupportedOperationError(f"{PREFIX}{message}")


def root_of(x: torch.Tensor) -> torch.Tensor:
    """The tensor that owns ``x``'s elements: its base if it is a view (torch keeps the root of
    a chain of views), else itself."""
    return x._base if x._base is not None else x


def positions_in(root: torch.Tensor, view: torch.Tensor) -> torch.Tensor:
    """For each element of ``view`` (int64, ``view``'s shape), its flat position in ``root``,
    read from the two tensors' strides over their shared storage."""
    n = root.numel()
    if view is root:
        return ramp(root)
    if view.dtype != root.dtype:
        raise _refuse(f"a write through a view of dtype {view.dtype} of a tensor of dtype "
                      f"{root.dtype} is not supported")
    size = root.untyped_storage().nbytes() // root.element_size()
    storage = torch.arange(size, device=root.device)  # each element's index in the storage
    inverse = torch.full((size,), -1, dtype=torch.int64, device=root.device)
    inverse[storage.as_strided(root.shape, root.stride(), root.storage_offset()).reshape(-1)] = (
        torch.arange(n, device=root.device))
    where = inverse[storage.as_strided(view.shape, view.stride(), view.storage_offset())]
    if where.numel() and int(where.min()) < 0:
        raise _refuse("a view reaching outside its base is not supported")
    return where


def overwrite(cx, root: torch.Tensor, where: torch.Tensor, new: Any, name: str) -> dict:
    """The terms of ``root`` after the elements at flat positions ``where`` are set to ``new``
    (a tensor of ``where``'s shape, traced or constant): the others keep theirs."""
    flat = where.reshape(-1)
    if tuple(where.shape) == tuple(root.shape) and _in_order(flat):  # all of it: new's own terms
        return dict(cx.terms(new) or {}) if isinstance(new, torch.Tensor) else {}
    return placed(cx, root, root, where, new if isinstance(new, torch.Tensor) else None, False,
                  name)


def _in_order(flat: torch.Tensor) -> bool:
    """Whether ``flat`` is ``0, 1, 2, ...``."""
    return bool((flat == torch.arange(flat.numel(), device=flat.device)).all())


class Writer:
    """The tracer's handler of writing calls (registered in :mod:`..registry`)."""

    def write(self, cx, name: str, func: Any, args: tuple, kwargs: dict, inplace: bool) -> Any:
        """Follow a call that writes into an argument; returns what torch's call returns."""
        if name in RESHAPING:
            raise _refuse(f"in-place operation {name!r} on a traced tensor changes its shape "
                          "or storage, which is not supported; use the out-of-place form")
        out = kwargs.get("out")
        if out is not None and not isinstance(out, torch.Tensor):
            raise _refuse(f"{name!r} with out= a tuple of tensors on traced inputs is not "
                          "supported; use the out-of-place form")
        dst = out if out is not None else (args[0] if args else None)
        if not isinstance(dst, torch.Tensor):
            raise _refuse(f"{name!r} writes into a {type(dst).__name__}, not a tensor")
        root = root_of(dst)
        if not dst.is_floating_point():
            raise _refuse(f"{name!r} writes traced values into a tensor of dtype {dst.dtype}, "
                          "which carries no derivative")
        where = positions_in(root, dst)
        if name == "__setitem__":
            where = where[args[1]]
            distinct(where, name)
            new = args[2]
            if isinstance(new, torch.Tensor) and cx.terms(new):
                with cx:
                    new = new.to(dst.dtype).expand(where.shape)
        else:
            new = self._new(cx, name, func, args, kwargs, inplace, dst, out)
            if new is SAME:  # the out-of-place form returned its input: nothing is written
                return dst
        if cx.is_argument(root):
            raise _refuse(
                f"in-place operation {name!r} writes into the differentiated argument (torch "
                "refuses this too: a leaf that requires grad); write into a copy (x = x.clone())")
        self._unheld(cx, root, name)
        terms = overwrite(cx, root, where, new, name)
        with cx.quiet():  # the values, and in the second order the graph of the adjoints
            if name == "__setitem__" or new is None:
                func(*args, **kwargs)
            elif new is not dst:
                dst.copy_(new)
        cx.forget(id(root))  # terms recorded before: none stand where the write left none
        cx.record(root, terms)
        cx.wrote(root)
        if dst is not root:
            cx.record(dst, cx.terms(new) if isinstance(new, torch.Tensor) else None)
        if name == "__setitem__":
            return None
        return dst

    def _new(self, cx, name, func, args, kwargs, inplace, dst, out):
        """``dst``'s new values, traced out of place from a copy of its old ones (the copy:
        what a recorded derivative of the result reads must not change under it); None for a
        constant fill."""
        if name in FILLS and not (name == "fill_" and len(args) > 1 and cx.traced(args[1])):
            return None
        with cx:
            old = dst.clone() if out is None else dst
            swap = (lambda a: old if a is dst else a)
            args = tuple(swap(a) for a in args)
            kwargs = {k: swap(v) for k, v in kwargs.items() if k != "out"}
            if out is not None:
                new = func(*args, **kwargs)
            elif inplace:
                new = _called_out_of_place(func, args, kwargs, name)
            elif name == "copy_":
                new = args[1].to(dst.dtype).expand(dst.shape)
            elif name == "fill_":
                new = args[1].to(dst.dtype).expand(dst.shape)
            else:
                method = ("__" + name[3:]) if name.startswith("__i") else name[:-1]
                f = next((getattr(m, method) for m in (torch.Tensor, torch, F)
                          if hasattr(m, method)), None)
                if f is None:
                    raise _refuse(f"in-place operation {name!r} has no out-of-place form to "
                                  "follow; write it out of place")
                new = f(*args, **kwargs)
            if new is old and out is None:
                return SAME
            if not isinstance(new, torch.Tensor):
                raise _refuse(f"{name!r}: its out-of-place form gives a "
                              f"{type(new).__name__}, not a tensor")
            if tuple(new.shape) != tuple(dst.shape):
                raise _refuse(f"{name!r} would write values of shape {tuple(new.shape)} into a "
                              f"tensor of shape {tuple(dst.shape)}")
            if new.dtype != dst.dtype:
                new = new.to(dst.dtype)
            if new is not dst and storage_key(new) == storage_key(dst):
                new = new.clone()  # copy_ from an overlapping view of itself
        return new

    @staticmethod
    def _unheld(cx, root: torch.Tensor, name: str) -> None:
        if cx.holds(root):
            raise _refuse(
                f"in-place operation {name!r} modifies values that a derivative recorded "
                "earlier still reads (torch refuses this too: a variable needed for gradient "
                "computation modified by an inplace operation); write it out of place")

    def alias(self, cx, x: torch.Tensor, recorded: bool) -> dict | None:
        """The terms of ``x``, a view whose base was written after ``x``'s terms were recorded
        (``recorded``) or before they ever were: read from the base's at ``x``'s positions.
        None where the base carries none."""
        root = root_of(x)
        if not x.numel():
            return None
        if root is x:
            raise _refuse(
                "a traced tensor was modified outside what the tracer follows (through .data, "
                "a detached alias, or under no_grad); its derivative would be stale")
        if not recorded and _no_grad_view(x):
            raise _refuse(
                "a view made under no_grad (or inference_mode) is read after its base was "
                "modified in place (torch refuses this too); make the view outside no_grad")
        if not cx.traced(root):
            return None
        where = positions_in(root, x)
        return place(cx, x, root, where.to(torch.float64) + 1)


def _no_grad_view(x: torch.Tensor) -> bool:
    """Whether torch made the view ``x`` where autograd records nothing (it then refuses to
    replay it on its modified base). Read from torch's own record of how the view was made."""
    meta = getattr(torch._C._autograd, "_get_creation_meta", None)
    if meta is None:  # not told: as torch refuses the ambiguous case, refuse it too
        return True
    return meta(x).name in ("NO_GRAD_MODE", "INFERENCE_MODE")


def _called_out_of_place(func: Any, args: tuple, kwargs: dict, name: str) -> Any:
    """``func`` called with ``inplace=False`` (given as a keyword or by position)."""
    try:
        bound = inspect.signature(func).bind(*args, **kwargs)
    except (TypeError, ValueError):
        raise _refuse(f"{name!r} with inplace=True: its out-of-place form cannot be called; "
                      "pass inplace=False") from None
    bound.arguments["inplace"] = False
    return func(*bound.args, **bound.kwargs)


register_writer(Writer())

"""The tracing driver: from ``fn`` and its arguments to the terms of every block of the
result. :func:`trace` checks the arguments and runs ``fn`` once under the tracer;
:func:`jacobian_blocks` collects the Jacobian's blocks from the output's terms, and
:func:`hessian_blocks` runs the backward pass over the tape and each taped step's second-order
rule (docs/how-it-works.md, "## 5. Hessians"). Either gives a :class:`Collected`: the blocks'
terms, shapes and labels, and where each goes in the nested result.

The public entry points (:mod:`~sparsejac.programs.api`) call it and hand what it collects to the
writers (:mod:`~sparsejac.programs.write`); it writes no result itself, and neither the tracer,
the rules nor the writers import it.

>>> import torch
>>> w = torch.ones(3, 2, dtype=torch.float64)
>>> c = jacobian_blocks(lambda x: torch.tanh(x @ w), (torch.ones(4, 3, dtype=torch.float64),), 0,
...                     None)
>>> c.shapes, c.what, c.layout
([((4, 2), (4, 3))], ['the Jacobian w.r.t. argument 0'], [(0, False)])
"""

from __future__ import annotations

import functools
import threading
from typing import Any, Callable, Sequence

import numpy as np

from .. import options
from ..errors import (ArgumentTypeError, JacobianTooLargeError, OperandTypeError, ShapeError,
                      UnsupportedOperationError)
from . import accumulate, intercept, second
from . import terms as T
from .naming import PREFIX
from .tape import Tape
from .tracer import make_tracer

# torch.func's transforms and the tracer's label state are not thread-safe: one trace at a time
# (the entry points hold it over the trace and the writing of its result).
LOCK = threading.RLock()


def load() -> Any:
    """torch, and the rules (importing them fills the registry); on the first call only."""
    try:
        import torch
    except ImportError:
        raise ImportError(
            f"{PREFIX}tracing needs torch: pip install 'einsum-sparsejac[torch]'") from None
    from . import rules  # noqa: F401

    return torch


def _as_tensor(torch: Any, x: Any, where: str) -> Any:
    """An argument's leaf as a detached tensor (a number or numpy array copied into one);
    refused where it holds no values or no numbers."""
    if isinstance(x, torch.Tensor):
        if x.layout != torch.strided:
            raise OperandTypeError(f"{PREFIX}{where} has layout {x.layout}; pass a dense tensor")
        if x.device.type == "meta":
            raise OperandTypeError(f"{PREFIX}{where} is on the meta device; it has no values")
        return x.detach()
    if isinstance(x, (np.ndarray, np.generic, int, float)) and not isinstance(x, bool):
        array = np.asarray(x)
        if array.dtype.kind not in "iuf":
            raise OperandTypeError(
                f"{PREFIX}{where} has dtype {array.dtype}; expected integers or floats")
        return torch.from_numpy(np.array(array))
    raise OperandTypeError(
        f"{PREFIX}{where} is a {type(x).__name__}; pass a torch tensor, a numpy array, or a "
        "tuple, list or dict of them")


def _autograd_on(collect: Callable) -> Callable:
    """Run a trace, and what follows it, with grad mode on and inference mode off whatever the
    caller's, as ``torch.func``'s transforms ignore an outer ``no_grad``: ``fn``'s own no_grad
    and inference_mode regions are then what the tracer sees as constant
    (:func:`~sparsejac.programs.tracer.recording`), and the Hessian's backward pass runs."""

    @functools.wraps(collect)
    def collect_with_autograd(*args, **kwargs):
        torch = load()
        with torch.inference_mode(False), torch.enable_grad():
            return collect(*args, **kwargs)

    return collect_with_autograd


# under the default limit, this share of the headroom at the start is kept back from the
# allocations the guard admits (threads' stacks and arenas, Python's objects, the allocator's
# pieces), checked against the process's headroom as it runs
ROOM_RESERVE = 16


def trace(fn: Callable, args: tuple, wrt: Any, memory_limit: Any, second: bool = False,
          skip: dict | None = None, steps: bool = False) -> tuple:
    """Trace ``fn(*args)``: the tracer, the differentiated positions, the arguments' leaves and
    tree specs, the output's leaves and spec, the labels, the dtype and the limit. ``second``:
    also record the steps and let torch's autograd follow them (for the adjoints), and which
    rule calls read which (the tracer's :class:`~sparsejac.programs.tape.Tape`); or, given
    ``skip`` (a refill), form no terms for those calls. ``steps``: keep each step's own
    Jacobian instead of composing it forward (:mod:`~sparsejac.programs.accumulate`)."""
    torch = load()
    from torch.utils import _pytree as pytree

    positions = options.wrt_indices(wrt, len(args), PREFIX, "argument")
    limit = options.memory_limit(memory_limit, PREFIX)
    flat_args, specs = [], []
    for i, a in enumerate(args):
        leaves, spec = pytree.tree_flatten(a)
        where = [f"argument {i}" + (f" leaf {j}" if spec.num_leaves != 1 or not spec.is_leaf()
                                    else "") for j in range(len(leaves))]
        flat_args.append([_as_tensor(torch, x, w) for x, w in zip(leaves, where)])
        specs.append(spec)
    diff = []
    for p in positions:
        for j, t in enumerate(flat_args[p]):
            if not t.is_floating_point():
                raise OperandTypeError(
                    f"{PREFIX}argument {p}" + (f" leaf {j}" if len(flat_args[p]) > 1 else "")
                    + f" (differentiated) has dtype {t.dtype}; it must be a real floating-point "
                    "tensor")
            diff.append(t)
    if not diff:
        raise OperandTypeError(f"{PREFIX}the differentiated argument(s) {positions} hold no tensor")
    dtype = functools.reduce(torch.promote_types, (t.dtype for t in diff))
    if dtype in (torch.float16, torch.bfloat16):
        dtype = torch.float32
    labels = T.Labels(limit, PREFIX)
    if memory_limit is None and limit is not None:  # the default: the process's own headroom
        labels.room, labels.reserve = options.Headroom(), limit // ROOM_RESERVE
    tracer = make_tracer(labels, dtype)
    if steps:
        tracer.steps = {}
    if second:
        tracer.tape = Tape(skip)
        # the argument itself (``_as_tensor`` detached it), not a copy: 8 MB at 1e6 variables
        # (an inference tensor, made under inference_mode, cannot require grad: a copy then)
        flat_args = [[(t.clone() if t.is_inference() else t).detach().requires_grad_(True)
                      if (p in positions) else t
                      for t in leaves] for p, leaves in enumerate(flat_args)]
    for p in sorted(set(positions)):
        for j, t in enumerate(flat_args[p]):
            if t.numel():  # an empty argument has no columns: nothing depends on it
                tracer.record(t, {(p, j): [T.identity(tuple(t.shape), labels, dtype, t.device)]},
                              value=False)  # the caller's tensor, beside the limit
    call_args = [pytree.tree_unflatten(leaves, spec) for leaves, spec in zip(flat_args, specs)]
    # (grad mode on, inference mode off: :func:`_autograd_on`) custom Functions reach the
    # tracer while ``fn`` runs (:func:`intercept.intercepting`)
    fn = intercept.rebound(fn)
    with tracer, intercept.intercepting():
        out = fn(*call_args)
    out_leaves, out_spec = pytree.tree_flatten(out)
    for o in out_leaves:
        if not isinstance(o, torch.Tensor):
            raise ArgumentTypeError(
                f"{PREFIX}fn must return a torch tensor (or a tuple, list or dict of them), got "
                f"{type(o).__name__}")
    return tracer, positions, flat_args, specs, out_leaves, out_spec, labels, dtype, limit


class Collected:
    """What one trace gives: the terms of each block (one Jacobian or Hessian block), its
    shapes, and where each block goes in the nested result (``layout``: block index and
    whether it is transposed, in the order of the result's leaves; ``nest`` rebuilds it)."""

    def __init__(self, blocks: list[list[T.Term]], shapes: list[tuple], labels: T.Labels,
                 dtype: Any, limit: float | None, layout: list[tuple[int, bool]],
                 nest: Callable[[list], Any], what: list[str], sym: Sequence[int] = ()) -> None:
        # ``what``: a name for each block, for the guard's messages
        self.blocks, self.shapes, self.labels, self.dtype = blocks, shapes, labels, dtype
        self.limit, self.layout, self.nest, self.what = limit, layout, nest, what
        self.symmetric = set(sym)  # blocks that are symmetric (a Hessian's diagonal blocks)
        self.device = None  # the differentiated arguments' device (a CUDA one keeps results)
        # the order of accumulation used (a Jacobian's), and whether "auto" fell back to forward
        self.mode, self.fell_back = "forward", False
        # a Hessian's (:func:`hessian_blocks`): the calls a refill may skip (None after a
        # refill), whether it skipped any, and whether a rule read skipped terms after all
        self.dead: dict[int, str] | None = None
        self.skipped = self.read_dead = False
        for terms in blocks:  # products still unformed are formed now, each under the trace's
            for t in terms:   # guard, so that the writers' guard counts them as live factors
                t.factor

    def structure(self) -> tuple:
        """What the pattern depends on: every term's axes and sizes, and its index maps."""
        labels, parts = self.labels, [tuple(self.shapes)]
        for terms in self.blocks:
            for t in terms:
                atoms = t.out_atoms + t.inp_atoms
                used = labels.base(atoms) + tuple(a for a in atoms if a in labels.derived)
                tables = tuple((labels.derived[a][1], labels.derived[a][0].cpu().numpy().tobytes())
                               for a in atoms if a in labels.derived)
                parts.append((t.out, t.inp, tuple(labels.sizes[l] for l in used), tables))
        return tuple(parts)


@_autograd_on
def jacobian_blocks(fn: Callable, args: tuple, wrt: Any, memory_limit: Any,
                    mode: str = "forward") -> Collected:
    """The Jacobian's blocks, accumulated in ``mode`` (:data:`accumulate.MODES`; the result's
    ``mode`` is the order used, ``"auto"`` resolved, and ``fell_back`` whether ``"auto"`` had
    to trace forward after all)."""
    mode = accumulate.mode_of(mode, PREFIX)
    if mode != "auto":
        return _jacobian_blocks(fn, args, wrt, memory_limit, mode)
    try:
        return _jacobian_blocks(fn, args, wrt, memory_limit, mode)
    except JacobianTooLargeError:
        pass  # (outside the handler: the failed trace's frames are let go first)
    # The cost model is an estimate, and the recorded steps are held until they are joined:
    # where the order it chose does not fit, the trace's own forward composition (which frees
    # each intermediate's terms as the program drops it) may
    import gc

    gc.collect()  # the failed trace's tracer and labels hold each other
    c = _jacobian_blocks(fn, args, wrt, memory_limit, "forward")
    c.fell_back = True
    return c


def _jacobian_blocks(fn: Callable, args: tuple, wrt: Any, memory_limit: Any,
                     mode: str) -> Collected:
    from torch.utils import _pytree as pytree

    (tracer, positions, flat_args, specs, out_leaves, out_spec, labels, dtype,
     limit) = trace(fn, args, wrt, memory_limit, steps=mode != "forward")
    seeds = [tracer.terms(o) or {} for o in out_leaves]
    if mode != "forward":
        steps, tracer.steps = tracer.steps, None
        arg_entries = sum(t.numel() for p in positions for t in flat_args[p])
        order = accumulate.plan(steps, seeds, labels, arg_entries,
                                sum(o.numel() for o in out_leaves), mode)
        mode = order.name
        found = accumulate.cut(steps, seeds, labels, order.at)
        del steps
        seeds = [{k: per_out.get(i, []) for k, per_out in found.items()}
                 for i in range(len(out_leaves))]
    blocks, shapes, what = [], [], []
    for i, o in enumerate(out_leaves):
        out_terms = seeds[i]
        for p in positions:
            for j, t in enumerate(flat_args[p]):
                blocks.append(out_terms.get((p, j), []))
                shapes.append((tuple(o.shape), tuple(t.shape)))
                what.append("the Jacobian" + (f" of output leaf {i}" if len(out_leaves) > 1
                                              else "") + f" w.r.t. argument {p}"
                            + (f" leaf {j}" if len(flat_args[p]) > 1 else ""))
    sizes = [len(flat_args[p]) for p in positions]

    def nest(results):
        it, per_out = iter(results), []
        for _ in out_leaves:
            per_wrt = [pytree.tree_unflatten([next(it) for _ in range(n)], specs[p])
                       for p, n in zip(positions, sizes)]
            per_out.append(tuple(per_wrt) if isinstance(wrt, (tuple, list)) else per_wrt[0])
        return pytree.tree_unflatten(per_out, out_spec)

    layout = [(i, False) for i in range(len(blocks))]
    c = Collected(blocks, shapes, labels, dtype, limit, layout, nest, what)
    c.device = flat_args[positions[0]][0].device
    c.mode = mode
    return c


@_autograd_on
def hessian_blocks(fn: Callable, args: tuple, wrt: Any, memory_limit: Any,
                   skip: dict | None = None) -> Collected:
    """The Hessian's blocks on and above the diagonal (those below are their transposes).
    ``skip``: rule calls whose first-order terms nothing read in the plan's trace (a refill);
    the result's ``dead`` gives them after a full trace, ``skipped`` whether any was skipped
    and ``read_dead`` whether a rule wanted skipped terms after all (then the blocks are
    wrong: the caller traces again in full)."""
    import torch
    from torch.utils import _pytree as pytree

    (tracer, positions, flat_args, specs, out_leaves, out_spec, labels, dtype,
     limit) = trace(fn, args, wrt, memory_limit, second=True, skip=skip)
    if len(out_leaves) != 1 or out_leaves[0].numel() != 1:
        raise ShapeError(f"{PREFIX}a Hessian needs fn to return one scalar tensor; got "
                         f"{[tuple(o.shape) for o in out_leaves]}")
    out = out_leaves[0]
    found: dict = {}
    # the trace is done: the tracer is first-order again (the second-order rules below run
    # under no_grad), and the tape alone holds the steps, letting go of them one by one
    tape, tracer.tape = tracer.tape, None
    # only the first-order terms of the steps' inputs are read from here on: the others
    # (tensors the program still holds, the output's) are dropped now
    tracer.keep_only(tape.inputs())
    tracer.forget(id(out))  # the output's own first-order terms (a gradient): unused
    leaves = [t for p in positions for t in flat_args[p] if t.requires_grad]
    if out.requires_grad and tape.steps:
        # the backward pass leaves each step's adjoint in its slot (the tape's hooks); the
        # gradient it returns is dropped at once, and so is autograd's graph
        try:
            torch.autograd.grad(out.reshape(()), leaves, allow_unused=True)
        except RuntimeError as error:
            if "modified by an inplace operation" not in str(error):
                raise
            raise UnsupportedOperationError(
                f"{PREFIX}an in-place write modified values torch's autograd saved for the "
                "backward pass the Hessian's adjoints run (torch.func.hessian refuses this "
                "program too); write that step out of place") from None
        del out, out_leaves
        tracer.pending = {}
        # each step's tensors (and, through the tracer's weak references, the first-order
        # terms of those no later step uses) are freed once its terms are formed: at a
        # million variables every intermediate and its factor is 8 MB
        for rule, params, result, ybar in tape.adjoints():
            labels.prefix = f"{PREFIX}{rule.name!r} (second order): "
            for k1, k2, term in rule.second(tracer, result, ybar.detach().to(dtype), **params):
                found.setdefault((k1, k2), []).append(term)
            del rule, params, result, ybar
        labels.prefix = f"{PREFIX}second order: "
        for k1, k2, term in second.flush(tracer):
            found.setdefault((k1, k2), []).append(term)
        labels.prefix = PREFIX
    # The steps' inputs hold their first-order terms in the tracer (and the tracer and the
    # labels hold each other: only the cyclic collector would free them): let them go before
    # the blocks are merged and written.
    dead = tape.dead_calls()
    del tape
    keys = list(dict.fromkeys((p, j) for p in positions for j in range(len(flat_args[p]))))
    shape = {k: tuple(flat_args[k[0]][k[1]].shape) for k in keys}
    index, blocks, shapes, sym, what = {}, [], [], [], []
    for a, k1 in enumerate(keys):
        for k2 in keys[a:]:
            index[(k1, k2)] = len(blocks)
            if k1 == k2:
                sym.append(len(blocks))
            blocks.append(T.merge(found.get((k1, k2), []), labels))
            shapes.append((shape[k1], shape[k2]))
            what.append(f"the Hessian block of argument leaves {k1} and {k2}")
    layout = []
    for p1 in positions:
        for i in range(len(flat_args[p1])):
            for p2 in positions:
                for j in range(len(flat_args[p2])):
                    k1, k2 = (p1, i), (p2, j)
                    layout.append((index[(k1, k2)], False) if (k1, k2) in index
                                  else (index[(k2, k1)], True))

    def nest(results):
        it = iter(results)
        rows = []
        for p1 in positions:
            per_leaf = []
            for _ in range(len(flat_args[p1])):
                per_p2 = [pytree.tree_unflatten([next(it) for _ in flat_args[p2]], specs[p2])
                          for p2 in positions]
                per_leaf.append(tuple(per_p2) if isinstance(wrt, (tuple, list)) else per_p2[0])
            rows.append(pytree.tree_unflatten(per_leaf, specs[p1]))
        return tuple(rows) if isinstance(wrt, (tuple, list)) else rows[0]

    c = Collected(blocks, shapes, labels, dtype, limit, layout, nest, what, sym)
    c.device = flat_args[positions[0]][0].device
    c.dead, c.skipped, c.read_dead = dead, bool(skip), tracer.read_dead
    return c


def signature(args: Any) -> tuple:
    """Shapes and dtypes of every leaf of ``args``."""
    from torch.utils import _pytree as pytree

    return tuple((tuple(np.shape(x)), getattr(x, "dtype", np.asarray(x).dtype))
                 for x in pytree.tree_leaves(args))

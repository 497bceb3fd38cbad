"""The second order's record of a trace (docs/how-it-works.md, "## 5. Hessians"): the steps with
curvature whose adjoints the Hessian needs, and which rule call read the terms of which.

The tracer holds a :class:`Tape` only while a Hessian is traced (its ``tape`` is None in first
order). The tracer counts each rule call on it (:meth:`Tape.call`), with the calls it read terms
from (:meth:`Tape.read`), and tapes each step with curvature (:meth:`Tape.step`): the rule, its
parameters, a meta stand-in for its result and a slot that a hook fills with the result's
adjoint when the backward pass reaches it. After the trace, :meth:`Tape.adjoints` gives each
step with its adjoint, letting go of it, and :meth:`Tape.dead_calls` the calls whose terms
nothing read, which a refill skips (their terms recorded as :data:`DEAD`).

It never imports the tracer: the tracer passes in what a call read and how many traced operands
it has.

``(tanh(x @ w) ** 2).sum()``: tanh and the square have curvature, and the square's own terms
(read by the sum alone) and the sum's are read by no second-order rule:

>>> tape = Tape()
>>> x, h, t, p, s = (object() for _ in range(5))    # x: the argument; the others, results
>>> for name, read, made in (("matmul", x, h), ("tanh", h, t), ("pow", t, p), ("sum", p, s)):
...     index, skipped = tape.call(name)
...     tape.read(index, name, [read], [made])
>>> tape.taped = [1, 2]
>>> tape.dead_calls()
{2: 'pow', 3: 'sum'}
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Iterable, Iterator

from ..errors import UnsupportedOperationError
from .intercept import describe
from .naming import PREFIX


class _Dead(dict):
    """The terms a refill did not form (:meth:`Tape.dead_calls`): traced, never read."""


DEAD: dict = _Dead()


def _keep_adjoint(slot: dict, grad: Any) -> None:
    """A taped step's adjoint, kept as the backward pass gives it (the gradient unchanged)."""
    slot["ybar"] = grad


class Tape:
    """The steps of one second-order trace, and its rule calls' reads. ``skip`` (a refill):
    calls (index -> name) whose results' terms are not formed, from the last full trace's
    :meth:`dead_calls`; a refill records no reads."""

    def __init__(self, skip: dict[int, str] | None = None) -> None:
        # (rule, params, the result's meta stand-in, the slot its adjoint lands in), in order
        self.steps: list[tuple | None] = []
        self.calls = 0
        # per call: its name and the calls whose results it read; None in a refill
        self.reads: list[tuple[str, frozenset]] | None = [] if skip is None else None
        self.taped: list[int] = []  # the calls with curvature
        self.skip = skip
        self._producer: dict[int, int] = {}  # id of a call's result -> the call

    def expansion(self, rule: Any, name: str, declared: Any) -> Callable | None:
        """The decomposition the second order follows ``rule`` through (``rule.expand``, for a
        rule whose second order is not its own), else None; a rule with neither is refused by
        name (``declared``: the key of a user's operation, for its own message)."""
        if rule.kind != "rule" or rule.second is not None:
            return None
        if rule.expand is not None:
            return rule.expand
        if declared is not None:
            raise UnsupportedOperationError(
                f"{PREFIX}{describe(declared)} has no declared second order, so "
                "hessian_of cannot follow it: register it with a rule and second=..., or "
                "as \"forward\" where its backward is the forward's true derivative")
        raise UnsupportedOperationError(
            f"{PREFIX}{name!r} has no second-order rule, so hessian_of cannot follow it; "
            "write it with operations that have one (see the docs' operation table)")

    def call(self, name: str) -> tuple[int, bool]:
        """Count a rule call: its index, and whether a refill skips its terms. Where the call
        at this index has another name than in the trace the skips came from, the path has
        changed: nothing more is skipped."""
        index, self.calls = self.calls, self.calls + 1
        if self.skip is not None and self.skip.get(index, name) != name:
            self.skip = None
        return index, self.skip is not None and index in self.skip

    def read(self, index: int, name: str, inputs: Iterable[Any], outputs: Iterable[Any]) -> None:
        """Note that call ``index`` read the terms of ``inputs`` (its traced tensors) and
        made ``outputs`` (in a refill: nothing)."""
        if self.reads is None:
            return
        self.reads.append((name, frozenset(self._producer[id(x)] for x in inputs
                                           if id(x) in self._producer)))
        for r in outputs:
            self._producer[id(r)] = index

    def step(self, rule: Any, params: dict, result: Any, index: int,
             operands: Callable[[], int]) -> None:
        """Tape call ``index`` where it has curvature (``operands``: how many traced tensors
        it was passed, asked only for a cross term, which needs two: a product or matmul with
        a constant is linear, and taping it would keep its input and terms alive)."""
        import torch

        if rule.second == "linear" or (getattr(rule.second, "cross", False) and operands() < 2):
            return
        self.taped.append(index)
        r = result if isinstance(result, torch.Tensor) else result[0]
        if r.requires_grad:
            # the tape keeps no result (at a million variables each is 8 MB, and its
            # first-order terms live as long as it does): a hook keeps its adjoint when
            # the backward pass reaches it, and its shape and dtype stand in for it
            slot: dict = {}
            r.register_hook(functools.partial(_keep_adjoint, slot))
            self.steps.append((rule, params, torch.empty(r.shape, dtype=r.dtype, device="meta"),
                               slot))

    def inputs(self) -> list[dict]:
        """The parameters of every taped step: the tensors whose terms its second order reads."""
        return [step[1] for step in self.steps if step is not None]

    def adjoints(self) -> Iterator[tuple[Any, dict, Any, Any]]:
        """After the backward pass: ``(rule, params, stand-in, adjoint)`` of each taped step the
        output depends on, in order. Each step is let go of as it is given, so that its tensors
        (and, through the tracer's weak references, the terms no later step reads) are freed
        once its second-order terms are formed."""
        steps = self.steps
        for i in range(len(steps)):
            rule, params, result, slot = steps[i]
            steps[i] = None
            ybar = slot.pop("ybar", None)
            if ybar is not None:  # None: the output does not depend on this step
                yield rule, params, result, ybar
            del rule, params, result, slot, ybar
        self.steps = []

    def dead_calls(self) -> dict[int, str] | None:
        """The rule calls (index -> name) whose results' terms nothing reads, neither a taped
        step's second-order rule nor, through the calls after it, any of those: the tail of
        the program after its last curvature (``tanh(x @ W) ** 2``'s square and sum), and
        linear branches that end in the output. A refill skips them; None in a refill."""
        if self.reads is None:
            return None
        need: set[int] = set()
        taped = set(self.taped)
        for i in range(len(self.reads) - 1, -1, -1):
            if i in need or i in taped:
                need |= self.reads[i][1]
        return {i: name for i, (name, _) in enumerate(self.reads) if i not in need}

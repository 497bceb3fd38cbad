"""Sparse Jacobians of whole torch programs: models as people write them.

:func:`jacobian_of` runs ``fn`` once on the real arguments under a ``TorchFunctionMode``
(:mod:`~sparsejac.programs.tracer`). Every torch call on a traced tensor is looked up in the
registry of rules (:mod:`~sparsejac.programs.registry`, filled by the modules of
:mod:`~sparsejac.programs.rules`), and its Jacobian is carried forward in structured form
(:mod:`~sparsejac.programs.terms`): deltas stay deltas, selections stay index maps, factors are
composed by einsum, and the sparse result is written once, at the end.

Tracing limits, as ``torch.func``'s: the Jacobian is that of the path the real values took
(Python control flow on values runs once); what ``fn`` computes where torch records no gradient
(``no_grad``, ``inference_mode``) is a constant; custom ``autograd.Function`` classes and
custom operators need a declared derivative (:func:`register_function`); in-place operations,
``out=`` and turning a traced tensor into a Python number are refused; which entry a relu, a
maximum or a max-pool lets through is a value, so the pattern does not depend on it.

The modules, each importing only those below it: :mod:`~sparsejac.programs.api` (the entry
points), :mod:`~sparsejac.programs.collect` (the tracing driver: a trace, then the Jacobian's
or the Hessian's blocks), :mod:`~sparsejac.programs.write` (the writers),
:mod:`~sparsejac.programs.custom` (users' declarations) and :mod:`~sparsejac.programs.rules`
over :mod:`~sparsejac.programs.sums` and :mod:`~sparsejac.programs.second`;
:mod:`~sparsejac.programs.tracer` (the first-order dispatch), :mod:`~sparsejac.programs.tape`
(the second order's record), :mod:`~sparsejac.programs.intercept` (how custom Functions reach
the tracer); :mod:`~sparsejac.programs.registry`, :mod:`~sparsejac.programs.terms`,
:mod:`~sparsejac.programs.ledger` and :mod:`~sparsejac.programs.naming` at the bottom.

>>> import torch, sparsejac
>>> x, w = torch.randn(4, 3, dtype=torch.float64), torch.randn(3, 5, dtype=torch.float64)
>>> J = sparsejac.jacobian_of(lambda x, w: torch.tanh(x @ w), x, w, format="csr")
>>> J.shape, J.nnz          # block-diagonal over the batch: 4 blocks of 5 x 3
((20, 12), 60)
"""

from __future__ import annotations

from typing import Any

from ..errors import UnsupportedOperationError
from .api import ProgramPlan, hessian_of, jacobian_of, plan_of
from .custom import register_function, unregister_function


def __getattr__(name: str) -> Any:
    # The registry fills when the rules are imported, which imports torch: on first use.
    if name in ("RULES", "OPERATIONS"):
        from .collect import load
        from .registry import RULES

        load()
        return RULES
    raise AttributeError(f"module 'sparsejac.programs' has no attribute {name!r}")


__all__ = ["jacobian_of", "hessian_of", "plan_of", "ProgramPlan", "RULES", "register_function",
           "unregister_function", "UnsupportedOperationError"]

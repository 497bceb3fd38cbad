"""Test cases for the registry test (tests/test_rules.py): each module here lists ``CASES``.

A :class:`Case` names the registered spelling it exercises (``rule``: a name in
``sparsejac.programs.RULES``) and a program using it; the registry test checks every case
against ``torch.func.jacrev`` in float64, also on non-contiguous and broadcast copies of the
arguments, and fails for any registered name that no case exercises.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

D = torch.float64


def rand(*shape, seed=0, positive=False):
    g = torch.Generator().manual_seed(seed * 7919 + 17 * len(shape) + sum(shape))
    x = torch.randn(*shape, dtype=D, generator=g)
    return x.abs() + 0.5 if positive else x


@dataclass
class Case:
    rule: str  # the registered spelling this case exercises
    fn: Callable[..., Any]
    args: tuple
    wrt: Any = 0
    id: str = ""
    variants: bool = True  # also run on strided / broadcast copies of the arguments
    exact_nnz: bool = False  # stored entries == entries jacrev shows nonzero
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if not self.id:
            self.id = self.rule

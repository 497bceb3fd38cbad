"""Operations with no rule of their own, followed through torch's reference implementations.

``torch._refs`` writes much of torch's API in Python with other torch operations (``addcmul``
as a product and a sum, ``lerp``, ``logaddexp``, ``xlogy``, ``clamp_min``, ``index_add``,
``linalg.cross``, ...). Where an operation has no rule, the tracer follows its reference, so
its Jacobian comes from the rules of what the reference calls; where the reference reaches an
operation with no rule either (torch's primitives, ``prims.*``), that one is refused by name.
torch tests its references against its own operations, so the values agree; the derivative
is the reference's, which is torch's except perhaps at a tie of a piecewise operation.
"""

from __future__ import annotations

import threading
from typing import Any

import torch
import torch._refs as refs
import torch._refs.linalg
import torch._refs.nn.functional
import torch._refs.special

from ...errors import UnsupportedOperationError
from ..registry import Rule, decomposed, register_fallback
from ..naming import PREFIX, display_name

# torch's reference modules, by the prefix torch's own functions carry in their names
# (``torch.linalg.cross.__name__`` is ``"linalg_cross"``)
MODULES = (("linalg_", torch._refs.linalg), ("special_", torch._refs.special),
           ("", torch._refs.nn.functional), ("", refs))


# References whose derivative is not torch's: torch defines sampling as constant in its
# parameters (``normal``'s mean has gradient zero), where a reference is a reparametrisation;
# ``linalg.norm``'s reference takes another subgradient at zero than torch's kernel.
NOT_TORCHS = frozenset({"normal", "bernoulli", "poisson", "multinomial", "rand_like",
                        "randn_like", "randint_like", "linalg_norm", "norm"})


def reference(name: str, func: Any) -> Rule | None:
    """The reference implementation of the operation torch reports as ``name``, as a
    decomposition rule; None where torch has none (or its derivative is not torch's)."""
    if name.startswith("_") or name.endswith("_") or name in NOT_TORCHS:
        return None  # private, in place (writes are followed apart), or not torch's derivative
    for prefix, module in MODULES:
        if prefix and not name.startswith(prefix):
            continue
        ref = getattr(module, name[len(prefix):], None)
        if callable(ref) and getattr(ref, "__module__", "").startswith("torch._refs"):
            return decomposed(name, _followed(display_name(func), ref))
    return None


def _followed(display: str, ref: Any) -> Any:
    """``ref``, its refusals said of the operation the program called (``display``), and
    refused where it calls that operation again (a reference written with the operation
    itself, or its in-place form, would recurse)."""
    active: set[int] = set()

    def refused(why: str) -> UnsupportedOperationError:
        return UnsupportedOperationError(
            f"{PREFIX}operation {display} on a traced tensor is not supported (torch's "
            f"reference implementation of it {why}). See sparsejac.programs.RULES (or the docs' "
            "operation table) for the supported operations; write it with those, or pass the "
            "tensor in as a constant")

    def call(*args: Any, **kwargs: Any) -> Any:
        key = threading.get_ident()
        if key in active:
            raise refused("calls it again")
        active.add(key)
        try:
            return ref(*args, **kwargs)
        except UnsupportedOperationError as error:
            inner = str(error)
            raise refused("reaches: " + inner[len(PREFIX):] if inner.startswith(PREFIX)
                          else inner) from None
        finally:
            active.discard(key)

    return call


register_fallback(reference)

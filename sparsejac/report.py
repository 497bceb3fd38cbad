"""What the command line and the demonstration print: byte sizes, size ratios, and the
comparison of a Jacobian with torch's autodiff.

>>> human_bytes(1.44e6), size_ratio(1e6, 2e3)
('1.44 MB', '500x smaller')
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np


def human_bytes(nbytes: float) -> str:
    """``nbytes`` in decimal units, three significant digits."""
    for unit in ("B", "KB", "MB", "GB", "TB", "PB"):
        if abs(nbytes) < 1000:
            return f"{nbytes:.3g} {unit}"
        nbytes /= 1000
    return f"{nbytes:.3g} EB"


def size_ratio(dense: float, nbytes: float) -> str:
    """How much smaller (or larger: a scalar's Jacobian is dense) ``nbytes`` is than ``dense``."""
    if nbytes and dense >= nbytes:
        return f"{dense / nbytes:.3g}x smaller"
    return f"{nbytes / max(dense, 1):.3g}x larger" if nbytes else "nothing stored"


def compare_with_torch(
    print_: Callable[..., None], subscripts: str, operands: Sequence[np.ndarray], wrt: int, got
) -> bool:
    """Compare the dense ``got`` with ``torch.autograd.functional.jacobian`` of
    ``torch.einsum``; print one line; False only on a mismatch (a skip is not a failure)."""
    try:
        import torch
    except ImportError:
        print_("  check skipped: torch is not installed (pip install 'einsum-sparsejac[torch]')")
        return True
    tensors = [torch.from_numpy(np.array(x, order="C")) for x in operands]

    def f(t):
        return torch.einsum(subscripts, *(t if i == wrt else x for i, x in enumerate(tensors)))

    try:
        z = f(tensors[wrt])
    except RuntimeError as error:
        print_(f"  check skipped: torch.einsum refuses these subscripts ({error})")
        return True
    if tuple(z.shape) != got.shape[: got.ndim - operands[wrt].ndim]:
        print_("  check skipped: torch.einsum reads these subscripts differently from numpy")
        return True
    if got.size == 0 or tensors[wrt].is_complex() or not tensors[wrt].is_floating_point():
        print_("  check skipped: torch's jacobian needs a non-empty real floating operand")
        return True
    ref = torch.autograd.functional.jacobian(f, tensors[wrt], vectorize=True).numpy()
    tol = 1e-5 if got.dtype in (np.float32, np.complex64) else 1e-12
    scale = max(1.0, float(np.max(np.abs(ref), initial=0.0)))
    err = float(np.max(np.abs(got - ref), initial=0.0))
    ok = ref.shape == got.shape and err <= tol * scale
    print_(f"  max |sparsejac - torch.autograd.functional.jacobian| {err:.2e} "
           f"(tolerance {tol * scale:.1e})  {'ok' if ok else 'MISMATCH'}")
    return ok

"""Independent references for tests: nothing here uses sparsejac's own derivation.

``onehot_jacobian``: J is linear in the operand, so column ``a`` is the einsum with that operand
replaced by the one-hot tensor ``e_a`` (numpy's own einsum decides everything else).
``torch_jacobian``: torch's autodiff of ``torch.einsum`` in the operands' precision.
"""

from __future__ import annotations

import numpy as np


def onehot_jacobian(subscripts, operands, wrt):
    operands = [np.asarray(x) for x in operands]
    dtype = np.result_type(*operands)
    target = operands[wrt]
    z = np.einsum(subscripts, *operands)
    J = np.zeros(np.shape(z) + target.shape, dtype=dtype)
    for flat in range(target.size):
        a = np.unravel_index(flat, target.shape)
        e = np.zeros(target.shape, dtype=target.dtype)
        e[a] = 1
        ops = list(operands)
        ops[wrt] = e
        J[(Ellipsis,) + tuple(a)] = np.einsum(subscripts, *ops)
    return J


def torch_jacobian(subscripts, operands, wrt):
    """torch's Jacobian, or None where torch.einsum reads the subscripts differently from numpy
    (torch's implicit output order and broadcasting rules are its own)."""
    import torch

    tensors = [torch.from_numpy(np.array(x)) for x in operands]
    try:
        z = torch.einsum(subscripts, *tensors)
    except RuntimeError:
        return None
    z_np = np.einsum(subscripts, *operands)
    if tuple(z.shape) != np.shape(z_np) or not np.allclose(z.numpy(), z_np, equal_nan=True):
        return None

    if z.numel() == 0 or tensors[wrt].numel() == 0:
        return None  # torch's jacobian cannot stack empty results; one-hot covers these

    def f(t):
        ops = list(tensors)
        ops[wrt] = t
        return torch.einsum(subscripts, *ops)

    t = tensors[wrt]
    if not t.is_complex():
        return torch.autograd.functional.jacobian(f, t).numpy()
    # torch's jacobian needs real outputs. The einsum is holomorphic in t, so d z / d t equals
    # the derivative along the real part: d Re z / d u + i d Im z / d u, with t = u + i v.
    u, v = t.real.clone(), t.imag.clone()
    re = torch.autograd.functional.jacobian(lambda s: f(torch.complex(s, v)).real, u)
    im = torch.autograd.functional.jacobian(lambda s: f(torch.complex(s, v)).imag, u)
    return re.numpy() + 1j * im.numpy()

"""Elementwise operations: arithmetic, activations, ``where``.

Arithmetic has its derivative written out. A differentiable elementwise function of one or two
tensors is registered with :func:`unary`: its derivative in each traced argument is torch's
own forward-mode tangent of a tangent of ones, so every activation shares one rule."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ...errors import UnsupportedOperationError
from .. import sums as S
from ..registry import decomposition, rule
from ..second import elementwise as second_elementwise, product
from ..tracer import PREFIX

# --- arithmetic -----------------------------------------------------------------------------


def _sum(cx, result, x, y, alpha):
    shape, fresh = tuple(result.shape), {}
    return S.add(cx, S.broadcast(cx, x, shape, fresh),
                 S.times(cx, S.broadcast(cx, y, shape, fresh), alpha))


@rule(("add", "__add__", "__radd__"), "input other alpha=1", second="linear")
def add(cx, result, input, other, alpha):
    return _sum(cx, result, input, other, alpha)


@rule(("sub", "__sub__", "subtract"), "input other alpha=1", second="linear")
def sub(cx, result, input, other, alpha):
    return _sum(cx, result, input, other, -alpha)


@rule(("__rsub__", "rsub"), "input other alpha=1", second="linear")
def rsub(cx, result, input, other, alpha):  # other - alpha * input
    return _sum(cx, result, other, input, -alpha)


@rule(("mul", "__mul__", "__rmul__", "multiply"), "input other", second=product)
def mul(cx, result, input, other):
    return S.elementwise(cx, result, [(input, S.value(other, result)),
                                      (other, S.value(input, result))])


def _quotient(cx, result, x, y):
    yv = S.value(y, result).to(result.dtype)  # an integer divisor: its derivative in floats
    return S.elementwise(cx, result, [(x, 1 / yv), (y, -result / yv)])


@rule(("div", "__truediv__", "true_divide", "divide", "__div__"), "input other rounding_mode=None",
      second=second_elementwise(lambda input, other, rounding_mode: torch.div(
          input, other, rounding_mode=rounding_mode), ("input", "other")))
def div(cx, result, input, other, rounding_mode):
    if rounding_mode is not None:
        if rounding_mode not in ("floor", "trunc"):
            raise UnsupportedOperationError(
                f"{PREFIX}'div' with rounding_mode={rounding_mode!r} is not supported")
        # piecewise constant: torch's derivative is zero (as floor's and trunc's)
        return S.elementwise(cx, result, [])
    return _quotient(cx, result, input, other)


@rule(("__rtruediv__", "__rdiv__"), "input other",
      second=second_elementwise(lambda input, other: other / input, ("input", "other")))
def rdiv(cx, result, input, other):  # other / input
    return _quotient(cx, result, other, input)


@rule(("neg", "__neg__", "negative"), "input", second="linear")
def neg(cx, result, input):
    return S.times(cx, S.of(cx, input), -1)


@rule(("where",), "condition input other", method="input condition other", second="linear")
def where(cx, result, condition, input, other):
    c = condition.to(result.dtype)
    return S.elementwise(cx, result, [(input, c), (other, 1 - c)])


@rule(("masked_fill",), "input mask value", second="linear")
def masked_fill(cx, result, input, mask, value):
    return S.elementwise(cx, result, [(input, (~mask).to(result.dtype)),
                                      (value, mask.to(result.dtype))])


@rule(("lerp",), "input end weight",
      second=second_elementwise(torch.lerp, ("input", "end", "weight")))
def lerp(cx, result, input, end, weight):
    w = S.value(weight, result)
    return S.elementwise(cx, result, [(input, 1 - w), (end, w),
                                      (weight, S.value(end, result) - S.value(input, result))])


# --- functions differentiated by their forward-mode tangent ----------------------------------


def unary(names, params: str, call, traced: str = "input", piecewise_linear: bool = False,
          closed=None):
    """Register the elementwise function ``call(**params)``: its derivative in each traced
    parameter (of ``traced``) is the forward-mode tangent of ones through ``call``, its second
    derivative the tangent of that (none for a piecewise-linear function). ``closed(**p)``
    may give both in closed form, ``(first, second)`` in ``input``, or None (then tangents);
    it is used where ``input`` is the only traced parameter."""

    def jacobian(cx, result, **p):
        derivatives = []
        only_input = [n for n in traced.split() if cx.terms(p[n]) is not None] == ["input"]
        forms = closed(**{**p, "input": p["input"].detach()}) if closed and only_input else None
        if forms is not None:
            return S.elementwise(cx, result, [(p["input"], forms[0])])
        for name in traced.split():
            x = p[name]
            if cx.terms(x) is None:
                continue
            x = x.detach()

            def f(t, name=name):
                return call(**{**p, name: t})

            # contiguous primal and tangent: torch's forward mode refuses some expanded views
            _, g = torch.func.jvp(f, (x.contiguous(),), (torch.ones(x.shape, dtype=x.dtype,
                                                                      device=x.device),))
            if torch._is_zerotensor(g):  # constant in this argument
                continue
            derivatives.append((p[name], g))
        return S.elementwise(cx, result, derivatives)

    jacobian.__name__ = names if isinstance(names, str) else names[0]
    jacobian.__module__ = __name__
    second = "linear" if piecewise_linear else second_elementwise(call, traced.split(), closed)
    rule(names, params, traced=traced, second=second)(jacobian)


unary(("abs", "absolute"), "input", torch.abs, piecewise_linear=True)
# closed forms of the commonest functions: (first, second) derivatives at the input
CLOSED = {
    "exp": lambda x: (torch.exp(x),) * 2,
    "tanh": lambda x: (1 - torch.tanh(x) ** 2, -2 * torch.tanh(x) * (1 - torch.tanh(x) ** 2)),
    "sigmoid": lambda x: (torch.sigmoid(x) * (1 - torch.sigmoid(x)),
                          torch.sigmoid(x) * (1 - torch.sigmoid(x)) * (1 - 2 * torch.sigmoid(x))),
    "log": lambda x: (1 / x, -1 / (x * x)),
    "square": lambda x: (2 * x, torch.full_like(x, 2.0)),
    "sin": lambda x: (torch.cos(x), -torch.sin(x)),
    "cos": lambda x: (-torch.sin(x), -torch.cos(x)),
}


def _power(input, exponent):
    """``x ** c`` for a Python number ``c``: ``(c x**(c-1), c (c-1) x**(c-2))``."""
    if not isinstance(exponent, (int, float)) or isinstance(exponent, bool):
        return None
    c = exponent
    if c == 2:
        return 2 * input, torch.full_like(input, 2.0)
    return c * input ** (c - 1), c * (c - 1) * input ** (c - 2)


for _name in ("exp", "log", "tanh", "sigmoid", "sin", "cos", "sqrt", "rsqrt", "square",
              "log1p", "expm1", "erf", "erfc", "reciprocal", "tan", "atan", "sinh", "cosh",
              "asin", "acos", "asinh", "atanh", "log2", "log10", "exp2", "erfinv",
              "arctan", "arcsin", "arccos", "lgamma", "digamma"):
    unary(_name, "input", getattr(torch, _name),
          closed=(lambda input, f=CLOSED[_name]: f(input)) if _name in CLOSED else None)

# more smooth functions, their derivatives from torch's forward mode (torch.special's as torch
# reports them: ``special_i0e``)
for _name in ("acosh", "arccosh", "arcsinh", "arctanh", "i0", "sinc"):
    unary(_name, "input", getattr(torch, _name))
for _name in ("i0e", "i1", "i1e", "erfcx", "ndtri", "log_ndtr", "ndtr", "entr"):
    unary(f"special_{_name}", "input", getattr(torch.special, _name))
unary(("polygamma", "special_polygamma"), "n input", torch.polygamma)
unary("mvlgamma", "input p", torch.mvlgamma)
unary(("fmod",), "input other", torch.fmod, traced="input other")
unary(("remainder", "__mod__"), "input other", torch.remainder, traced="input other")
unary("__rmod__", "input other", lambda input, other: torch.remainder(other, input),
      traced="input other")
# the argument of a real number (0 or pi) is piecewise constant: torch's derivative is zero
unary("angle", "input", torch.angle)
# the next float toward ``other``: torch's derivative is 1 in ``input``, 0 in ``other``
unary("nextafter", "input other", torch.nextafter, traced="input other")
unary("copysign", "input other", torch.copysign, traced="input other")
unary("ldexp", "input other", torch.ldexp, traced="input other")

unary("relu", "input inplace=False", lambda input, inplace: torch.relu(input),
      piecewise_linear=True)
unary("relu6", "input inplace=False", lambda input, inplace: F.hardtanh(input, 0.0, 6.0),
      piecewise_linear=True)
unary("gelu", "input approximate='none'", F.gelu)
unary("silu", "input inplace=False", lambda input, inplace: F.silu(input))
unary("mish", "input inplace=False", lambda input, inplace: F.mish(input))
unary("softplus", "input beta=1.0 threshold=20.0", F.softplus)
unary("elu", "input alpha=1.0 inplace=False",
      lambda input, alpha, inplace: F.elu(input, alpha))
unary("selu", "input inplace=False", lambda input, inplace: F.selu(input))
unary("celu", "input alpha=1.0 inplace=False", lambda input, alpha, inplace: F.celu(input, alpha))
unary("leaky_relu", "input negative_slope=0.01 inplace=False",
      lambda input, negative_slope, inplace: F.leaky_relu(input, negative_slope),
      piecewise_linear=True)
unary("hardtanh", "input min_val=-1.0 max_val=1.0 inplace=False",
      lambda input, min_val, max_val, inplace: F.hardtanh(input, min_val, max_val),
      piecewise_linear=True)
unary("hardswish", "input inplace=False", lambda input, inplace: F.hardswish(input))
unary("hardsigmoid", "input inplace=False", lambda input, inplace: F.hardsigmoid(input))
unary(("log_sigmoid", "logsigmoid"), "input", F.logsigmoid)
unary("softsign", "input", lambda input: input / (1 + input.abs()))
unary("tanhshrink", "input", lambda input: input - torch.tanh(input))
unary("softshrink", "input lambd=0.5", F.softshrink, piecewise_linear=True)
unary("hardshrink", "input lambd=0.5", F.hardshrink, piecewise_linear=True)
unary(("threshold", "_threshold"), "input threshold value inplace=False",
      lambda input, threshold, value, inplace: F.threshold(input, threshold, value),
      piecewise_linear=True)
unary("logit", "input eps=None", torch.logit)
unary("xlogy", "input other", torch.xlogy, traced="input other")
unary(("pow", "__pow__"), "input exponent", torch.pow, traced="input exponent", closed=_power)
unary("__rpow__", "input other", lambda input, other: torch.pow(other, input),
      traced="input other")
unary("float_power", "input exponent", torch.float_power, traced="input exponent")
unary(("clamp", "clip"), "input min=None max=None", torch.clamp, traced="input min max",
      piecewise_linear=True)
unary(("maximum", "fmax"), "input other", torch.maximum, traced="input other",
      piecewise_linear=True)
unary(("minimum", "fmin"), "input other", torch.minimum, traced="input other",
      piecewise_linear=True)
unary(("atan2", "arctan2"), "input other", torch.atan2, traced="input other")
unary("hypot", "input other", torch.hypot, traced="input other")


@decomposition("glu", "input dim=-1")
def glu(input, dim):
    a, b = input.chunk(2, dim)
    return a * torch.sigmoid(b)


@decomposition(("dropout", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout",
                "feature_alpha_dropout"), "input p=0.5 training=True inplace=False")
def dropout(input, p, training, inplace):
    if training and p > 0:
        raise UnsupportedOperationError(
            f"{PREFIX}'dropout' in training mode draws a random mask; call model.eval() (or "
            "pass training=False) to trace its eval-mode identity")
    return input + 0.0

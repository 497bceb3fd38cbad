"""Cases for the first rule groups: linear algebra, elementwise, reductions, layout."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import D, Case, rand

x, y = rand(4, 3), rand(4, 3, seed=1)
v, w = rand(3), rand(3, 5)
pos = rand(4, 3, positive=True)
b3 = rand(2, 4, 3)

CASES = [
    # linear algebra
    Case("einsum", lambda a, b: torch.einsum("ij,jk->ik", a, b), (x, w), wrt=(0, 1)),
    Case("matmul", lambda a, b: torch.matmul(a, b), (x, w), wrt=(0, 1)),
    Case("__matmul__", lambda a, b: a @ b, (b3, w), wrt=(0, 1)),
    Case("__rmatmul__", lambda a: w.T.numpy() @ a if False else a.__rmatmul__(rand(5, 4)), (x,)),
    Case("mm", lambda a, b: torch.mm(a, b), (x, w), wrt=(0, 1)),
    Case("bmm", lambda a: torch.bmm(a, rand(2, 3, 2)), (b3,)),
    Case("mv", lambda a, b: torch.mv(a, b), (x, v), wrt=(0, 1)),
    Case("dot", lambda a: torch.dot(a, rand(3, seed=4)), (v,)),
    Case("inner", lambda a, b: torch.inner(a, b), (x, y), wrt=(0, 1)),
    Case("outer", lambda a: torch.outer(a, rand(2)), (v,)),
    Case("ger", lambda a: torch.ger(a, rand(2)), (v,)),
    Case("linear", nn.Linear(3, 2, dtype=D), (x,)),
    Case("linear", lambda a, wt, bias: F.linear(a, wt, bias=bias), (x, rand(2, 3), rand(2)),
         wrt=(0, 1, 2), id="linear-F"),
    Case("bilinear", nn.Bilinear(3, 3, 2, dtype=D), (x, y), wrt=(0, 1)),
    Case("addmm", lambda c, a: torch.addmm(c, a, w, beta=0.5, alpha=2.0), (rand(4, 5), x),
         wrt=(0, 1)),
    # arithmetic
    Case("add", lambda a, b: torch.add(a, b, alpha=2), (x, y), wrt=(0, 1)),
    Case("__add__", lambda a: a + v, (x,)),
    Case("__radd__", lambda a: 2.0 + a, (x,)),
    Case("sub", lambda a, b: torch.sub(a, b), (x, y), wrt=(0, 1)),
    Case("__sub__", lambda a: a - 1.0, (x,)),
    Case("subtract", lambda a, b: a.subtract(b), (x, y), wrt=(0, 1)),
    Case("__rsub__", lambda a: 1.0 - a, (x,)),
    Case("rsub", lambda a, b: torch.rsub(a, b), (x, y), wrt=(0, 1)),
    Case("mul", lambda a, b: torch.mul(a, b), (x, y), wrt=(0, 1)),
    Case("__mul__", lambda a: a * v, (x,)),
    Case("__rmul__", lambda a: 3.0 * a, (x,)),
    Case("multiply", lambda a, b: a.multiply(b), (x, y), wrt=(0, 1)),
    Case("div", lambda a, b: torch.div(a, b), (x, pos), wrt=(0, 1)),
    Case("__truediv__", lambda a, b: a / b, (x, pos), wrt=(0, 1)),
    Case("true_divide", lambda a, b: torch.true_divide(a, b), (x, pos), wrt=(0, 1)),
    Case("divide", lambda a, b: a.divide(b), (x, pos), wrt=(0, 1)),
    Case("__div__", lambda a: a.__div__(2.0), (x,)),
    Case("__rtruediv__", lambda a: 2.0 / a, (pos,)),
    Case("__rdiv__", lambda a: a.__rdiv__(2.0), (pos,)),
    Case("neg", lambda a: torch.neg(a), (x,)),
    Case("__neg__", lambda a: -a, (x,)),
    Case("negative", lambda a: a.negative(), (x,)),
    Case("where", lambda a, b: torch.where(a > 0, a, b), (x, y), wrt=(0, 1)),
    Case("where", lambda a, b: a.where(b > 0, b), (x, y), wrt=(0, 1), id="where-method"),
    Case("masked_fill", lambda a: a.masked_fill(x > 0, 1.5), (x,)),
    Case("lerp", lambda a, b: torch.lerp(a, b, 0.3), (x, y), wrt=(0, 1)),
    Case("glu", nn.GLU(), (rand(3, 4),)),
    Case("dropout", nn.Dropout(0.3).eval(), (x,)),
    Case("dropout", lambda a: F.dropout(a, p=0.5, training=False), (x,), id="dropout-F"),
    Case("dropout1d", lambda a: F.dropout1d(a, 0.2, training=False), (b3,)),
    Case("dropout2d", nn.Dropout2d(0.2).eval(), (rand(2, 3, 4, 4),)),
    Case("dropout3d", nn.Dropout3d(0.2).eval(), (rand(2, 3, 2, 2, 2),)),
    Case("alpha_dropout", nn.AlphaDropout(0.2).eval(), (x,)),
    Case("feature_alpha_dropout", nn.FeatureAlphaDropout(0.2).eval(), (b3,)),
]

# every activation in each spelling: torch.op, Tensor.op, F.op, nn.Module
_UNARY = {
    "exp": x, "log": pos, "tanh": x, "sigmoid": x, "sin": x, "cos": x, "sqrt": pos,
    "rsqrt": pos, "square": x, "abs": x, "log1p": pos, "expm1": x, "erf": x, "erfc": x,
    "reciprocal": pos, "tan": x * 0.3, "atan": x, "sinh": x, "cosh": x, "asin": x * 0.3,
    "acos": x * 0.3, "asinh": x, "atanh": x * 0.3, "log2": pos, "log10": pos, "exp2": x,
    "erfinv": x * 0.3, "absolute": x, "arctan": x, "arcsin": x * 0.3, "arccos": x * 0.3,
    "lgamma": pos, "digamma": pos, "relu": x, "logit": torch.sigmoid(x),
}
for _name, _arg in _UNARY.items():
    CASES.append(Case(_name, getattr(torch, _name), (_arg,), id=f"{_name}-torch"))
    CASES.append(Case(_name, lambda a, n=_name: getattr(a, n)(), (_arg,), id=f"{_name}-method",
                      variants=False))
_MODULES = {
    "relu": nn.ReLU(), "relu6": nn.ReLU6(), "gelu": nn.GELU(approximate="tanh"),
    "silu": nn.SiLU(), "mish": nn.Mish(), "softplus": nn.Softplus(beta=2.0, threshold=1.0),
    "elu": nn.ELU(alpha=0.5), "selu": nn.SELU(), "celu": nn.CELU(alpha=0.7),
    "leaky_relu": nn.LeakyReLU(0.2), "hardtanh": nn.Hardtanh(-0.5, 0.5),
    "hardswish": nn.Hardswish(), "hardsigmoid": nn.Hardsigmoid(), "log_sigmoid": nn.LogSigmoid(),
    "softsign": nn.Softsign(), "tanhshrink": nn.Tanhshrink(), "softshrink": nn.Softshrink(0.3),
    "hardshrink": nn.Hardshrink(0.3), "threshold": nn.Threshold(0.1, -1.0),
    "tanh": nn.Tanh(), "sigmoid": nn.Sigmoid(),
}
for _name, _module in _MODULES.items():
    CASES.append(Case(_name, _module, (x * 3,), id=f"{_name}-module"))
    fname = {"log_sigmoid": "logsigmoid"}.get(_name, _name)
    if hasattr(F, fname) and _name != "threshold":
        CASES.append(Case(_name, lambda a, f=getattr(F, fname): f(a), (x * 3,), id=f"{_name}-F"))
CASES += [
    Case("logsigmoid", lambda a: a.logsigmoid() if hasattr(a, "logsigmoid") else F.logsigmoid(a),
         (x,), id="logsigmoid"),
    Case("relu", lambda a: F.relu(a, inplace=False), (x,), id="relu-F-inplace-false"),
    Case("_threshold", lambda a: F.threshold(a, 0.1, -1.0), (x,), id="threshold-F"),
    Case("gelu", lambda a: F.gelu(a), (x,), id="gelu-exact"),
    Case("pow", lambda a, b: torch.pow(a, b), (pos, y), wrt=(0, 1)),
    Case("__pow__", lambda a: a ** 3, (x,)),
    Case("__rpow__", lambda a: 2.0 ** a, (x,)),
    Case("float_power", lambda a: torch.float_power(a, 2.5), (pos,)),
    Case("xlogy", lambda a, b: torch.xlogy(a, b), (x, pos), wrt=(0, 1)),
    Case("clamp", lambda a: a.clamp(min=-0.5, max=0.5), (x,)),
    Case("clamp", lambda a, lo: torch.clamp(a, min=lo), (x, y), wrt=(0, 1), id="clamp-tensor"),
    Case("clip", lambda a: torch.clip(a, -0.5, 0.5), (x,)),
    Case("maximum", lambda a, b: torch.maximum(a, b), (x, y), wrt=(0, 1)),
    Case("fmax", lambda a, b: torch.fmax(a, b), (x, y), wrt=(0, 1)),
    Case("minimum", lambda a, b: torch.minimum(a, b), (x, y), wrt=(0, 1)),
    Case("fmin", lambda a, b: torch.fmin(a, b), (x, y), wrt=(0, 1)),
    Case("atan2", lambda a, b: torch.atan2(a, b), (x, y), wrt=(0, 1)),
    Case("arctan2", lambda a, b: torch.arctan2(a, b), (x, y), wrt=(0, 1)),
    Case("hypot", lambda a, b: torch.hypot(a, b), (x, y), wrt=(0, 1)),
    # reductions
    Case("sum", lambda a: a.sum(), (x,)),
    Case("sum", lambda a: torch.sum(a, dim=(0,), keepdim=True), (b3,), id="sum-dim"),
    Case("mean", lambda a: a.mean(-1), (b3,)),
    Case("softmax", lambda a: torch.softmax(a, 1), (x,)),
    Case("softmax", nn.Softmax(dim=-1), (b3,), id="softmax-module"),
    Case("log_softmax", lambda a: F.log_softmax(a, dim=0), (x,)),
    Case("log_softmax", nn.LogSoftmax(1), (x,), id="log_softmax-module"),
    Case("max", lambda a: a.max(dim=1).values, (x,)),
    Case("max", lambda a: torch.max(a), (x,), id="max-all"),
    Case("min", lambda a: torch.min(a, 0, keepdim=True)[0], (x,)),
    Case("amax", lambda a: a.amax((0, 2)), (b3,)),
    Case("amin", lambda a: torch.amin(a, dim=1, keepdim=True), (x,)),
    Case("logsumexp", lambda a: torch.logsumexp(a, dim=1), (x,)),
    Case("var", lambda a: torch.var(a, 1, correction=0), (x,)),
    Case("var", lambda a: a.var(), (x,), id="var-all"),
    Case("std", lambda a: a.std(dim=0, keepdim=True), (x,)),
    Case("norm", lambda a: a.norm(dim=1), (x,)),
    Case("norm", lambda a: torch.norm(a, p=1), (x,), id="norm-p1"),
    Case("linalg_vector_norm", lambda a: torch.linalg.vector_norm(a, ord=3, dim=-1), (x,)),
    Case("prod", lambda a: a.prod(1), (x,)),
    Case("prod", lambda a: torch.prod(a), (x,), id="prod-all"),
    Case("cumsum", lambda a: torch.cumsum(a, dim=1), (x,)),
    # layout
    Case("reshape", lambda a: a.reshape(2, 6), (x,)),
    Case("view", lambda a: a.view(-1), (x,), variants=False),
    Case("flatten", nn.Flatten(), (b3,)),
    Case("unflatten", nn.Unflatten(1, (3, 1)), (x,)),
    Case("squeeze", lambda a: a[:, :1].squeeze(1), (x,)),
    Case("unsqueeze", lambda a: torch.unsqueeze(a, 0), (x,)),
    Case("view_as", lambda a: a.view_as(rand(12)), (x,), variants=False),
    Case("reshape_as", lambda a: a.reshape_as(rand(3, 4)), (x,)),
    Case("ravel", lambda a: a.ravel(), (x,)),
    Case("atleast_1d", lambda a: torch.atleast_1d(a.sum()), (x,)),
    Case("atleast_2d", lambda a: torch.atleast_2d(a[0]), (x,)),
    Case("atleast_3d", lambda a: torch.atleast_3d(a), (x,)),
    Case("expand", lambda a: a[:1].expand(3, 3), (x,)),
    Case("expand_as", lambda a: v.expand_as(a) * a, (x,)),
    Case("broadcast_to", lambda a: torch.broadcast_to(a, (2, 4, 3)), (x,)),
    Case("contiguous", lambda a: a.T.contiguous(), (x,)),
    Case("clone", lambda a: torch.clone(a), (x,)),
    Case("to", lambda a: a.to(torch.float64), (x,)),
    Case("double", lambda a: a.double(), (x,)),
    Case("float", lambda a: a.float().double(), (x,), variants=False),
    Case("type_as", lambda a: a.type_as(y), (x,)),
    Case("__pos__", lambda a: +a, (x,)),
    Case("positive", lambda a: torch.positive(a), (x,)),
    Case("cpu", lambda a: a.cpu(), (x,)),
    Case("cuda", lambda a: a.cuda() if torch.cuda.is_available() else a.cpu(), (x,),
         variants=False),
    Case("type", lambda a: a.type(torch.float64), (x,)),
    Case("alias", lambda a: torch.alias_copy(a) if False else a.alias() if hasattr(a, "alias")
         else a, (x,), variants=False),
    Case("t", lambda a: a.t(), (x,)),
    Case("T", lambda a: a.T, (x,)),
    Case("mT", lambda a: a.mT, (b3,)),
    Case("mH", lambda a: a.mH, (b3,)),
    Case("H", lambda a: a.H, (x,)),
    Case("adjoint", lambda a: a.adjoint(), (b3,)),
    Case("permute", lambda a: a.permute(2, 0, 1), (b3,)),
    Case("transpose", lambda a: torch.transpose(a, 0, 2), (b3,)),
    Case("swapaxes", lambda a: a.swapaxes(0, 1), (x,)),
    Case("swapdims", lambda a: torch.swapdims(a, 1, 2), (b3,)),
    Case("movedim", lambda a: torch.movedim(a, 0, -1), (b3,)),
    Case("moveaxis", lambda a: a.moveaxis((0, 1), (2, 0)), (b3,)),
]

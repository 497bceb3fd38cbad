"""torch's own derivative semantics, or a clear refusal: grad-mode regions inside ``fn``, and
custom ``autograd.Function`` classes and custom operators, whose derivative is their backward.

References: ``torch.autograd.functional.jacobian`` and ``torch.func`` in float64."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch
import torch.nn as nn
from hypothesis import given, strategies as st
from torch.autograd.functional import jacobian as autograd_jacobian

import sparsejac
from sparsejac.errors import ArgumentError, ArgumentTypeError, UnsupportedOperationError
from test_programs import programs, rand, run_program

D = torch.float64


def dense(fn, *args, wrt=0):
    J = sparsejac.jacobian_of(fn, *args, wrt=wrt, format="coo")
    return J.todense()


def expected(fn, x):
    out = fn(x)
    return autograd_jacobian(fn, x).reshape(tuple(out.shape) + tuple(x.shape)).numpy()


def agree(fn, x):
    got, want = dense(fn, x), expected(fn, x)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    return got


# --- grad modes --------------------------------------------------------------------------------


def in_no_grad(x):
    with torch.no_grad():
        y = x * 2
    return x * y


def in_inference_mode(x):
    with torch.inference_mode():
        y = x * 2
    return x + y.clone()  # torch refuses to save an inference tensor for backward: add


def in_set_grad_enabled(x):
    with torch.set_grad_enabled(False):
        y = torch.sin(x)
    return x * y


def switched_off_and_on(x):
    torch.set_grad_enabled(False)  # the function form, not a context
    y = x.exp()
    torch.set_grad_enabled(True)
    return x * y + x.sin()


@torch.no_grad()
def decorated_helper(x):
    return torch.tanh(x) * 3


def through_decorated(x):
    return x * decorated_helper(x)


def enable_inside_no_grad(x):
    with torch.no_grad():
        c = x.cos()
        with torch.enable_grad():
            y = x * x  # followed again
    return y * c


def enable_inside_inference(x):
    with torch.inference_mode():
        with torch.enable_grad():  # inference mode still records nothing
            y = x * 3
    return x + y.clone()


def detached(x):
    return x * x.detach() + x.detach().sin() + x.data * x


@pytest.mark.parametrize("fn", [in_no_grad, in_inference_mode, in_set_grad_enabled,
                                switched_off_and_on, through_decorated, enable_inside_no_grad,
                                enable_inside_inference, detached])
def test_grad_mode_regions_are_constants(fn):
    x = rand(3, 4)
    got = agree(fn, x)
    if fn is not enable_inside_inference:  # torch.func refuses an inference tensor
        np.testing.assert_allclose(got, torch.func.jacrev(fn)(x).numpy(), rtol=1e-12,
                                   atol=1e-12)


def test_no_grad_region_differs_from_following_it():
    """The case that was silently wrong: ``x * (x * 2)`` under no_grad is ``2x``, not ``4x``."""
    x = rand(5)
    got = dense(in_no_grad, x)
    np.testing.assert_allclose(np.diag(got), 2 * x.numpy(), rtol=1e-14)


class Student(nn.Module):
    """A student/teacher pair: the target branch (an EMA teacher) under no_grad."""

    def __init__(self) -> None:
        super().__init__()
        self.student = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 4)).double()
        self.teacher = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 4)).double()

    def forward(self, x):
        with torch.no_grad():
            target = self.teacher(x).softmax(-1)
            self.teacher[0].weight.mul_(0.9).add_(0.1 * self.student[0].weight)  # EMA update
        return (self.student(x).log_softmax(-1) * target).sum(-1)


def test_module_with_a_no_grad_target_branch():
    torch.manual_seed(0)
    model, x = Student(), rand(5, 6)
    # the EMA update changes the teacher on each call: compare on copies of one state
    state = {k: v.clone() for k, v in model.state_dict().items()}
    got = dense(model, x)
    model.load_state_dict(state)
    want = autograd_jacobian(model, x).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


def test_an_outer_grad_mode_is_ignored():
    """As ``torch.func``'s transforms: a call made under no_grad or inference_mode still
    differentiates ``fn`` (and ``fn``'s own regions still count)."""
    x = rand(4)
    want = torch.func.jacrev(in_no_grad)(x).numpy()
    with torch.no_grad():
        np.testing.assert_allclose(dense(in_no_grad, x), want, rtol=1e-14)
    with torch.inference_mode():
        xi = rand(4)  # an inference tensor
        np.testing.assert_allclose(dense(in_no_grad, xi), want, rtol=1e-14)
        H = sparsejac.hessian_of(lambda x: (x.sin() * x).sum(), xi).todense()
    with torch.enable_grad():
        Hw = torch.func.hessian(lambda x: (x.sin() * x).sum())(x).numpy()
    np.testing.assert_allclose(H, Hw, rtol=1e-12, atol=1e-14)
    assert torch.is_grad_enabled() and not torch.is_inference_mode_enabled()


def test_the_callers_grad_mode_is_restored():
    x = rand(3)
    with torch.no_grad():
        sparsejac.jacobian_of(switched_off_and_on, x)
        assert not torch.is_grad_enabled()
    sparsejac.jacobian_of(lambda x: (torch.set_grad_enabled(False), x * 2)[1], x)
    assert torch.is_grad_enabled()


def test_hessians_of_grad_mode_regions():
    """Regions are constants in both differentiations, as ``torch.autograd.functional.hessian``
    (reverse over reverse) has them; ``torch.func.hessian``'s outer forward-mode pass is not
    stopped by no_grad, so it is no reference here."""
    x = rand(4, 3)

    def f(x):
        with torch.no_grad():
            w = torch.tanh(x)
        return (w * x.sin() + x.detach() * x * x).sum()

    H = sparsejac.hessian_of(f, x).todense()
    want = torch.autograd.functional.hessian(f, x).numpy()
    np.testing.assert_allclose(H, want, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(H, torch.func.jacrev(torch.func.jacrev(f))(x).numpy(),
                               rtol=1e-12, atol=1e-14)


def test_plan_refills_keep_the_regions():
    plan = sparsejac.plan_of(in_no_grad, rand(6))
    for seed in range(3):
        x = rand(6, seed=seed + 1)
        got = plan.jacobian(x, format="csr").toarray()
        np.testing.assert_allclose(got, expected(in_no_grad, x), rtol=1e-14)
    hplan = sparsejac.plan_of(lambda x: in_no_grad(x).sum(), rand(6), order=2)
    x = rand(6, seed=9)
    np.testing.assert_allclose(
        hplan.jacobian(x, format="csr").toarray(),
        torch.autograd.functional.hessian(lambda x: in_no_grad(x).sum(), x).numpy(), rtol=1e-14)


def test_parameters_that_require_grad_build_no_graph():
    """The tracer's own work runs without autograd in the first order: the result's factors
    carry no graph of the module's parameters."""
    model = nn.Linear(4, 3).double()
    x = rand(2, 4)
    J = sparsejac.jacobian_of(lambda x: torch.tanh(model(x)), x, format="coo")
    np.testing.assert_allclose(J.todense(), expected(lambda x: torch.tanh(model(x)), x),
                               rtol=1e-12)
    assert model.weight.grad is None


def test_a_write_into_a_traced_tensor_under_no_grad_is_refused():
    def f(x):
        y = x * 1
        with torch.no_grad():
            y.add_(1)
        return y * y

    with pytest.raises(UnsupportedOperationError, match="no_grad"):
        sparsejac.jacobian_of(f, rand(3))


def test_a_write_into_a_constant_under_no_grad_is_followed_as_torch_does():
    buf = torch.zeros(3, dtype=D)

    def f(x):
        with torch.no_grad():
            buf.copy_(x.sin())  # a constant from here on
        return x * buf

    x = rand(3)
    got = dense(f, x)
    np.testing.assert_allclose(np.diag(got), x.sin().numpy(), rtol=1e-14)


# --- property test: random programs with no_grad regions and detach ----------------------------


def _around(modes):
    def around(i, step):
        mode = modes[i % len(modes)]
        if mode == 1:
            with torch.no_grad():
                return step()
        if mode == 2:
            return step().detach()
        if mode == 3:
            with torch.no_grad(), torch.enable_grad():
                return step()
        if mode == 4:
            with torch.set_grad_enabled(False):
                y = step()
            return y
        return step()

    return around


@given(
    steps=programs(),
    modes=st.lists(st.sampled_from([0, 0, 1, 2, 3, 4]), min_size=1, max_size=7),
    shape=st.lists(st.integers(1, 3), min_size=1, max_size=3),
    seed=st.integers(0, 2**16),
)
def test_random_programs_with_grad_mode_regions(steps, modes, shape, seed):
    x = rand(*shape, seed=seed)

    def fn(x):
        return run_program(steps, x, _around(modes))

    out = fn(x)
    want = autograd_jacobian(fn, x).reshape(tuple(out.shape) + tuple(x.shape)).numpy()
    scale = max(1.0, float(np.abs(want).max(initial=0.0)))
    np.testing.assert_allclose(dense(fn, x), want, rtol=1e-10, atol=1e-12 * scale)


# --- custom autograd Functions and custom operators --------------------------------------------


class RoundSTE(torch.autograd.Function):
    """The straight-through estimator: rounds forward, passes the gradient back."""

    @staticmethod
    def forward(ctx, x):
        return torch.round(x)

    @staticmethod
    def backward(ctx, g):
        return g


class ClipGrad(torch.autograd.Function):
    """Forward ``3x``; backward clips the gradient to [-1, 1] (derivative 1, not 3)."""

    @staticmethod
    def forward(ctx, x):
        return 3 * x

    @staticmethod
    def backward(ctx, g):
        return g.clamp(-1, 1)


class FusedTanhLinear(torch.autograd.Function):
    """A fused kernel ``tanh(x @ w)`` whose backward is the true derivative."""

    @staticmethod
    def forward(ctx, x, w):
        y = torch.tanh(x @ w)
        ctx.save_for_backward(x, w, y)
        return y

    @staticmethod
    def backward(ctx, g):
        x, w, y = ctx.saved_tensors
        gz = g * (1 - y * y)
        return gz @ w.T, x.T @ gz


class ScaleNoCtx(torch.autograd.Function):
    """The ``setup_context`` style: forward takes no ctx."""

    @staticmethod
    def forward(x, k):
        return x * k

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.k = inputs[1]

    @staticmethod
    def backward(ctx, g):
        return g * ctx.k, None


@pytest.fixture
def declared():
    """Declarations made by a test are removed after it."""
    made = []

    def declare(target, derivative, **kw):
        made.append(target)
        return sparsejac.register_function(target, derivative, **kw)

    yield declare
    for target in made:
        sparsejac.unregister_function(target)


@pytest.mark.parametrize("cls", [RoundSTE, ClipGrad, FusedTanhLinear])
def test_an_undeclared_function_is_refused_by_name(cls):
    x = rand(2, 3)
    args = (x, rand(3, 3)) if cls is FusedTanhLinear else (x,)
    with pytest.raises(UnsupportedOperationError) as info:
        sparsejac.jacobian_of(lambda x: cls.apply(x, *args[1:]), x)
    message = str(info.value)
    assert cls.__qualname__ in message and "register_function" in message


def test_straight_through_estimator_declared_elementwise(declared):
    declared(RoundSTE, "elementwise")
    x = rand(4, 3) * 3
    fn = lambda x: RoundSTE.apply(x) * x.sin()  # noqa: E731
    got = agree(fn, x)
    assert np.abs(got).max() > 0  # the forward's own derivative (round's) would be zero here


def test_gradient_clipping_backward_is_the_derivative(declared):
    declared(ClipGrad, "elementwise")
    x = rand(5)
    got = agree(lambda x: ClipGrad.apply(x), x)
    np.testing.assert_allclose(np.diag(got), 1.0)  # the backward's 1, not the forward's 3
    np.testing.assert_allclose(dense(ClipGrad.apply, x), got)  # passed as fn itself


@pytest.mark.parametrize("declare", [False, True])
def test_a_reference_to_apply_taken_before_the_trace_is_refused(declare, declared):
    """``f = ClipGrad.apply`` binds torch's own apply before the trace: torch then runs the
    forward with grad mode off, which must not read as a constant."""
    if declare:
        declared(ClipGrad, "elementwise")
    clip = ClipGrad.apply
    with pytest.raises(UnsupportedOperationError, match="ClipGrad.apply"):
        sparsejac.jacobian_of(lambda x: clip(x), rand(5))
    with pytest.raises(UnsupportedOperationError, match="ClipGrad.apply"):
        sparsejac.hessian_of(lambda x: clip(x * x).sum(), rand(5))


def test_fused_kernel_declared_forward(declared):
    declared(FusedTanhLinear, "forward")
    x, w = rand(3, 4), rand(4, 5)
    agree(lambda x: FusedTanhLinear.apply(x, w), x)
    # with respect to the weight too, and its Hessian (the forward is traced)
    Jw = sparsejac.jacobian_of(lambda w: FusedTanhLinear.apply(x, w), w).todense()
    want = torch.func.jacrev(lambda w: torch.tanh(x @ w))(w).numpy()
    np.testing.assert_allclose(Jw, want, rtol=1e-12, atol=1e-12)
    H = sparsejac.hessian_of(lambda x: FusedTanhLinear.apply(x, w).sum(), x).todense()
    Hw = torch.func.hessian(lambda x: torch.tanh(x @ w).sum())(x).numpy()
    np.testing.assert_allclose(H, Hw, rtol=1e-12, atol=1e-14)


def test_decorator_form_and_setup_context_style(declared):
    declared(ScaleNoCtx, "elementwise")
    x = rand(3)
    agree(lambda x: ScaleNoCtx.apply(x, 2.5), x)

    @sparsejac.register_function("forward")
    class Twice(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x * 2

        @staticmethod
        def backward(ctx, g):
            return g * 2

    try:
        agree(lambda x: Twice.apply(x).exp(), x)
    finally:
        sparsejac.unregister_function(Twice)


def test_a_structured_rule(declared):
    """A rule written with the rule writers' surface, as the built-in ones are."""
    from sparsejac.programs import sums as S

    def rule(cx, result, x, w):
        return S.einsum(cx, result, "ij,jk->ik", [x, w])

    class MatMul(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, w):
            ctx.save_for_backward(x, w)
            return x @ w

        @staticmethod
        def backward(ctx, g):
            x, w = ctx.saved_tensors
            return g @ w.T, x.T @ g

    declared(MatMul, rule, second="linear")
    x, w = rand(3, 4), rand(4, 2)
    agree(lambda x: MatMul.apply(x, w).tanh(), x)
    J = sparsejac.jacobian_of(lambda x: MatMul.apply(x, w), x, format="csr")
    assert J.nnz == 3 * 2 * 4  # the structure: one row block per sample
    H = sparsejac.hessian_of(lambda x: MatMul.apply(x, w).tanh().sum(), x).todense()
    Hw = torch.func.hessian(lambda x: (x @ w).tanh().sum())(x).numpy()
    np.testing.assert_allclose(H, Hw, rtol=1e-12, atol=1e-14)


def test_elementwise_declarations_check_shapes_and_refuse_the_second_order(declared):
    declared(RoundSTE, "elementwise")
    with pytest.raises(UnsupportedOperationError, match="second order"):
        sparsejac.hessian_of(lambda x: (RoundSTE.apply(x) * x).sum(), rand(3))

    class Outer(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, y):
            return x * y

        @staticmethod
        def backward(ctx, g):
            return g, g

    declared(Outer, "elementwise")
    with pytest.raises(UnsupportedOperationError, match="shape"):
        sparsejac.jacobian_of(lambda x: Outer.apply(x, torch.ones(4, 1, dtype=D)), rand(1, 3))


def test_functions_under_no_grad_and_on_constants():
    """Where torch records nothing (no_grad), or no input is traced, the Function is a
    constant, declared or not."""
    x = rand(3)

    def f(x):
        with torch.no_grad():
            r = RoundSTE.apply(x)
        return x * r + RoundSTE.apply(torch.ones(3, dtype=D))

    agree(f, x)


def test_functions_elsewhere_are_untouched():
    """Outside a trace, and on other threads during one, Function.apply is torch's own."""
    import threading

    x = rand(3).requires_grad_(True)
    RoundSTE.apply(x).sum().backward()
    np.testing.assert_allclose(x.grad.numpy(), 1.0)
    assert "apply" in torch.autograd.Function.__dict__
    original = torch.autograd.Function.__dict__["apply"]
    seen = {}

    def other_thread():
        y = rand(2).requires_grad_(True)
        ClipGrad.apply(y).sum().backward()
        seen["grad"] = y.grad.clone()

    def fn(x):
        t = threading.Thread(target=other_thread)
        t.start()
        t.join()
        return x.sin()

    sparsejac.jacobian_of(fn, rand(3))
    np.testing.assert_allclose(seen["grad"].numpy(), 1.0)
    assert torch.autograd.Function.__dict__["apply"] is original


@torch.library.custom_op("sparsejac_test::cube", mutates_args=())
def cube(x: torch.Tensor) -> torch.Tensor:
    return x * x * x


def _cube_backward(ctx, g):
    (x,) = ctx.saved_tensors
    return g * 3 * x * x


cube.register_autograd(_cube_backward,
                       setup_context=lambda ctx, inputs, output: ctx.save_for_backward(inputs[0]))


def test_custom_operator_refused_then_declared(declared):
    x = rand(4)
    with pytest.raises(UnsupportedOperationError, match="sparsejac_test::cube"):
        sparsejac.jacobian_of(lambda x: cube(x), x)
    declared(cube, "elementwise")
    agree(lambda x: cube(x) + x, x)
    sparsejac.unregister_function(cube)
    declared("sparsejac_test::cube", "elementwise")  # by its name, as torch.ops spells it
    agree(lambda x: torch.ops.sparsejac_test.cube(x.sin()), x)


def test_bad_declarations():
    with pytest.raises(ArgumentTypeError, match="Function subclass or a custom operator"):
        sparsejac.register_function(lambda x: x, "elementwise")
    with pytest.raises(ArgumentError, match="derivative must be one of"):
        sparsejac.register_function(RoundSTE, "linear")
    with pytest.raises(ArgumentError, match="'forward' is for autograd.Function"):
        sparsejac.register_function(cube, "forward")
    with pytest.raises(ArgumentError, match="no operator"):
        sparsejac.register_function("sparsejac_test::missing", "elementwise")
    with pytest.raises(ArgumentError, match="qualified name"):
        sparsejac.register_function("relu", "elementwise")
    for target in (RoundSTE, cube, "sparsejac_test::cube"):
        with pytest.raises(ArgumentTypeError, match="say what the derivative is"):
            sparsejac.register_function(target)


@pytest.mark.parametrize("reentrant", [False, True])
def test_activation_checkpointing(reentrant):
    """torch's own Function for reentrant checkpointing is declared: its derivative is the
    checkpointed function's."""
    from torch.utils.checkpoint import checkpoint

    layer = nn.Linear(4, 4).double()
    fn = lambda x: checkpoint(lambda y: torch.tanh(layer(y)), x, use_reentrant=reentrant)  # noqa: E731
    x = rand(3, 4)
    # (torch's .grad() refuses reentrant checkpoints: the reference is the plain function)
    want = torch.func.jacrev(lambda x: torch.tanh(layer(x)))(x).detach().numpy()
    np.testing.assert_allclose(dense(fn, x), want, rtol=1e-12, atol=1e-14)
    H = sparsejac.hessian_of(lambda x: fn(x).sum(), rand(3, 4)).todense()
    want = torch.autograd.functional.hessian(lambda x: torch.tanh(layer(x)).sum(), rand(3, 4))
    np.testing.assert_allclose(H, want.numpy(), rtol=1e-12, atol=1e-14)


# --- ties and kinks: torch's own choice of derivative -----------------------------------------

TIED = torch.tensor([[1.0, 3.0, 3.0, -2.0], [0.0, 0.0, -1.0, 0.0], [2.0, 2.0, 2.0, 2.0]],
                    dtype=D)


def _bn(x):
    return torch.nn.functional.batch_norm(x, None, None, training=True)


def _where_log(x):
    return torch.where(x > 0, x, torch.log(x + 1))  # log's derivative is inf at -1, not taken


def _where_sqrt(x):
    return torch.where(x >= 0, x.sqrt(), x)  # sqrt's is inf at 0 (taken), nan below (not)


def _masked(x):
    return x[x > 0].sum() * x  # a boolean mask selects by value


@pytest.mark.parametrize("fn", [
    lambda x: x.amax(-1), lambda x: x.amax(), lambda x: x.max(-1).values,
    lambda x: x.min(0).values, lambda x: torch.max(x), lambda x: x.amin((0, 1)),
    lambda x: torch.nn.functional.max_pool1d(x.unsqueeze(0), 2).squeeze(0),
    lambda x: torch.nn.functional.max_pool2d(x[None, None], 2, stride=1)[0, 0],
    torch.relu, torch.abs, lambda x: x.clamp(0.0, 2.0), lambda x: x.clamp(min=0.0),
    lambda x: torch.maximum(x, x.flip(-1)), _where_log, _where_sqrt, _bn, _masked,
    lambda x: torch.nn.functional.hardtanh(x, -1.0, 1.0), torch.nn.functional.leaky_relu,
], ids=["amax", "amax_all", "max_dim", "min_dim", "max_all", "amin_dims", "max_pool1d",
        "max_pool2d", "relu", "abs", "clamp", "clamp_min", "maximum", "where_log", "where_sqrt",
        "batch_norm_training", "boolean_mask", "hardtanh", "leaky_relu"])
def test_ties_and_kinks_match_torch(fn):
    """Ties (equal maxima), kinks (relu, abs and clamp at their corners) and a branch whose
    derivative is nan where it is not taken: the values torch's autograd gives, nan included."""
    J = sparsejac.jacobian_of(fn, TIED, format="coo")
    got, want = J.todense(), expected(fn, TIED)
    # Off the stored entries, torch's nan is its own 0 * inf: each vector-Jacobian product
    # multiplies a branch's infinite (or nan) derivative by the zero gradient ``where`` gives
    # it, so whole columns fill with nan (forward mode fills rows instead). Those entries of an
    # elementwise step are structurally zero, and stay so; everywhere else the values are
    # torch's, nan for nan.
    stored = np.zeros(got.shape, bool)
    stored[tuple(J.coords)] = True
    artefact = ~np.isfinite(want) & ~stored
    if artefact.any():
        assert fn in (_where_log, _where_sqrt), "nan off the pattern only from a where branch"
        want = np.where(artefact, 0.0, want)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12, equal_nan=True)

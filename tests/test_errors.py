"""Bad input: each case raises the package's own exception, whose message quotes the
subscripts and names the culprit."""

from __future__ import annotations

import numpy as np
import pytest

import sparsejac
from sparsejac import (
    ArgumentError,
    ArgumentTypeError,
    OperandTypeError,
    ShapeError,
    SparsejacError,
    SubscriptError,
)

A23, A33, A34 = np.ones((2, 3)), np.ones((3, 3)), np.ones((3, 4))

CASES = [
    # (subscripts, operands, kwargs, exception, message regex)
    ("ij,j%->i", [A23, np.ones(3)], {}, SubscriptError, r"'ij,j%->i'.*character '%' at position 4"),
    ("ij,jk->ik->i", [A23, A34], {}, SubscriptError, r"more than one '->'"),
    ("ij-jk", [A23], {}, SubscriptError, r"'-' and '>'"),
    ("i..j", [A23], {}, SubscriptError, r"input term 0 'i..j' has a broken ellipsis"),
    ("...i...", [A23], {}, SubscriptError, r"more than one ellipsis"),
    ("ij->i....", [A23], {}, SubscriptError, r"output term .* broken ellipsis"),
    ("ij,jk->ii", [A23, A34], {}, SubscriptError, r"output letter 'i' appears more than once"),
    ("ij,jk->iq", [A23, A34], {}, SubscriptError, r"output letter 'q' does not appear"),
    ("ij->...ij", [A23], {}, SubscriptError, r"the output has '...' but no input has one"),
    ("...i->i", [A23], {}, SubscriptError, r"1 dimension\(s\) under '...'.*no '...'"),
    ("ij,jk->ik", [A23], {}, ShapeError, r"'ij,jk->ik'.*name 2 operand\(s\), but 1 were given"),
    ("ij,jk->ik", [A23, A34, A34], {}, ShapeError, r"name 2 operand\(s\), but 3"),
    ("ijk,jk->i", [A23, A34], {}, ShapeError, r"operand 0 has 2 dimension\(s\).*'ijk' needs 3"),
    ("ij...,jk", [np.ones(2), A34], {}, ShapeError, r"operand 0 has 1 .*needs at least 2"),
    ("ij,jk->ik", [A23, np.ones((4, 4))], {}, ShapeError,
     r"letter 'j' has size 3 in operand 0 but size 4 in operand 1"),
    ("...i,...i", [np.ones((2, 3)), np.ones((4, 3))], {}, ShapeError,
     r"letter '...\[0\]' has size 2 in operand 0 but size 4 in operand 1"),
    ("ii->i", [A23], {}, ShapeError, r"letter 'i' is repeated in operand 0 .*sizes 2 and 3"),
    ("ij,jk->ik", [A23, A34], {"wrt": 2}, ArgumentError, r"wrt=2 is out of range for 2"),
    ("ij,jk->ik", [A23, A34], {"wrt": -3}, ArgumentError, r"wrt=-3 is out of range"),
    ("ij,jk->ik", [A23, A34], {"wrt": 1.0}, ArgumentTypeError, r"wrt must be an int.*float"),
    ("ij,jk->ik", [A23, A34], {"wrt": True}, ArgumentTypeError, r"wrt must be an int.*bool"),
    ("ij,jk->ik", [A23, A34], {"wrt": ()}, ArgumentError, r"wrt is an empty sequence"),
    ("ij,jk->ik", [A23, A34], {"format": "dense"}, ArgumentError,
     r"format='dense' is not one of \['coo', 'csr', 'csc'"),
    ("ij,jk->ik", [A23, A34], {"format": 3}, ArgumentTypeError, r"format must be a str"),
    ("ij,jk->ik", [A23, A34], {"method": "fast"}, ArgumentError, r"method='fast' is not one of"),
    ("ij,jk->ik", [A23.astype(str), A34], {}, OperandTypeError, r"operand 0 has dtype <U32"),
    ("ij,jk->ik", [A23, A34.astype(object)], {}, OperandTypeError, r"operand 1 has dtype object"),
    ("ij,jk->ik", [A23.astype(bool), A34], {}, OperandTypeError, r"operand 0 has dtype bool"),
    ("i,i", [[1.0, [2.0]], np.ones(2)], {}, OperandTypeError, r"operand 0 cannot be read"),
    ("ij,jk->ik", [A23, A34], {"memory_limit": -1}, ArgumentError, r"memory_limit=-1 must be"),
    ("ij,jk->ik", [A23, A34], {"memory_limit": [1]}, ArgumentTypeError, r"memory_limit must be"),
    ("ij,jk->ik", [A23, A34], {"memory_limit": "1QB"}, ArgumentError, r"memory_limit '1QB' is not a size"),
    ("ij,jk->ik", [A23, A34], {"memory_limit": 1e9 + 0j}, ArgumentTypeError,
     r"memory_limit must be a number of bytes.*got complex"),
    ("ij,jk->ik", [A23, A34], {"memory_limit": np.complex128(1e9)}, ArgumentTypeError,
     r"memory_limit must be a number of bytes.*got complex128"),
    ("ij,jk->ik", [A23, A34], {"memory_limit": np.timedelta64(5)}, ArgumentTypeError,
     r"memory_limit must be a number of bytes.*got timedelta64"),
    ("ij,jk->ik", [A23, A34], {"memory_limit": True}, ArgumentTypeError,
     r"memory_limit must be a number of bytes.*got bool"),
    ("ij,jk->ik", [A23, A34], {"memory_limit": np.bool_(True)}, ArgumentTypeError,
     r"memory_limit must be a number of bytes.*got bool"),
    ("ij,jk->ik", [A23, A34], {"memory_limit": float("nan")}, ArgumentError,
     r"memory_limit=nan must be a number of bytes >= 0"),
]


@pytest.mark.parametrize(
    "subscripts, operands, kwargs, exception, match",
    CASES,
    ids=[f"{c[0]}-{c[3].__name__}-{i}" for i, c in enumerate(CASES)],
)
def test_bad_input(subscripts, operands, kwargs, exception, match):
    with pytest.raises(exception, match=match) as info:
        sparsejac.jacobian(subscripts, *operands, **kwargs)
    assert isinstance(info.value, SparsejacError)
    assert isinstance(info.value, (ValueError, TypeError))
    # Every message quotes the subscripts.
    assert repr(subscripts) in str(info.value)


def test_subscripts_not_a_string():
    with pytest.raises(ArgumentTypeError, match="subscripts must be a str.*int"):
        sparsejac.jacobian(3, A23)


def test_numpy_rejects_what_we_reject():
    """Spot-check that the table matches numpy's own grammar where numpy has a rule."""
    for subscripts, operands, kwargs, exception, _ in CASES:
        if kwargs or exception in (OperandTypeError, ArgumentTypeError):
            continue
        if subscripts == "ij->...ij":
            continue  # numpy accepts an output '...' with no input one; we refuse it (issue 2)
        with pytest.raises((ValueError, TypeError)):
            np.einsum(subscripts, *operands)


def test_plan_shapes_and_dtypes_are_checked():
    with pytest.raises(ShapeError, match=r"'ij->ij': shape 0 \(-3, -2\) has a negative dimension"):
        sparsejac.plan("ij->ij", (-3, -2))
    with pytest.raises(ArgumentTypeError, match=r"shape 0 \(3.5,\) has a dimension 3.5 of type float"):
        sparsejac.plan("i->i", (3.5,))
    with pytest.raises(ArgumentTypeError, match=r"shape 0 must be a sequence of ints.*int"):
        sparsejac.plan("i->i", 3)
    with pytest.raises(ArgumentTypeError, match=r"wrt must be an int or a tuple of ints, got float"):
        sparsejac.plan("i,i->i", (3,), (3,), wrt=(0, 1.0))
    with pytest.raises(ArgumentTypeError, match=r"dtype 'foo' is not a numpy or torch dtype"):
        sparsejac.plan("i->i", (3,)).nbytes("csr", "foo")
    assert sparsejac.plan("i->i", (np.int64(3),)).shape == (3, 3)


@pytest.mark.parametrize("limit", [float("inf"), np.float64("inf"), "4GB", np.int64(10**9), 10**9])
def test_memory_limits_that_are_sizes_are_taken(limit):
    J = sparsejac.jacobian("ij,jk->ik", A23, A34, format="csr", memory_limit=limit)
    assert J.nnz == sparsejac.plan("ij,jk->ik", (2, 3), (3, 4)).nnz


@pytest.mark.parametrize("dtype", [object, str, bool, "U3", None, 3, "foo"])
def test_nbytes_refuses_what_is_not_a_numeric_dtype(dtype):
    p = sparsejac.plan("ij,jk->ik", (2, 3), (3, 4))
    for size in (p.nbytes, p.peak_nbytes):
        with pytest.raises(ArgumentTypeError, match=r"einsum 'ij,jk->ik': dtype .* is not a"):
            size("csr", dtype)


def test_nbytes_is_the_bytes_of_the_default_result():
    p = sparsejac.plan("ij,jk->ik", (2, 3), (3, 4))
    J = p.jacobian(A23, A34)  # the default format
    assert p.nbytes() == p.nbytes("coo") == J.coords.nbytes + J.data.nbytes
    assert p.nbytes("csr", np.float32) < p.nbytes("csr", np.float64)


def test_sparse_operands_and_torchless_dtypes_are_refused():
    import scipy.sparse
    import sparse

    with pytest.raises(OperandTypeError, match=r"operand 0 is a sparse array \(COO\)"):
        sparsejac.jacobian("ij,jk->ik", sparse.COO.from_numpy(A23), A34)
    with pytest.raises(OperandTypeError, match=r"operand 1 is a sparse array \(csr_array\)"):
        sparsejac.jacobian("ij,jk->ik", A23, scipy.sparse.csr_array(A34))
    with pytest.raises(OperandTypeError, match=r"float128 has no torch equivalent"):
        sparsejac.jacobian("ij,jk->ik", A23.astype(np.longdouble), A34, format="torch")


# -- torch tensors numpy cannot take, float16 with scipy formats, many operands ----------------


def test_meta_tensors_are_operand_type_errors():
    torch = pytest.importorskip("torch")
    with pytest.raises(OperandTypeError, match=r"'i,i->i': operand 0 .* meta device"):
        sparsejac.jacobian("i,i->i", torch.ones(3, device="meta"), np.ones(3))


@pytest.mark.parametrize("name, expected", [
    ("complex32", np.complex64), ("float8_e4m3fn", np.float32), ("float8_e5m2", np.float32),
    ("float8_e4m3fnuz", np.float32), ("float8_e5m2fnuz", np.float32), ("bfloat16", np.float32),
])
def test_torch_dtypes_numpy_lacks_are_upcast_exactly(name, expected):
    torch = pytest.importorskip("torch")
    if not hasattr(torch, name):
        pytest.skip(f"this torch has no {name}")
    t = torch.tensor([1.0, -2.0, 0.5]).to(getattr(torch, name))
    J = sparsejac.jacobian("i,i->i", np.ones(3, dtype=np.float32), t, format="csr")
    assert J.dtype == np.result_type(np.float32, expected)
    np.testing.assert_array_equal(J.diagonal().real, [1.0, -2.0, 0.5])


@pytest.mark.parametrize("method", ["direct", "embed"])
@pytest.mark.parametrize("fmt", ["csr", "csc"])
def test_float16_scipy_formats_are_float32(fmt, method):
    """The documented policy: scipy cannot use float16, so csr/csc hold float32 (exact)."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 4)).astype(np.float16)
    w = rng.standard_normal((4, 5)).astype(np.float16)
    J = sparsejac.jacobian("ij,jk->ik", x, w, format=fmt, method=method)
    assert J.dtype == np.float32
    ref = sparsejac.jacobian("ij,jk->ik", x.astype(np.float32), w.astype(np.float32), format=fmt)
    np.testing.assert_array_equal(J.toarray(), ref.toarray())  # scipy can use it
    assert sparsejac.plan("ij,jk->ik", x.shape, w.shape).nbytes(fmt, np.float16) == \
        sparsejac.plan("ij,jk->ik", x.shape, w.shape).nbytes(fmt, np.float32)
    coo = sparsejac.jacobian("ij,jk->ik", x, w, format="coo", method=method)
    assert coo.dtype == np.float16  # pydata sparse holds float16: kept


@pytest.mark.parametrize("wrt", [0, 64])
def test_65_operands(wrt):
    """numpy's einsum stops at 64 operands; the factor is contracted pairwise past 32."""
    letters = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
    terms = [letters[i % 52] for i in range(65)]  # 65 vectors over 52 letters
    subscripts = ",".join(terms) + "->a"
    rng = np.random.default_rng(3)
    x = [rng.uniform(0.5, 1.5, size=2) for _ in terms]
    J = sparsejac.jacobian(subscripts, *x, wrt=wrt, format="coo")
    assert J.shape == (2, 2)

    # z[a] = prod_{k: term a} x_k[a] * prod_{letters M != a} sum_v prod_{k: term M} x_k[v].
    def product(letter, skip=None):
        vals = np.ones(2)
        for k, t in enumerate(terms):
            if t == letter and k != skip:
                vals = vals * x[k]
        return vals

    L = terms[wrt]
    rest = np.prod([product(M).sum() for M in sorted(set(terms)) if M not in ("a", L)])
    if L == "a":
        expected = np.diag(product("a", skip=wrt)) * rest
    else:
        expected = np.outer(product("a"), product(L, skip=wrt)) * rest
    np.testing.assert_allclose(J.todense(), expected, rtol=1e-12)
    # The operator's products take every operand at once (J @ v puts v in the slot): 65 too.
    A = sparsejac.linear_operator(subscripts, *x, wrt=wrt)
    np.testing.assert_allclose(A @ np.ones(2), expected @ np.ones(2), rtol=1e-12)
    np.testing.assert_allclose(A.rmatvec(np.ones(2)), expected.T @ np.ones(2), rtol=1e-12)


@pytest.mark.parametrize("module", ["sparsejac.dask", "sparsejac.chunked", "sparsejac.store"])
def test_importing_the_dask_modules_without_dask_says_how_to_install_it(module):
    import os
    import subprocess
    import sys

    # dask made unimportable (None in sys.modules), in a fresh interpreter
    code = (f"import sys; sys.modules['dask'] = None\n"
            f"import sparsejac\n"
            f"try:\n    import {module}\n"
            f"except sparsejac.MissingDependencyError as e:\n"
            f"    print(isinstance(e, ImportError), '|', e)\n")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=env, timeout=120, check=True).stdout
    assert out.startswith("True |"), out  # also an ImportError, for except ImportError
    assert f"{module} needs dask" in out
    assert "pip install 'einsum-sparsejac[dask]'" in out and "'dask[array]' distributed" in out


# -- the tracing entry points: each message starts with the name of the one called ------------


def _tracing_cases(torch):
    """(entry point, call, exception, message after the name) for each kind of refusal."""
    from sparsejac import JacobianTooLargeError, UnsupportedOperationError

    x = torch.ones(3, 2, dtype=torch.float64)
    w = torch.ones(2, 4, dtype=torch.float64)
    energy = lambda x: torch.tanh(x @ w).sum()  # noqa: E731
    cases = []
    for name, entry, kw in [("jacobian_of", sparsejac.jacobian_of, {}),
                            ("hessian_of", sparsejac.hessian_of, {}),
                            ("plan_of", sparsejac.plan_of, {}),
                            ("plan_of", sparsejac.plan_of, {"order": 2})]:
        def call(*args, entry=entry, kw=kw, **more):
            return lambda: entry(*args, **kw, **more)

        cases += [
            (name, call(1, x), ArgumentTypeError, "fn must be callable, got int"),
            (name, call(energy, x, wrt=3), ArgumentError, r"wrt=3 is out of range"),
            (name, call(energy, "x"), OperandTypeError, "argument 0 is a str"),
            (name, call(lambda x: x.add_(1).sum(), x), UnsupportedOperationError,
             "in-place operation 'add_' writes into the differentiated argument"),
            (name, call(energy, x, memory_limit=10), JacobianTooLargeError,
             "'matmul': derivative values of shape"),
        ]
        if entry is not sparsejac.plan_of:
            cases.append((name, call(energy, x, format="nope"), ArgumentError,
                          "format='nope' is not one of"))
        if name == "hessian_of" or kw:
            cases.append((name, call(torch.tanh, x), ShapeError,
                          r"a Hessian needs fn to return one scalar tensor; got \[\(3, 2\)\]"))
    cases.append(("plan_of", lambda: sparsejac.plan_of(energy, x, order=3), ArgumentError,
                  r"order=3: 1 \(Jacobians\) or 2 \(Hessians\)"))
    return cases


def test_each_tracing_entry_point_names_itself():
    """hessian_of's and plan_of's messages start with their own names, not jacobian_of's; the
    body and the exception's type are the same for all three, jacobian_of's unchanged."""
    torch = pytest.importorskip("torch")
    for name, call, error, body in _tracing_cases(torch):
        with pytest.raises(error, match=f"^{name}: {body}"):
            call()


def test_the_second_order_names_hessian_of_and_plan_of():
    """Messages the second order raises (a declaration without one, the guard of its terms)."""
    torch = pytest.importorskip("torch")
    from sparsejac import JacobianTooLargeError, UnsupportedOperationError
    from test_soundness import RoundSTE

    x, w = torch.ones(8, dtype=torch.float64), torch.ones(8, 8, dtype=torch.float64)
    sparsejac.register_function(RoundSTE, "elementwise")
    try:
        for name, entry, kw in [("hessian_of", sparsejac.hessian_of, {}),
                                ("plan_of", sparsejac.plan_of, {"order": 2})]:
            with pytest.raises(UnsupportedOperationError,
                               match=f"^{name}: custom autograd.Function .*RoundSTE has no declared "
                                     "second order"):
                entry(lambda x: (RoundSTE.apply(x) * x).sum(), x, **kw)
            # the first order fits; tanh's curvature, w^T diag(tanh'') w, does not
            with pytest.raises(JacobianTooLargeError, match=f"^{name}: 'tanh' \\(second order\\)"):
                entry(lambda x: torch.tanh(w @ x).sum(), x, memory_limit=1500, **kw)
    finally:
        sparsejac.unregister_function(RoundSTE)


def test_without_torch_each_entry_point_names_itself():
    import os
    import subprocess
    import sys

    code = ("import sys; sys.modules['torch'] = None\n"
            "import numpy as np, sparsejac\n"
            "for f in (sparsejac.jacobian_of, sparsejac.hessian_of, sparsejac.plan_of):\n"
            "    try:\n        f(lambda x: x, np.ones(3))\n"
            "    except ImportError as e:\n        print(e)\n")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=env, timeout=120, check=True).stdout.splitlines()
    assert [line.split(":")[0] for line in out] == ["jacobian_of", "hessian_of", "plan_of"], out
    assert all(line.split(": ", 1)[1].startswith("tracing needs torch") for line in out), out


def test_a_plans_refill_names_the_method_called():
    torch = pytest.importorskip("torch")
    from sparsejac import JacobianTooLargeError, ShapeError

    x = torch.ones(4, dtype=torch.float64)
    plan = sparsejac.plan_of(torch.tanh, x)
    with pytest.raises(ShapeError, match="^ProgramPlan.jacobian: plan traced for"):
        plan.jacobian(torch.ones(5, dtype=torch.float64))
    hess = sparsejac.plan_of(lambda x: (x ** 3).sum(), x, order=2)
    with pytest.raises(JacobianTooLargeError, match="^ProgramPlan.hessian: "):
        hess.hessian(x, memory_limit=1)

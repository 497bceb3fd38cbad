"""The format registry: one object per format (layout, index width, bytes, writer, container,
conversion from CSR), one linearisation helper, and one place to add a format."""

from __future__ import annotations

import os
import re

import numpy as np
import pytest
import scipy.sparse

import sparsejac
from sparsejac import formats
from sparsejac.formats import COO, CSC, CSR, REGISTRY, Format

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CASES = [("ij,jk->ik", [(3, 4), (4, 5)], 0), ("ii->i", [(6, 6)], 0), ("ij->", [(3, 4)], 0),
         ("bij,bjk->bik", [(2, 3, 4), (2, 4, 2)], 1), ("i,j->ij", [(3,), (5,)], 1)]


def array_bytes(J) -> int:
    if isinstance(J, scipy.sparse.sparray):
        return J.data.nbytes + J.indices.nbytes + J.indptr.nbytes
    if type(J).__module__.startswith("torch"):
        import torch

        if J.layout == torch.sparse_csr:
            parts = (J.values(), J.crow_indices(), J.col_indices())
        else:
            parts = (J._values(), J._indices())
        return sum(t.numel() * t.element_size() for t in parts)
    return J.coords.nbytes + J.data.nbytes


def test_registry_holds_one_object_per_format():
    assert formats.FORMATS == ("coo", "csr", "csc", "torch", "torch_csr")
    for name, fmt in REGISTRY.items():
        assert isinstance(fmt, Format) and fmt.name == name
        assert fmt.layout in (COO, CSR, CSC)
        assert formats.get(name, require=False) is fmt
        assert formats.get(fmt) is fmt
    assert REGISTRY["torch"].index_bytes == 8 and REGISTRY["coo"].index_bytes == 0
    assert not REGISTRY["csr"].float16 and REGISTRY["coo"].float16
    assert REGISTRY["csc"].value_dtype(np.float16) == np.float32
    with pytest.raises(sparsejac.ArgumentError, match=r"format='dense' is not one of"):
        formats.get("dense", "here: ")


@pytest.mark.parametrize("name", formats.FORMATS)
@pytest.mark.parametrize("subscripts, shapes, wrt", CASES)
def test_predicted_bytes_are_the_arrays_built(name, subscripts, shapes, wrt):
    if REGISTRY[name].package == "torch":
        pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    operands = [rng.standard_normal(s) for s in shapes]
    for dtype in (np.float64, np.float32):
        arrays = [a.astype(dtype) for a in operands]
        J = sparsejac.jacobian(subscripts, *arrays, wrt=wrt, format=name)
        assert array_bytes(J) == sparsejac.plan(subscripts, *shapes, wrt=wrt).nbytes(name, dtype)


@pytest.mark.parametrize("name", formats.FORMATS)
@pytest.mark.parametrize("subscripts, shapes, wrt", CASES)
def test_conversion_from_csr_agrees_with_the_writer(name, subscripts, shapes, wrt):
    fmt = REGISTRY[name]
    if fmt.package == "torch":
        pytest.importorskip("torch")
    rng = np.random.default_rng(1)
    operands = [rng.standard_normal(s) for s in shapes]
    csr = sparsejac.jacobian(subscripts, *operands, wrt=wrt, format="csr")
    p = sparsejac.plan(subscripts, *shapes, wrt=wrt)
    out, inp = p.shape[:p.out_ndim], p.shape[p.out_ndim:]
    converted = fmt.from_csr(csr, out, inp)
    direct = sparsejac.jacobian(subscripts, *operands, wrt=wrt, format=name)
    assert array_bytes(converted) == array_bytes(direct)
    a, b = sparsejac.to_scipy(converted), sparsejac.to_scipy(direct)
    np.testing.assert_array_equal(a.indptr, b.indptr)
    np.testing.assert_array_equal(a.indices, b.indices)
    np.testing.assert_array_equal(a.data, b.data)
    extra, final = fmt.from_csr_nbytes(csr.nnz, out, inp, 8, array_bytes(csr))
    assert final == array_bytes(converted) and extra >= 0


def test_linearisation_round_trips():
    rng = np.random.default_rng(2)
    shape = (3, 1, 4, 5)
    flat = np.sort(rng.choice(60, size=25, replace=False))
    coords = np.empty((4, 25), dtype=np.int32)
    formats.unravel_into(flat, shape, coords)
    np.testing.assert_array_equal(coords, np.array(np.unravel_index(flat, shape)))
    np.testing.assert_array_equal(formats.flat_index(coords, shape), flat)
    for split in range(5):
        indices, indptr = formats.coords_to_csr(coords, shape, split)
        back = formats.csr_to_coords(indptr, indices, shape[:split], shape[split:], np.int64)
        np.testing.assert_array_equal(back, coords)
    assert formats.flat_index(np.zeros((0, 3), dtype=np.int64), ()).tolist() == [0, 0, 0]


def test_adding_a_format_is_one_registry_entry(monkeypatch):
    """A new format (here COO with int64 coordinates always) works everywhere at once: the
    check, the writer, the bytes, the conversion, to_scipy."""
    wide = Format("coo64", COO, REGISTRY["coo"].wrap, "sparse", index_bytes=8)
    monkeypatch.setitem(REGISTRY, "coo64", wide)
    x, w = np.ones((3, 4)), np.arange(20.0).reshape(4, 5)
    J = sparsejac.jacobian("ij,jk->ik", x, w, format="coo64")
    assert J.coords.dtype == np.int64
    p = sparsejac.plan("ij,jk->ik", (3, 4), (4, 5))
    assert p.nbytes("coo64") == J.coords.nbytes + J.data.nbytes
    assert (sparsejac.to_scipy(J) != sparsejac.jacobian("ij,jk->ik", x, w, format="csr")).nnz == 0
    assert p.jacobian(x, w, format="coo64", method="embed").coords.dtype == np.int64


def test_format_names_are_switched_on_in_the_registry_only():
    """No module of the einsum side spells a torch format's name or compares a format string:
    they ask the registry."""
    offenders = []
    for name in sorted(os.listdir(os.path.join(ROOT, "sparsejac"))):
        if not name.endswith(".py") or name == "formats.py":
            continue
        text = open(os.path.join(ROOT, "sparsejac", name)).read()
        for pattern in (r"\bfmt ==", r"(?<![.\w])format ==", r'\bfmt in \("', r'== "torch'):
            if re.search(pattern, text):
                offenders.append(f"{name}: {pattern}")
    assert offenders == []


def test_no_two_public_names_for_different_things():
    import sparsejac.grammar as grammar
    import sparsejac.programs as programs

    assert not hasattr(grammar, "Term")  # terms.Term is the programs' term; this is a Subscript
    assert hasattr(grammar, "Subscript")
    pytest.importorskip("dask")
    import sparsejac.dask
    import sparsejac.store

    assert sparsejac.store.MANIFEST == "sparsejac-chunks.json"
    assert not hasattr(sparsejac.dask, "METADATA") and not hasattr(sparsejac.store, "METADATA")
    assert hasattr(programs, "METADATA") or True  # the programs' name stays theirs


def test_grammar_spells_an_implicit_output_as_an_explicit_one():
    from sparsejac.grammar import parse

    assert parse("ba,Ab", 2).output == parse("ba,Ab->Aa", 2).output
    assert str(parse("...b,b", 2).output) == "..."

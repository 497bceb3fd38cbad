"""spy: a PNG of the pattern, rendered with Agg, of the right size and not blank."""

from __future__ import annotations

import sys

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pytest
from PIL import Image

import sparsejac


def render(J, tmp_path, **kwargs):
    fig, ax = plt.subplots(figsize=(4, 3), dpi=100)
    sparsejac.spy(J, ax=ax, **kwargs)
    path = tmp_path / "spy.png"
    fig.savefig(path)
    plt.close(fig)
    return np.asarray(Image.open(path).convert("L")), ax


@pytest.mark.parametrize("fmt", ["coo", "csr", "csc", "torch", "torch_csr"])
def test_spy_renders_every_format(fmt, tmp_path):
    J = sparsejac.jacobian("ij,jk->ik", np.ones((6, 4)), np.ones((4, 5)), format=fmt)
    pixels, ax = render(J, tmp_path, out_shape=(6, 5))
    assert pixels.shape == (300, 400)
    assert pixels.min() < 50 and pixels.max() > 200  # dark entries on a light background
    assert "nnz 120" in ax.get_title()
    assert "(6, 5)" in ax.get_ylabel()


def test_spy_shows_the_pattern_exactly_when_small():
    J = sparsejac.jacobian("ij,jk->ik", np.ones((3, 2)), np.ones((2, 4)), format="csr")
    ax = sparsejac.spy(J)
    image = ax.get_images()[0].get_array()
    np.testing.assert_array_equal(np.asarray(image) > 0, J.toarray() != 0)
    plt.close(ax.figure)


def test_spy_bins_large_patterns_into_density():
    x, w = np.ones((256, 256), np.float32), np.ones((256, 256), np.float32)
    J = sparsejac.jacobian("ij,jk->ik", x, w, format="csr")  # 65536 x 65536, density 1/256
    ax = sparsejac.spy(J, max_pixels=64)
    density = np.asarray(ax.get_images()[0].get_array())
    assert density.shape == (64, 64)
    # Block-diagonal in i: each pixel row covers 4 values of i, so the diagonal pixels hold
    # 4 blocks of 256 x 256 out of 1024 x 1024 cells.
    np.testing.assert_allclose(np.diag(density), 4 * 256 * 256 / (1024 * 1024))
    assert density[0, 1] == 0
    assert "binned to 64 x 64" in ax.get_title()
    plt.close(ax.figure)


def test_spy_rejects_dense_and_bad_split():
    with pytest.raises(sparsejac.ArgumentTypeError, match="expected a sparse.COO"):
        sparsejac.spy(np.ones((3, 3)))
    J = sparsejac.jacobian("ij,jk->ik", np.ones((3, 2)), np.ones((2, 4)))
    with pytest.raises(sparsejac.ArgumentError, match="out_shape"):
        sparsejac.spy(J, out_shape=(4, 3))
    with pytest.raises(sparsejac.ArgumentError, match="max_pixels"):
        sparsejac.spy(J, max_pixels=0)


def test_spy_density_is_a_fraction_with_uneven_bins():
    """600 columns into 512 pixels: some pixels hold 2 columns, some 1; a full block is 1."""
    J = sparsejac.jacobian("ij,jk->ik", np.ones((30, 20)), np.ones((20, 10)), format="csr")
    ax = sparsejac.spy(J, max_pixels=512)
    density = np.asarray(ax.get_images()[0].get_array())
    assert density.shape == (300, 512)
    assert density.max() == 1.0 and density.min() == 0.0
    # Every stored entry is counted once.
    cells_r = np.diff(-(-np.arange(301) * 300 // 300))
    cells_c = np.diff(-(-np.arange(513) * 600 // 512))
    assert cells_c.sum() == 600
    assert round(float((density * np.outer(cells_r, cells_c)).sum())) == J.nnz
    plt.close(ax.figure)


@pytest.mark.parametrize("fmt", ["coo", "csr", "csc", "torch", "torch_csr"])
def test_spy_in_small_chunks_draws_the_same(fmt, monkeypatch):
    spy_module = sys.modules["sparsejac.spy"]  # (sparsejac.spy is the function)

    J = sparsejac.jacobian("bij,bjk->bik", np.ones((2, 3, 4)), np.ones((2, 4, 5)), format=fmt)
    whole = np.asarray(sparsejac.spy(J, max_pixels=16, out_shape=(2, 3, 5)).get_images()[0].get_array())
    monkeypatch.setattr(spy_module, "_CHUNK", 7)
    pieces = np.asarray(sparsejac.spy(J, max_pixels=16, out_shape=(2, 3, 5)).get_images()[0].get_array())
    np.testing.assert_array_equal(whole, pieces)
    assert whole.sum() > 0
    plt.close("all")

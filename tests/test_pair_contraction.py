"""The pairwise contraction of Jacobian factors (terms.matmul_pair) against torch.einsum."""

import torch
from hypothesis import given, settings, strategies as st

from sparsejac.programs import terms as T


@st.composite
def pairs(draw):
    labels = list(range(draw(st.integers(1, 6))))
    size = {l: draw(st.integers(1, 4)) for l in labels}
    la = draw(st.lists(st.sampled_from(labels), unique=True, max_size=4))
    lb = draw(st.lists(st.sampled_from(labels), unique=True, max_size=4))
    present = list(dict.fromkeys(la + lb))
    keep = draw(st.permutations(present).flatmap(
        lambda p: st.integers(0, len(p)).map(lambda k: list(p[:k]))))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    a = torch.randn([size[l] for l in la], dtype=torch.float64, generator=gen)
    b = torch.randn([size[l] for l in lb], dtype=torch.float64, generator=gen)
    return a, la, b, lb, keep


@settings(max_examples=300, deadline=None)
@given(pairs())
def test_pair_equals_einsum_and_is_contiguous(case):
    a, la, b, lb, keep = case
    got = T.matmul_pair(a, la, b, lb, keep)
    want = torch.einsum(a, la, b, lb, keep)
    if got is None:
        # torch.einsum's turn: keep is empty or ends in a shared label, or torch.matmul would
        # copy an operand expanded over a batch it lacks (see matmul_pair)
        # (labels of size 1 are dropped first: they set no layout)
        sizes = {**dict(zip(la, a.shape)), **dict(zip(lb, b.shape))}
        la, lb = [l for l in la if sizes[l] > 1], [l for l in lb if sizes[l] > 1]
        keep = [l for l in keep if sizes[l] > 1]
        if not keep or (keep[-1] in la and keep[-1] in lb):
            return
        # keep = P + M + N (N: the trailing run of one operand's own labels, M: the run of the
        # other's before it); torch.matmul broadcasts only over a P label one operand lacks
        own = (lambda l: l in la and l not in lb) if keep[-1] in la else (
            lambda l: l in lb and l not in la)
        other = (lambda l: l in lb and l not in la) if keep[-1] in la else (
            lambda l: l in la and l not in lb)
        n = len(keep)
        while n and own(keep[n - 1]):
            n -= 1
        m = n
        while m and other(keep[m - 1]):
            m -= 1
        P = keep[:m]
        # torch.matmul folds P into one batch axis: a copy where one operand lacks a P label
        # (broadcast) or holds its P labels other than outermost and in P's order (layout)
        assert any((l in la) != (l in lb) for l in P) or any(
            lt[:len(own)] != own for lt in (la, lb) for own in [[l for l in P if l in lt]])
        return
    assert got.shape == want.shape
    assert got.is_contiguous()
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_mlp_layer_shape_is_a_matmul_in_row_major_order():
    # a tanh MLP's factor (b, h, i) times the next weight (h, o), kept as (b, o, i)
    a, w = torch.randn(3, 5, 4, dtype=torch.float64), torch.randn(5, 6, dtype=torch.float64)
    got = T.matmul_pair(a, [0, 1, 2], w, [1, 3], [0, 3, 2])
    assert got is not None and got.is_contiguous()
    torch.testing.assert_close(got, torch.einsum("bhi,ho->boi", a, w))

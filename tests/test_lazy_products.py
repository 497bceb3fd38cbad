"""Unformed products (terms.Product): a chain of layers that widens and narrows again
(a transformer's feed-forward block) is contracted at once in the cheapest order, never forming
the widened factor. Checked three ways: the greedy contraction against torch.einsum, a memory
limit that only the chain fits under, and the model tests rerun with every spreading product
kept unformed (``LAZY_SPREAD = 0``) against jacrev and torch.func.hessian."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings, strategies as st

import sparsejac
from sparsejac.errors import JacobianTooLargeError
from sparsejac.programs import terms as T
from sparsejac.programs.terms import factors

import test_hessians as H
import test_models as M
import test_programs as P

D = torch.float64


@st.composite
def chains(draw):
    """2 to 5 operands over up to 7 labels, some summed, some kept, in any order."""
    labels = list(range(draw(st.integers(1, 7))))
    size = {l: draw(st.integers(1, 4)) for l in labels}
    n = draw(st.integers(2, 5))
    ops = [draw(st.lists(st.sampled_from(labels), unique=True, max_size=4)) for _ in range(n)]
    present = list(dict.fromkeys(l for ls in ops for l in ls))
    out = draw(st.permutations(present).flatmap(
        lambda p: st.integers(0, len(p)).map(lambda k: list(p[:k]))))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    tensors = [torch.randn([size[l] for l in ls], dtype=D, generator=gen) for ls in ops]
    return list(zip(tensors, ops)), out


@settings(max_examples=200, deadline=None)
@given(chains())
def test_greedy_contraction_equals_einsum(case):
    ops, out = case
    got = T.contract(ops, out, T.Labels())
    want = torch.einsum(*[x for t, ls in ops for x in (t, ls)], out)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def _feed_forward(b=2, t=8, d=8, ff=256):
    """relu between two linear layers, on a tensor mixed across its tokens (its Jacobian w.r.t.
    the input is dense in the tokens per sample: the widened factor is ``ff`` times it)."""
    g = torch.Generator().manual_seed(3)
    lin1 = torch.nn.Linear(d, ff).to(D)
    lin2 = torch.nn.Linear(ff, d).to(D)
    with torch.no_grad():
        for p in (*lin1.parameters(), *lin2.parameters()):
            p.copy_(torch.randn(p.shape, dtype=D, generator=g))
    net = torch.nn.Sequential(lin1, torch.nn.ReLU(), lin2)
    mix = torch.randn(t, t, dtype=D, generator=g)
    fn = lambda x: net(torch.tanh(mix @ x))  # noqa: E731
    return fn, torch.randn(b, t, d, dtype=D, generator=g), b * t * ff * t * d * 8


def test_a_widening_chain_fits_where_its_widened_factor_would_not(monkeypatch):
    fn, x, widened = _feed_forward()
    limit = widened // 2
    J = sparsejac.jacobian_of(fn, x, format="csr", memory_limit=limit)
    ref = torch.func.jacrev(fn)(x).reshape(J.shape)
    torch.testing.assert_close(torch.from_numpy(J.toarray()), ref, rtol=1e-10, atol=1e-12)
    # formed at once (the order before unformed products), the chain needs the widened factor
    monkeypatch.setattr(factors, "LAZY_SPREAD", float("inf"))
    with pytest.raises(JacobianTooLargeError, match=r"\(2, 8, 256, 8, 8\)|\(2, 8, 8, 8, 256\)"):
        sparsejac.jacobian_of(fn, x, format="csr", memory_limit=limit)


def test_a_plan_refills_through_an_unformed_chain():
    fn, x, _ = _feed_forward()
    plan = sparsejac.plan_of(fn, x)
    y = torch.randn(x.shape, dtype=D, generator=torch.Generator().manual_seed(9))
    got = plan.jacobian(y, format="csr")
    ref = torch.func.jacrev(fn)(y).reshape(got.shape)
    torch.testing.assert_close(torch.from_numpy(got.toarray()), ref, rtol=1e-10, atol=1e-12)


@pytest.fixture
def always_unformed(monkeypatch):
    """Every product that spreads its parts at all is kept unformed until read."""
    monkeypatch.setattr(factors, "LAZY_SPREAD", 0)


MODEL_TESTS = [
    M.test_transformer_encoder_layer,
    M.test_transformer_encoder_layer_seq_first_with_padding_mask,
    M.test_multihead_attention_masks_no_weights,
    M.test_embedding_table_as_argument,
    M.test_functional_call_mlp_wrt_parameters_and_input,
    M.test_functional_call_attention_wrt_parameters,
    M.test_pytree_arguments_wrt_both,
    P.test_mlp_wrt_input_is_block_diagonal_over_the_batch,
    P.test_mlp_wrt_weights_and_bias,
    P.test_convolution_over_unfolded_patches,
    P.test_self_attention_wrt_input,
    P.test_batched_attention_is_block_diagonal,
    P.test_gated_unit,
    P.test_deep_relu_stack,
    P.test_transformer_block_with_layer_norm_like_ops,
    P.test_torch_formats_equal_coo,
    P.test_guard_counts_the_live_factors_beside_the_result,
    H.test_squared_norm_of_a_tanh_mlp_wrt_its_batch_input_is_block_diagonal,
    H.test_squared_norm_wrt_a_weight,
    H.test_einsum_energy,
    H.test_layer_normalised_network,
    H.test_both_arguments_give_the_nested_blocks_of_torch,
    H.test_a_small_cnn_wrt_its_input_and_a_conv_weight_jointly,
]


@pytest.mark.parametrize("test", MODEL_TESTS, ids=lambda f: f"{f.__module__}.{f.__name__}")
def test_models_with_every_spreading_product_unformed(always_unformed, test):
    test()


def test_random_programs_with_every_spreading_product_unformed(always_unformed):
    P.test_random_programs()


def test_random_scalar_programs_hessians_with_every_spreading_product_unformed(always_unformed):
    H.test_random_scalar_programs()


def test_a_sum_whose_first_scaled_summand_broadcasts(always_unformed):
    """Regression (drawn by the test above): in a merge, the first summand a product of a
    factor and a scale that together cover only part of the sum's shape."""
    x = P.rand(2, seed=0)
    P.check(lambda x: P.run_program([(1, 0), (14, 1), (20, 0)], x), x, exact_nnz=False)

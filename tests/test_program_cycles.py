"""A trace's state (tracer, labels, index tables, factors) is freed by reference counting
alone: with the cyclic collector off, plan refills (first and second order, every format)
and one-shot calls leave nothing of sparsejac's in reference cycles, and the bytes of live
torch storages stay flat from one refill to the next."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
import torch.nn.functional as F

import sparsejac
from sparsejac.programs import collect

D = torch.float64
FORMATS = ["coo", "csr", "csc", "torch", "torch_csr"]


def rand(*shape, seed=0):
    return torch.randn(*shape, dtype=D, generator=torch.Generator().manual_seed(seed))


W = rand(6, 6, seed=1)


def layers(x):  # matmuls, scales, slices (index maps), padding
    h = torch.tanh(torch.tanh(x @ W) @ W)
    return F.pad(h[:, 1:] - h[:, :-1], (1, 0))


def attention(x):
    s = torch.softmax(x @ x.transpose(-1, -2) / 2.0, dim=-1)
    return (s @ x)[1:]


def energy(x):  # curvature in several steps, a neighbour coupling, a linear tail
    return (torch.tanh(x @ W) ** 2).sum() + (x[1:] * x[:-1]).sum() + 3.0 * x.sum()


@pytest.fixture
def tracers(monkeypatch):
    """Weak references to every tracer made (and its labels), in order."""
    made: list[tuple[weakref.ref, weakref.ref]] = []
    real = collect.make_tracer

    def spy(labels, dtype):
        tracer = real(labels, dtype)
        made.append((weakref.ref(tracer), weakref.ref(labels)))
        return tracer

    monkeypatch.setattr(collect, "make_tracer", spy)
    return made


class NoCollector:
    """The cyclic collector off, and what it would have freed kept in ``gc.garbage``."""

    def __enter__(self):
        gc.collect()
        self.was = gc.isenabled()
        gc.disable()
        gc.set_debug(gc.DEBUG_SAVEALL)
        return self

    def cyclic(self) -> list:
        """sparsejac's objects and torch tensors that only the collector would free."""
        gc.collect()
        found = [o for o in gc.garbage if issubclass(type(o), torch.Tensor)
                 or type(o).__module__.startswith("sparsejac")]
        gc.garbage.clear()
        return found

    def __exit__(self, *exc):
        gc.set_debug(0)
        gc.garbage.clear()
        if self.was:
            gc.enable()


def live_storage_bytes() -> int:
    """Bytes of the distinct storages of the torch tensors alive now (tensors are tracked by
    the collector, so ``gc.get_objects`` lists them, cyclic garbage included)."""
    seen = {}
    for o in gc.get_objects():
        if issubclass(type(o), torch.Tensor) and o.device.type == "cpu" and not o.is_sparse \
                and o.layout == torch.strided:
            s = o.untyped_storage()
            seen[s.data_ptr()] = s.nbytes()
    return sum(seen.values())


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("fn,shape,order", [(layers, (5, 6), 1), (attention, (2, 4, 3), 1),
                                            (energy, (5, 6), 2)])
def test_refills_free_their_trace_without_the_collector(tracers, fn, shape, order, fmt):
    x = rand(*shape)
    plan = sparsejac.plan_of(fn, x, order=order)
    plan.jacobian(x, format=fmt)  # the format's pattern made and kept
    with NoCollector() as nc:
        before = len(tracers)
        sizes = []
        for i in range(4):
            plan.jacobian(rand(*shape, seed=i + 2), format=fmt)
            sizes.append(live_storage_bytes())
        refills = tracers[before:]
        assert len(refills) >= 4
        dead = [(t() is None, l() is None) for t, l in refills]
        cyclic = nc.cyclic()
    assert dead == [(True, True)] * len(refills)
    assert cyclic == []
    # nothing a refill allocates outlives it: the bytes held are those of the first refill
    assert sizes[1:] == sizes[:1] * (len(sizes) - 1)


@pytest.mark.parametrize("call,fn,shape", [(sparsejac.jacobian_of, layers, (5, 6)),
                                           (sparsejac.jacobian_of, attention, (2, 4, 3)),
                                           (sparsejac.hessian_of, energy, (5, 6)),
                                           (sparsejac.plan_of, layers, (5, 6))])
def test_single_calls_leave_no_cycles(tracers, call, fn, shape):
    x = rand(*shape)
    call(fn, x)  # warm: registries, caches
    with NoCollector() as nc:
        before = len(tracers)
        result = call(fn, x)
        dead = [(t() is None, l() is None) for t, l in tracers[before:]]
        cyclic = nc.cyclic()
    assert result is not None
    # a plan keeps its last trace's labels (its shadow terms refer to them), not its tracer;
    # a plan that resolves mode="auto" to forward traces once more in that order, and the
    # first trace goes entirely
    kept_labels = call is sparsejac.plan_of
    assert dead and dead[-1] == (True, not kept_labels)
    assert dead[:-1] == [(True, True)] * (len(dead) - 1)
    assert cyclic == []


def test_a_refused_trace_leaves_no_cycles(tracers):
    x = rand(5, 6)
    with NoCollector() as nc:
        with pytest.raises(sparsejac.JacobianTooLargeError):
            sparsejac.jacobian_of(layers, x, memory_limit=64)
        dead = [(t() is None, l() is None) for t, l in tracers]
        cyclic = nc.cyclic()
    assert dead == [(True, True)] * len(dead) and dead
    assert cyclic == []

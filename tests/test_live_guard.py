"""The guard of jacobian_of keeps its word: live tensors never exceed ``memory_limit`` before
a refusal (measured by the profiler's CPU allocation events), refusals never quote a negative
headroom, the running count behind the guard equals a full walk, a check visits no storage,
and the default limit (the process's headroom: rlimits and cgroups too) refuses in a process
under ``RLIMIT_AS`` instead of failing in the allocator.

The models are small hand-made blocks like those the guard failed on: a PoolFormer block
(pooling token mixer and an MLP, each after a GroupNorm) and an EfficientNet block
(depthwise convolution, squeeze-excite, SiLU)."""

from __future__ import annotations

import os
import random
import re
import subprocess
import sys
import textwrap

import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional

import sparsejac  # noqa: E402
from sparsejac import JacobianTooLargeError, options  # noqa: E402
from sparsejac.programs import terms as T  # noqa: E402


def poolformer(c: int = 8, h: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64) * 0.3  # noqa: E731
    stem, w1, w2 = r(c, 3, 3, 3), r(4 * c, c, 1, 1), r(c, 4 * c, 1, 1)

    def fn(x):
        x = F.conv2d(x, stem, padding=1)
        y = F.group_norm(x, 1)
        x = x + (F.avg_pool2d(y, 3, 1, 1, count_include_pad=False) - y)
        y = F.group_norm(x, 1)
        return x + F.conv2d(F.gelu(F.conv2d(y, w1)), w2)

    return fn, r(1, 3, h, h)


def efficientnet(c: int = 8, h: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64) * 0.3  # noqa: E731
    stem, dw, se1, se2, pw = (r(c, 3, 3, 3), r(c, 1, 3, 3), r(c // 2, c, 1, 1),
                              r(c, c // 2, 1, 1), r(c, c, 1, 1))

    def fn(x):
        x = F.silu(F.conv2d(x, stem, padding=1))
        y = F.silu(F.conv2d(x, dw, padding=1, groups=c))
        s = torch.sigmoid(F.conv2d(F.silu(F.conv2d(F.adaptive_avg_pool2d(y, 1), se1)), se2))
        return x + F.conv2d(y * s, pw)

    return fn, r(1, 3, h, h)


NEGATIVE = r"(^|[\s(])-\d"  # a negative number of bytes (not an exponent: 7.45e-08)

MODELS = {"poolformer": poolformer, "efficientnet": efficientnet}


def torch_peak(call) -> tuple[int, object]:
    """``(peak, outcome)``: the most bytes torch's CPU allocator held at once during
    ``call()`` above its level before (the profiler's allocation and free events, in time
    order), and what ``call`` returned or raised."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        try:
            outcome = call()
        except JacobianTooLargeError as error:
            outcome = error
    cpu = torch.autograd.DeviceType.CPU
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]" and e.device_type() == cpu)
    level = peak = 0
    for _, n in events:
        level += n
        peak = max(peak, level)
    return peak, outcome


@pytest.mark.parametrize("name", sorted(MODELS))
def test_live_tensors_never_exceed_the_limit_before_a_refusal(name):
    fn, x = MODELS[name]()
    for mode in ("forward", "auto"):
        full, J = torch_peak(lambda: sparsejac.jacobian_of(fn, x, format="csr", mode=mode))
        dense = torch.func.jacrev(fn)(x).reshape(J.shape)
        assert abs(J.toarray() - dense.numpy()).max() <= 1e-12 * max(1.0, float(dense.abs().max()))
        # (fractions at which the count once missed the gathers' copies and the new terms)
        for share in (0.5, 0.7, 0.9):
            limit = int(full * share)
            peak, outcome = torch_peak(
                lambda: sparsejac.jacobian_of(fn, x, memory_limit=limit, mode=mode))
            assert peak <= limit, (name, mode, share, peak, limit)
            if mode == "auto" and not isinstance(outcome, Exception):
                # the order auto chose did not fit, the trace's forward order did: a result
                # within the limit is what the fallback is for
                continue
            assert isinstance(outcome, JacobianTooLargeError), (name, mode, share)
            assert not re.search(NEGATIVE, str(outcome)), str(outcome)  # no negative headroom


def test_a_refusal_says_plainly_when_the_limit_is_used_up():
    labels = T.Labels(limit=1000, prefix="jacobian_of: 'mul': ")
    labels.live = lambda: 1500
    with pytest.raises(JacobianTooLargeError) as info:
        labels.guard((10,), 8)
    message = str(info.value)
    assert "1,500 bytes of live Jacobian factors, the program's own tensors" in message
    assert "already use all of the memory limit of 1,000 bytes" in message
    assert not re.search(NEGATIVE, message)
    labels.live = lambda: 900
    with pytest.raises(JacobianTooLargeError, match="needs about 160 bytes.* beside 900 bytes.*"
                                                    "limit of 1,000 bytes"):
        labels.guard((20,), 8)
    labels.guard((12,), 8)  # 900 + 96 fits


def random_program(rng: random.Random, steps: int, keep: list):
    """A chain of ``steps`` random operations, some results kept alive in ``keep`` (the
    program's own tensors), others dropped as it goes."""
    w = torch.randn(6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))

    def fn(x):
        alive = [x]
        for _ in range(steps):
            a = rng.choice(alive)
            op = rng.randrange(7)
            if op == 0:
                y = torch.tanh(a)
            elif op == 1:
                y = a @ w
            elif op == 2:
                y = a * rng.choice(alive)
            elif op == 3:
                y = torch.softmax(a, -1)
            elif op == 4:
                b = a.reshape(2, 12, 6)
                y = (b.sum(1, keepdim=True) + b).reshape(a.shape)
            elif op == 5:
                y = a[:, 1:].sum(-1, keepdim=True) * a
            else:
                y = a + rng.choice(alive).flip(0)
            alive.append(y)
            if rng.random() < 0.3:
                keep.append(y)
            if len(alive) > 4:
                alive.pop(rng.randrange(1, len(alive)))
        return sum(alive[1:], alive[0]) * 1.0

    return fn


@pytest.mark.parametrize("seed", range(6))
def test_the_running_count_equals_a_full_walk(seed, monkeypatch):
    """At every check and at the end: the ledger's running count, a walk over the traced
    tensors' terms and the tracked tensors, and the ledger's own recount agree."""
    seen = []
    guard = T.Labels.guard

    def checked(self, shape, itemsize, what="a Jacobian factor"):
        tracer = self.live.owner
        seen.append((tracer.live_bytes(), tracer.walked_bytes(), self.ledger.walk()))
        return guard(self, shape, itemsize, what)

    monkeypatch.setattr(T.Labels, "guard", checked)
    keep: list = []
    x = torch.randn(24, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    fn = random_program(random.Random(seed), 30, keep)
    J = sparsejac.jacobian_of(fn, x, format="csr")
    assert len(seen) > 30
    assert all(a == b == c for a, b, c in seen), [s for s in seen if len(set(s)) > 1][:3]
    assert any(a for a, _, _ in seen)
    dense = torch.func.jacrev(random_program(random.Random(seed), 30, []))(x)
    dense = dense.reshape(J.shape).numpy()
    assert abs(J.toarray() - dense).max() <= 1e-12 * max(1.0, abs(dense).max())


def test_a_check_visits_no_storage_however_many_are_alive(monkeypatch):
    """The guard's check reads a running count: it visits no storage, and the whole trace
    visits each tracked tensor a bounded number of times (tracked, dropped), so its work
    grows with the operations, not with their product with the live tensors."""
    per_check, totals = [], {}
    guard = T.Labels.guard

    def counted(self, shape, itemsize, what="a Jacobian factor"):
        before = self.ledger.visits
        self.live()
        per_check.append(self.ledger.visits - before)
        totals["labels"] = self
        return guard(self, shape, itemsize, what)

    monkeypatch.setattr(T.Labels, "guard", counted)
    w = torch.randn(16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    visits = {}
    for n in (25, 100):
        def fn(x, n=n):
            kept = [x]
            for _ in range(n):  # every intermediate stays alive: n live tensors and terms
                kept.append(torch.tanh(kept[-1] @ w))
            return kept[-1]

        per_check.clear()
        sparsejac.jacobian_of(fn, torch.randn(4, 16, dtype=torch.float64))
        assert per_check and not any(per_check)
        visits[n] = totals["labels"].ledger.visits
    # linear in the operations (a walk per check would be quadratic: 16 times for 4 times n)
    assert visits[100] <= 5 * visits[25]


def _write(path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_cgroup_headroom_v2_and_v1(tmp_path):
    """The least headroom of the process's cgroup and its ancestors; page cache counts as
    free; "max" and v1's huge "no limit" are no limit."""
    root = tmp_path / "cg"
    _write(tmp_path / "proc", "0::/a/b\n")
    _write(root / "a" / "b" / "memory.max", "max\n")
    _write(root / "a" / "b" / "memory.current", "100\n")
    _write(root / "a" / "memory.max", "5000\n")
    _write(root / "a" / "memory.current", "3000\n")
    _write(root / "a" / "memory.stat", "anon 2000\ninactive_file 500\n")
    head = options.Headroom(str(root), str(tmp_path / "proc"))
    assert head() == min(5000 - 3000 + 500, options.Headroom("/nonexistent", "/nonexistent")())
    _write(root / "a" / "memory.current", "4000\n")  # re-read as it runs
    assert head() <= 5000 - 4000 + 500
    v1 = tmp_path / "v1"
    _write(tmp_path / "proc1", "4:memory:/job\n1:cpu:/\n")
    _write(v1 / "memory" / "job" / "memory.limit_in_bytes", "9000\n")
    _write(v1 / "memory" / "job" / "memory.usage_in_bytes", "1000\n")
    _write(v1 / "memory" / "memory.limit_in_bytes", str(2**63 - 4096) + "\n")
    _write(v1 / "memory" / "memory.usage_in_bytes", "7\n")
    found = options.memory_cgroups(str(v1), str(tmp_path / "proc1"))
    assert [(limit - int(open(used).read()) + cache) for used, limit, cache in found] == [8000]
    assert options.memory_cgroups(str(v1), str(tmp_path / "none")) == []


CHILD = textwrap.dedent("""
    import resource, sys
    sys.path.insert(0, {tests!r})
    import torch, sparsejac
    from sparsejac import options
    from test_live_guard import poolformer
    fn, x = poolformer(16, 16)  # its trace needs more than 600 MB
    room = {room}
    import os
    size = int(open("/proc/self/statm").read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    resource.setrlimit(resource.RLIMIT_AS, (size + room, resource.RLIM_INFINITY))
    # the limit bounds the headroom (not the machine's free memory); the process may unmap a
    # few pages between reading its size above and the headroom being read (seen: one page
    # under a loaded machine), which the headroom then rightly includes
    assert options.available_memory() <= room + 64 * 4096, options.available_memory()
    try:
        sparsejac.jacobian_of(fn, x)
    except sparsejac.JacobianTooLargeError as error:
        print("refused:", error)
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_AS and /proc")
@pytest.mark.parametrize("room_mb", [150, 300])
def test_the_default_limit_refuses_under_an_address_space_limit(room_mb):
    """Under ``ulimit -v``: a JacobianTooLargeError and a clean exit, not the allocator's
    RuntimeError or MemoryError."""
    tests = os.path.dirname(os.path.abspath(__file__))
    code = CHILD.format(tests=tests, room=room_mb * 2**20)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [os.path.dirname(tests)] + os.environ.get("PYTHONPATH", "").split(os.pathsep)))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "refused: jacobian_of:" in done.stdout, (done.stdout, done.stderr[-2000:])

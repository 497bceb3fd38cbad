"""Sparse Jacobians of whole torch programs: sparsejac against torch.func.jacrev and a JAX peer.

    python benchmarks/bench_programs.py                      # every model
    python benchmarks/bench_programs.py --quick              # small sizes, a smoke test
    python benchmarks/bench_programs.py --models mlp,cnn     # some models
    python benchmarks/bench_programs.py --json out.json      # also the raw numbers
    python benchmarks/bench_programs.py --peer-timeout 60    # give up on the peer sooner

docs/benchmarks.md shows the table, the command and the machine it ran on, and how long it took.

Models (float32, CPU, inputs and weights from a seeded generator):

- ``mlp``: the batch-64 256-256-256 tanh MLP, w.r.t. the input;
- ``mlp_w``: the same MLP at batch 8, width 64, w.r.t. its first weight;
- ``attention``: single-head self-attention (batch 4, 32 tokens, width 64), w.r.t. the input;
- ``cnn``: conv 16 3x3 pad 1, relu, maxpool 2, conv 32 3x3 pad 1, relu, maxpool 2, flatten,
  linear 10, on batch 32 of 3x32x32 images, w.r.t. the input;
- ``transformer``: ``nn.TransformerEncoderLayer(64, 4, batch_first=True).eval()`` on batch 8 of
  32 tokens, w.r.t. the input.

Columns, each (model, method) in a fresh subprocess so that its peak memory is its own (the rise
of the resident size above the process's size before the call, benchmarks/measure.py), under a
timeout and a watchdog on its resident size:

- ``jacrev``: ``torch.func.jacrev`` (best of 3 after a warm-up; peak of the first call). Where its
  one vmapped backward would take the machine's memory it is rerun with ``chunk_size`` (noted);
  where the dense Jacobian alone exceeds 6 GB it is skipped.
- peer: ``asdex`` (JAX automatic sparse differentiation, the optional ``bench`` extra): set-up =
  sparsity detection + colouring + jit compilation of the coloured evaluation, in a fresh
  process; eval = the compiled evaluation on new values (best of 3 after a warm-up); peak of the
  whole. The models are written in JAX with the same weights.
- ``first``: ``sparsejac.jacobian_of(fn, x, format="csr")``, the first call in a fresh process.
- ``refill``: ``plan.jacobian(x_new, format="csr")`` of ``plan = sparsejac.plan_of(fn, x)``
  (best of 3 after a warm-up).
- ``floor``: the write floor of the result: allocating and filling, on every core in slabs (as
  sparsejac writes), arrays of the result's nnz and dtypes (values float32; indices and indptr
  as wide as the CSR's), best of 3.
- ``result``: the CSR's bytes; ``factor``: the largest dense factor the trace holds (read from
  the trace's terms; "n/a" where the library's internals do not expose it).

The project's targets are checked as ratios; a closing note gives the measured terms of the
cost (trace time, writing) where a target is missed.
"""

from __future__ import annotations

import datetime
import math
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
# Run from a checkout without installing: the package is next to this folder.
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

import harness  # noqa: E402
from harness import GB, MB, cell_mb, cell_time, error, ok, rss_limit, timed, why  # noqa: E402
from measure import peak_above, reset_peak  # noqa: E402

# name: (description, full sizes, quick sizes)
MODELS = {
    "mlp": ("tanh MLP 256-256-256, batch 64, wrt input", dict(b=64, n=256), dict(b=8, n=32)),
    "mlp_w": ("tanh MLP 64-64-64, batch 8, wrt first weight", dict(b=8, n=64), dict(b=4, n=16)),
    "attention": ("single-head attention, batch 4, 32 tokens, width 64, wrt input",
                  dict(b=4, t=32, d=64), dict(b=2, t=8, d=16)),
    "cnn": ("CNN conv16-pool-conv32-pool-linear10, batch 32 of 3x32x32, wrt input",
            dict(b=32, h=32), dict(b=2, h=8)),
    "transformer": ("TransformerEncoderLayer(64, 4), batch 8, 32 tokens, wrt input",
                    dict(b=8, t=32, d=64, heads=4, ff=2048),
                    dict(b=2, t=8, d=16, heads=4, ff=32)),
}

JACREV_DENSE_LIMIT = 6 * GB  # skip jacrev past this dense Jacobian
PEER_TIMEOUT = 180.0  # default seconds for a whole peer run (detection, colouring, compile, evals)

TARGETS = {  # name: (description, threshold, direction)
    "peer_eval/refill": ("refill >= 2x faster than peer's jitted eval", 2.0, ">="),
    "refill/floor": ("refill within 3x of the write floor", 3.0, "<="),
    "jacrev/first": ("first call >= 10x faster than jacrev", 10.0, ">="),
    "peer_setup/first": ("first call >= 20x faster than peer set-up", 20.0, ">="),
    "peak/(result+factor)": ("peak <= 1.5x (result bytes + largest factor)", 1.5, "<="),
}


# --------------------------------------------------------------------------- the models


def weights(model: str, s: dict) -> dict:
    """Every array of a model, numpy float32 from one seeded generator: ``arg`` is the
    differentiated argument, ``arg_new`` its new values for refills and evaluations."""
    rng = np.random.default_rng(0)

    def randn(*shape, scale=1.0):
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    if model in ("mlp", "mlp_w"):
        b, n = s["b"], s["n"]
        w = dict(x=randn(b, n), w1=randn(n, n, scale=n**-0.5), b1=randn(n),
                 w2=randn(n, n, scale=n**-0.5), b2=randn(n))
        if model == "mlp":
            w.update(arg=w["x"], arg_new=randn(b, n))
        else:
            w.update(arg=w["w1"], arg_new=randn(n, n, scale=n**-0.5))
        return w
    if model == "attention":
        b, t, d = s["b"], s["t"], s["d"]
        return dict(wq=randn(d, d, scale=d**-0.5), wk=randn(d, d, scale=d**-0.5),
                    wv=randn(d, d, scale=d**-0.5), arg=randn(b, t, d), arg_new=randn(b, t, d))
    if model == "cnn":
        b, h = s["b"], s["h"]
        flat = 32 * (h // 4) * (h // 4)
        return dict(c1w=randn(16, 3, 3, 3, scale=27**-0.5), c1b=randn(16, scale=0.1),
                    c2w=randn(32, 16, 3, 3, scale=144**-0.5), c2b=randn(32, scale=0.1),
                    fw=randn(10, flat, scale=flat**-0.5), fb=randn(10, scale=0.1),
                    arg=randn(b, 3, h, h), arg_new=randn(b, 3, h, h))
    if model == "transformer":
        b, t, d, ff = s["b"], s["t"], s["d"], s["ff"]
        return {
            "self_attn.in_proj_weight": randn(3 * d, d, scale=d**-0.5),
            "self_attn.in_proj_bias": randn(3 * d, scale=0.1),
            "self_attn.out_proj.weight": randn(d, d, scale=d**-0.5),
            "self_attn.out_proj.bias": randn(d, scale=0.1),
            "linear1.weight": randn(ff, d, scale=d**-0.5),
            "linear1.bias": randn(ff, scale=0.1),
            "linear2.weight": randn(d, ff, scale=ff**-0.5),
            "linear2.bias": randn(d, scale=0.1),
            "norm1.weight": 1 + randn(d, scale=0.1),
            "norm1.bias": randn(d, scale=0.1),
            "norm2.weight": 1 + randn(d, scale=0.1),
            "norm2.bias": randn(d, scale=0.1),
            "arg": randn(b, t, d),
            "arg_new": randn(b, t, d),
        }
    raise ValueError(model)


def dense_shape(model: str, s: dict) -> tuple[int, int]:
    """(rows, columns) of the Jacobian as a matrix."""
    if model == "mlp":
        return s["b"] * s["n"], s["b"] * s["n"]
    if model == "mlp_w":
        return s["b"] * s["n"], s["n"] * s["n"]
    if model == "cnn":
        return s["b"] * 10, s["b"] * 3 * s["h"] ** 2
    return (s["b"] * s["t"] * s["d"],) * 2


def dense_fn(model: str, w: dict, d: int | None, tanh, softmax, transpose):
    """The MLPs and the attention, for torch or JAX: ``w`` the weights, ``d`` the attention's
    width; ``tanh``, ``softmax`` (over the last axis) and ``transpose`` (of the last two axes)
    in that framework."""
    if model == "mlp":
        def fn(x):
            return tanh(tanh(x @ w["w1"] + w["b1"]) @ w["w2"] + w["b2"])
    elif model == "mlp_w":
        def fn(w1):
            return tanh(tanh(w["x"] @ w1 + w["b1"]) @ w["w2"] + w["b2"])
    else:
        def fn(x):
            q, k, v = x @ w["wq"], x @ w["wk"], x @ w["wv"]
            return softmax(q @ transpose(k) / math.sqrt(d)) @ v
    return fn


def torch_model(model: str, s: dict):
    """``(fn, arg, arg_new)`` in torch."""
    import torch
    from torch import nn

    w = {k: torch.from_numpy(v) for k, v in weights(model, s).items()}
    arg, arg_new = w["arg"], w["arg_new"]
    if model in ("mlp", "mlp_w", "attention"):
        fn = dense_fn(model, w, s.get("d"), torch.tanh, lambda a: torch.softmax(a, dim=-1),
                      lambda k: k.transpose(-2, -1))
    elif model == "cnn":
        net = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(w["fw"].shape[1], 10),
        ).eval()
        with torch.no_grad():
            for mod, wk, bk in ((net[0], "c1w", "c1b"), (net[3], "c2w", "c2b"), (net[7], "fw", "fb")):
                mod.weight.copy_(w[wk])
                mod.bias.copy_(w[bk])
        fn = net
    elif model == "transformer":
        layer = nn.TransformerEncoderLayer(s["d"], s["heads"], dim_feedforward=s["ff"],
                                           batch_first=True).eval()
        layer.load_state_dict({k: v for k, v in w.items() if "." in k})
        fn = layer
    else:
        raise ValueError(model)
    return fn, arg, arg_new


def jax_model(model: str, s: dict, pool: str = "reduce_window"):
    """``(f, arg, arg_new)`` in JAX: the same functions and weights. ``pool``: the CNN's max
    pooling by ``lax.reduce_window``, or (``"reshape"``) as a max over a reshaped array."""
    import jax
    import jax.numpy as jnp
    from jax import lax

    w = {k: jnp.asarray(v) for k, v in weights(model, s).items()}
    arg, arg_new = w["arg"], w["arg_new"]
    pool_by = pool
    if model in ("mlp", "mlp_w", "attention"):
        f = dense_fn(model, w, s.get("d"), jnp.tanh, lambda a: jax.nn.softmax(a, axis=-1),
                     lambda k: jnp.swapaxes(k, -1, -2))
    elif model == "cnn":
        def conv(x, k, b):
            y = lax.conv_general_dilated(x, k, (1, 1), ((1, 1), (1, 1)),
                                         dimension_numbers=("NCHW", "OIHW", "NCHW"))
            return y + b[None, :, None, None]

        def pool(x):
            if pool_by == "reshape":
                n, c, h, w_ = x.shape
                return x.reshape(n, c, h // 2, 2, w_ // 2, 2).max(axis=(3, 5))
            return lax.reduce_window(x, -jnp.inf, lax.max, (1, 1, 2, 2), (1, 1, 2, 2), "VALID")

        def f(x):
            y = pool(jax.nn.relu(conv(x, w["c1w"], w["c1b"])))
            y = pool(jax.nn.relu(conv(y, w["c2w"], w["c2b"])))
            return y.reshape(y.shape[0], -1) @ w["fw"].T + w["fb"]
    elif model == "transformer":
        heads, d = s["heads"], s["d"]
        dh = d // heads

        def norm(x, g, b):
            mu = x.mean(-1, keepdims=True)
            var = ((x - mu) ** 2).mean(-1, keepdims=True)
            return (x - mu) / jnp.sqrt(var + 1e-5) * g + b

        def f(x):
            B, T, _ = x.shape
            qkv = x @ w["self_attn.in_proj_weight"].T + w["self_attn.in_proj_bias"]
            q, k, v = (qkv[..., i * d:(i + 1) * d].reshape(B, T, heads, dh).transpose(0, 2, 1, 3)
                       for i in range(3))
            att = jax.nn.softmax(q @ jnp.swapaxes(k, -1, -2) / math.sqrt(dh), axis=-1) @ v
            att = att.transpose(0, 2, 1, 3).reshape(B, T, d)
            att = att @ w["self_attn.out_proj.weight"].T + w["self_attn.out_proj.bias"]
            h = norm(x + att, w["norm1.weight"], w["norm1.bias"])
            ff = jax.nn.relu(h @ w["linear1.weight"].T + w["linear1.bias"])
            ff = ff @ w["linear2.weight"].T + w["linear2.bias"]
            return norm(h + ff, w["norm2.weight"], w["norm2.bias"])
    else:
        raise ValueError(model)
    return f, arg, arg_new


# --------------------------------------------------------------------------- workers


def phase(name: str) -> None:
    """Tell the driver how far a worker got (reported where it is killed or times out)."""
    print(f"PHASE {name}", file=sys.stderr, flush=True)


def sparsejac_limit() -> int:
    """``memory_limit`` given to sparsejac: under the watchdog's, so that the library's own guard
    (its predicted peak) refuses before the watchdog kills."""
    return int(0.8 * rss_limit())


def work_jacrev(model: str, s: dict, chunk: int | None) -> dict:
    import torch

    fn, x, x_new = torch_model(model, s)
    jac = torch.func.jacrev(fn, chunk_size=chunk) if chunk else torch.func.jacrev(fn)
    phase("jacrev" + (f" chunk_size={chunk}" if chunk else ""))
    base = reset_peak()
    t0 = time.perf_counter()
    J = jac(x)  # warm-up, and the memory peak of a first call
    cold = time.perf_counter() - t0
    peak = peak_above(base)
    del J
    best, n = timed(lambda: jac(x_new))
    return dict(time=best, runs=n, cold=cold, peak=peak, chunk=chunk)


def work_first(model: str, s: dict) -> dict:
    import sparsejac

    fn, x, _ = torch_model(model, s)
    try:
        base = reset_peak()
        t0 = time.perf_counter()
        phase("jacobian_of first call")
        J = sparsejac.jacobian_of(fn, x, format="csr", memory_limit=sparsejac_limit())
        first = time.perf_counter() - t0
        peak = peak_above(base)
    except Exception as e:  # noqa: BLE001 - reported in the table
        return error(e)
    out = dict(time=first, peak=peak, nnz=int(J.nnz), shape=list(J.shape),
               result_bytes=int(J.data.nbytes + J.indices.nbytes + J.indptr.nbytes),
               index_dtype=str(J.indices.dtype))
    del J
    base = reset_peak()
    t0 = time.perf_counter()
    J = sparsejac.jacobian_of(fn, x, format="csr", memory_limit=sparsejac_limit())
    out["second"] = time.perf_counter() - t0
    out["second_peak"] = peak_above(base)
    return out


def _floor(nnz: int, nrows: int, idx: np.dtype):
    """Allocate and fill a CSR's arrays of these sizes, as sparsejac writes (slabs, every core)."""
    try:
        from sparsejac.backend import NUMPY

        def fill(a, value):
            NUMPY.copy_into(a, np.asarray(value, a.dtype))
    except Exception:  # noqa: BLE001 - the library's internals moved: plain numpy
        def fill(a, value):
            np.copyto(a, np.asarray(value, a.dtype))

    def run():
        data, indices, indptr = (np.empty(nnz, np.float32), np.empty(nnz, idx),
                                 np.empty(nrows + 1, idx))
        fill(data, 1.0)
        fill(indices, 1)
        fill(indptr, 1)
        return data, indices, indptr

    return run


def _factors(fn, x) -> dict:
    """The dense factors of a trace of ``fn``: the largest one recorded, and the most bytes of
    factors live at once (the tracer's ``live_bytes`` after each step, where it has one). Reads
    the library's internals (the tracer's ``record``, wrapped here for one trace): None where
    they moved."""
    try:
        from sparsejac.programs import collect
        from sparsejac.programs import tracer as tracing

        stats = {"largest": 0, "live": None}
        original = tracing.Tracer.record

        def record(self, tensor, terms):
            original(self, tensor, terms)
            for ts in (terms or {}).values():
                for t in ts:
                    # what the term holds: an unformed product's parts, not the product
                    held = t.held() if hasattr(t, "held") else [t.factor]
                    for f in held:
                        n = min(f.untyped_storage().nbytes(), f.numel() * f.element_size())
                        stats["largest"] = max(stats["largest"], n)
            if hasattr(self, "live_bytes"):
                stats["live"] = max(stats["live"] or 0, self.live_bytes())

        tracing.Tracer.record = record
        try:
            traced = collect.trace(fn, (x,), 0, sparsejac_limit())
        finally:
            tracing.Tracer.record = original
        del traced
        return dict(largest_factor=stats["largest"], factors_held=stats["live"])
    except Exception as e:  # noqa: BLE001
        return dict(largest_factor=None, factors_held=None, factor_error=repr(e)[:200])


def _check(J, fn, x_new, rows: int = 48) -> float | None:
    """Relative max error of ``J`` (CSR, at ``x_new``) on ``rows`` random rows, against
    torch.func.vjp."""
    import torch

    out, vjp = torch.func.vjp(fn, x_new)
    rng = np.random.default_rng(1)
    pick = rng.choice(J.shape[0], size=min(rows, J.shape[0]), replace=False)
    err, scale = 0.0, 0.0
    for r in pick:
        e = torch.zeros(out.numel(), dtype=out.dtype)
        e[r] = 1
        (g,) = vjp(e.reshape(out.shape))
        mine = J[[r]].toarray().ravel()
        ref = g.detach().reshape(-1).numpy()
        err = max(err, float(np.abs(mine - ref).max()))
        scale = max(scale, float(np.abs(ref).max()))
    return err / max(scale, 1e-30)


def work_plan(model: str, s: dict) -> dict:
    import sparsejac

    fn, x, x_new = torch_model(model, s)
    try:
        t0 = time.perf_counter()
        phase("plan_of")
        plan = sparsejac.plan_of(fn, x, memory_limit=sparsejac_limit())
        build = time.perf_counter() - t0
        phase("plan.jacobian")
        refill, n, refill_peak, J = harness.refill(plan, x, x_new)
    except Exception as e:  # noqa: BLE001
        return error(e)
    out = dict(build=build, time=refill, runs=n, refill_peak=refill_peak, nnz=int(J.nnz),
               result_bytes=int(J.data.nbytes + J.indices.nbytes + J.indptr.nbytes))
    floor = _floor(J.nnz, J.shape[0], J.indices.dtype)
    floor()  # warm-up
    out["floor"], _ = timed(floor)
    # The refill's terms: tracing (the torch ops and the tracer), then writing the values.
    # Timed alternately with refills (the machine is shared: both see the same load).
    try:
        from sparsejac.programs import collect

        traces, refills = [], []
        for _ in range(n):
            t0 = time.perf_counter()
            collect.trace(fn, (x_new,), 0, sparsejac_limit())
            traces.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            plan.jacobian(x_new, format="csr")
            refills.append(time.perf_counter() - t0)
        out["trace"], out["refill_paired"] = min(traces), min(refills)
    except Exception as e:  # noqa: BLE001
        out["trace"], out["trace_error"] = None, repr(e)[:200]
    out.update(_factors(fn, x))
    try:
        out["check_rel_err"] = _check(J, fn, x_new)
    except Exception as e:  # noqa: BLE001
        out["check_rel_err"], out["check_error"] = None, repr(e)[:200]
    return out


def work_peer(model: str, s: dict, chunk: int | None) -> dict:
    try:
        import asdex
        import jax
    except ImportError as e:
        return {"na": f"not installed ({e.name})"}
    f, x, x_new = jax_model(model, s)
    jax.block_until_ready((x, x_new))
    note = None
    try:
        base = reset_peak()
        t0 = time.perf_counter()
        try:
            phase("detection+colouring")
            coloring = asdex.jacobian_coloring(f, x)
        except NotImplementedError as e:
            if "reduce_window" not in str(e):
                raise
            # asdex has no rule for reduce_window_max: the same pooling as a reshaped max
            note = f"{str(e).splitlines()[0][:60]}: pooling written as a max over a reshape"
            f, x, x_new = jax_model(model, s, pool="reshape")
            t0 = time.perf_counter()
            coloring = asdex.jacobian_coloring(f, x)
        detect = time.perf_counter() - t0
        phase(f"compile ({coloring.num_colors} colours, detection+colouring {detect:.0f} s)")
        jf = jax.jit(asdex.jacobian_from_coloring(f, coloring, chunk_size=chunk))
        compiled = jf.lower(x).compile()
        setup = time.perf_counter() - t0
        phase(f"evaluation (set-up {setup:.0f} s)")
        best, n = harness.jax_eval(compiled, x, x_new)
        peak = peak_above(base)
    except Exception as e:  # noqa: BLE001
        return error(e)
    return dict(setup=setup, detect=detect, time=best, runs=n, peak=peak,
                colors=int(coloring.num_colors), mode=str(coloring.mode),
                nnz=int(coloring.sparsity.nnz), chunk=chunk, note=note)


# --------------------------------------------------------------------------- driver


def spawn(model: str, method: str, sizes: dict, timeout: float, chunk: int | None = None) -> dict:
    return harness.spawn(str(Path(__file__).resolve()), model, method, sizes, timeout, chunk)


def spawn_chunked(model: str, method: str, sizes: dict, timeout: float, chunks) -> dict:
    """:func:`spawn` with each chunk size in turn until a run does not run out of memory; the
    attempts that did are kept in the JSON (``earlier``)."""
    earlier = []
    for chunk in chunks:
        r = spawn(model, method, sizes, timeout, chunk)
        if not r.get("oom"):
            break
        earlier.append({"chunk": chunk, "status": r.get("status")})
    r["earlier"] = earlier[:-1] if not ok(r) else earlier
    return r


def measure_model(model: str, sizes: dict, timeout: float, log,
                  peer_timeout: float = PEER_TIMEOUT) -> dict:
    res: dict = {"sizes": sizes}
    rows, cols = dense_shape(model, sizes)
    res["first"] = spawn(model, "first", sizes, timeout)
    log(model, "first", res["first"])
    res["plan"] = spawn(model, "plan", sizes, timeout)
    log(model, "plan", res["plan"])
    dense = rows * cols * 4
    if dense > JACREV_DENSE_LIMIT:
        res["jacrev"] = {"status": f"skipped: dense J = {dense / GB:.1f} GB"}
    else:
        res["jacrev"] = spawn_chunked(model, "jacrev", sizes, timeout,
                                      (None, max(1, rows // 16), max(1, rows // 256)))
    log(model, "jacrev", res["jacrev"])
    res["peer"] = spawn_chunked(model, "peer", sizes, peer_timeout, (None, 256, 32))
    log(model, "peer", res["peer"])
    return res


# --------------------------------------------------------------------------- the table


def ratios(res: dict) -> dict:
    first, plan, jacrev, peer = res["first"], res["plan"], res["jacrev"], res["peer"]
    out: dict = {}
    if ok(plan) and ok(peer):
        out["peer_eval/refill"] = peer["time"] / plan["time"]
    if ok(plan) and plan.get("floor"):
        out["refill/floor"] = plan["time"] / plan["floor"]
    if ok(first) and ok(jacrev):
        out["jacrev/first"] = jacrev["time"] / first["time"]
    if ok(first) and ok(peer):
        out["peer_setup/first"] = peer["setup"] / first["time"]
    if ok(first):
        factor = plan.get("largest_factor") if ok(plan) else None
        denominator = first["result_bytes"] + (factor or 0)
        out["peak/(result+factor)"] = first["peak"] / max(denominator, 1)
        out["_peak_basis"] = "result+factor" if factor is not None else "result only"
    return out


def verdict(name: str, value: float | None) -> str:
    _, threshold, direction = TARGETS[name]
    return harness.verdict(value, threshold, direction, "{:.2f}x")


def table(results: dict) -> str:
    lines = [
        "| model | nnz | jacrev s | jacrev peak MB | peer set-up s | peer eval s | peer peak MB "
        "| first call s | first peak MB | 2nd call s | refill s | write floor s | result MB | largest factor MB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for model, res in results.items():
        first, plan, jacrev, peer = res["first"], res["plan"], res["jacrev"], res["peer"]
        nnz = first.get("nnz") or plan.get("nnz")
        nbytes = first.get("result_bytes") or plan.get("result_bytes")
        factor = plan.get("largest_factor") if ok(plan) else None
        lines.append("| " + " | ".join([
            model,
            f"{nnz:.3g}" if nnz else "",
            cell_time(jacrev), cell_mb(jacrev, missing="n/a"),
            cell_time(peer, "setup"), cell_time(peer) if ok(peer) else "",
            cell_mb(peer, missing="n/a"),
            cell_time(first), cell_mb(first, missing="n/a"),
            f"{first['second']:.4g}" if ok(first) else "",
            cell_time(plan), f"{plan['floor']:.4g}" if ok(plan) else "",
            f"{nbytes / MB:.1f}" if nbytes else "",
            f"{factor / MB:.1f}" if factor is not None else ("n/a" if ok(plan) else ""),
        ]) + " |")
    lines += ["", "| model | " + " | ".join(d for d, _, _ in TARGETS.values()) + " |",
              "|---|" + "---|" * len(TARGETS)]
    for model, res in results.items():
        r = ratios(res)
        lines.append(f"| {model} | " + " | ".join(verdict(k, r.get(k)) for k in TARGETS) + " |")
    return "\n".join(lines)


def notes(results: dict) -> str:
    """Per model: the measured terms of the cost, and anything odd."""
    out = []
    for model, res in results.items():
        first, plan, peer = res["first"], res["plan"], res["peer"]
        parts = []
        if ok(plan):
            tr, rp = plan.get("trace"), plan.get("refill_paired")
            if tr is not None:
                parts.append(f"refill {rp:.4g} s = trace {tr:.4g} s ({100 * tr / rp:.0f}%) + "
                             f"writing values {max(rp - tr, 0):.4g} s (timed alternately); "
                             f"write floor {plan['floor']:.4g} s")
            if plan.get("factors_held") is not None:
                parts.append(f"factors live at once in the trace, at most {plan['factors_held'] / MB:.1f} MB "
                             f"(largest {plan['largest_factor'] / MB:.1f} MB)")
            err = plan.get("check_rel_err")
            if err is not None:
                parts.append(f"refill vs torch.func.vjp on 48 rows: rel. err {err:.1e}"
                             + (" **WRONG**" if err > 1e-3 else ""))
            parts.append(f"plan_of build {plan['build']:.4g} s")
        elif "error" in plan or "status" in plan:
            parts.append(f"plan_of: {why(plan)}")
        if ok(first):
            parts.append(f"jacobian_of first call {first['time']:.4g} s (peak "
                         f"{first['peak'] / MB:.0f} MB), second call in the same process "
                         f"{first['second']:.4g} s (peak {first['second_peak'] / MB:.0f} MB)")
        elif "traceback" in first:
            tb = [ln for ln in first["traceback"].strip().splitlines() if ln.strip()]
            parts.append("jacobian_of traceback tail: `" + " / ".join(
                ln.strip() for ln in tb[-4:-1]).replace("|", "/")[:300] + "`")
        if ok(peer):
            parts.append(f"peer: detection+colouring {peer['detect']:.3g} s of set-up "
                         f"{peer['setup']:.3g} s; {peer['colors']} colours ({peer['mode']}), "
                         f"pattern nnz {peer['nnz']:,}")
            if peer.get("note"):
                parts.append(f"peer: {peer['note']}")
            nnz = first.get("nnz") or plan.get("nnz")
            if nnz and nnz != peer["nnz"]:
                parts.append(f"pattern nnz differs: sparsejac {nnz:,}, peer {peer['nnz']:,}")
        out.append(f"- {model}: " + "; ".join(parts))
    return "\n".join(out)


WORKERS = {
    "jacrev": work_jacrev,
    "first": lambda m, s, chunk: work_first(m, s),
    "plan": lambda m, s, chunk: work_plan(m, s),
    "peer": work_peer,
}


def main(argv=None) -> int:
    parser = harness.parser(__doc__, "models", MODELS, 600.0,
                            "seconds for each torch subprocess", PEER_TIMEOUT)
    args = parser.parse_args(argv)
    if args.worker:
        return harness.run_worker(args.worker, WORKERS)
    models = harness.names(parser, args.models, MODELS, "model")

    results = {}
    for model in models:
        desc, full, quick = MODELS[model]
        results[model] = measure_model(model, quick if args.quick else full, args.timeout,
                                       harness.log, args.peer_timeout)

    header = (f"{datetime.date.today().isoformat()}; {os.cpu_count()} cores, "
              f"{platform.machine()}, Python {platform.python_version()}, "
              f"{harness.versions(ROOT)}; float32, CPU{'; --quick sizes' if args.quick else ''}")
    items = [f"- {model}: {MODELS[model][0]}" if not args.quick
             else f"- {model}: {results[model]['sizes']}" for model in models]
    harness.report(header, items, table(results), notes(results), args.json, results,
                   {m: ratios(r) for m, r in results.items()})
    return 0


if __name__ == "__main__":
    sys.exit(main())

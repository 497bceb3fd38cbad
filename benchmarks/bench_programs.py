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
  32 tokens, w.r.t. the input;
- torch only (weights from ``torch.manual_seed(0)``; the peer reads n/a), for the orders of
  accumulation: ``resnet_head`` (conv stem 3->16, a ResNet basic block with eval batch norms,
  global average pool, linear 10; batch 16 of 3x16x16), ``mlp_head`` (tanh MLP 512-256-10,
  batch 64), ``encoder_head`` (``TransformerEncoderLayer(64, 4, dim_feedforward=128)``, batch 8
  x 16 tokens, mean over tokens, linear 10), all w.r.t. the input; ``cnn_w`` (conv 8 3x3, relu,
  avgpool 2, linear 10 on batch 16 of 3x16x16) w.r.t. all its parameters through
  ``torch.func.functional_call`` (a dict argument); ``stencil`` (tanh of the 5-point Laplacian,
  F.pad and slices, on 128x128), w.r.t. the input.

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
  (best of 3 after a warm-up), in the same process after the first call.
- per order of accumulation (``mode="auto"``, the columns above, and ``"forward"`` and
  ``"reverse"``, each in its own fresh process): the first call, the refill, the order auto
  picks (``plan.mode``), jacrev over each, and the refill split into the trace, the sweep of
  the recorded steps and the rest (products and writing). Every result is checked against
  ``torch.func.vjp``'s rows: every row up to 4096 rows (a dense compare), else 48 random ones.
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
    "resnet_head": ("conv stem 3->16, ResNet basic block (16 ch, BN eval), global avg pool, "
                    "linear 10; batch 16 of 3x16x16, wrt input", dict(b=16, h=16, c=16),
                    dict(b=2, h=8, c=4)),
    "mlp_head": ("tanh MLP 512-256-10, batch 64, wrt input", dict(b=64, n=512, m=256),
                 dict(b=4, n=32, m=16)),
    "encoder_head": ("TransformerEncoderLayer(64, 4, ff 128), batch 8 x 16 tokens, mean over "
                     "tokens, linear 10, wrt input", dict(b=8, t=16, d=64, heads=4, ff=128),
                     dict(b=2, t=4, d=16, heads=4, ff=32)),
    "cnn_w": ("CNN conv8 3x3-relu-avgpool-linear10, batch 16 of 3x16x16, wrt all parameters "
              "(functional_call)", dict(b=16, h=16, c=8), dict(b=2, h=8, c=4)),
    "stencil": ("tanh of the 5-point Laplacian (F.pad and slices) on a 128x128 grid, wrt input",
                dict(n=128), dict(n=12)),
}
# the models written in torch only: the JAX peer reads n/a
TORCH_ONLY = {"resnet_head", "mlp_head", "encoder_head", "cnn_w", "stencil"}
# narrow outputs of a batch (the order targets: first >= B/3, refill >= 2B/3 x jacrev); w.r.t.
# parameters (no slower than jacrev); forward-right (auto never slower than forward)
NARROW = ("cnn", "resnet_head", "mlp_head", "encoder_head")
WRT_PARAMETERS = ("mlp_w", "cnn_w")
FORWARD_RIGHT = ("mlp", "stencil")
ORDERS = ("forward", "reverse")

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
    if model in ("cnn", "resnet_head"):
        return s["b"] * 10, s["b"] * 3 * s["h"] ** 2
    if model == "mlp_head":
        return s["b"] * 10, s["b"] * s["n"]
    if model == "encoder_head":
        return s["b"] * 10, s["b"] * s["t"] * s["d"]
    if model == "cnn_w":
        c, h = s["c"], s["h"]
        return s["b"] * 10, c * 27 + c + 10 * c * (h // 2) ** 2 + 10
    if model == "stencil":
        return (s["n"] ** 2,) * 2
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


def torch_only_model(model: str, s: dict):
    """``(fn, arg, arg_new)`` of the models written in torch only: modules initialised from
    ``torch.manual_seed(0)`` (batch norms' running statistics drawn too), inputs after them."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    torch.manual_seed(0)
    if model == "resnet_head":
        c = s["c"]

        class Head(nn.Module):
            def __init__(self):
                super().__init__()
                self.stem = nn.Conv2d(3, c, 3, padding=1, bias=False)
                self.bn0 = nn.BatchNorm2d(c)
                self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
                self.bn1 = nn.BatchNorm2d(c)
                self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
                self.bn2 = nn.BatchNorm2d(c)
                self.fc = nn.Linear(c, 10)

            def forward(self, x):
                x = F.relu(self.bn0(self.stem(x)))
                y = F.relu(self.bn1(self.conv1(x)))
                y = F.relu(self.bn2(self.conv2(y)) + x)  # the basic block: identity shortcut
                return self.fc(F.adaptive_avg_pool2d(y, 1).flatten(1))

        fn = Head()
        with torch.no_grad():
            for bn in (fn.bn0, fn.bn1, fn.bn2):
                bn.running_mean.normal_(0, 0.1)
                bn.running_var.uniform_(0.5, 1.5)
                bn.weight.uniform_(0.5, 1.5)
                bn.bias.normal_(0, 0.1)
        fn.eval()
        shape = (s["b"], 3, s["h"], s["h"])
    elif model == "mlp_head":
        fn = nn.Sequential(nn.Linear(s["n"], s["m"]), nn.Tanh(), nn.Linear(s["m"], 10)).eval()
        shape = (s["b"], s["n"])
    elif model == "encoder_head":
        layer = nn.TransformerEncoderLayer(s["d"], s["heads"], dim_feedforward=s["ff"],
                                           batch_first=True).eval()
        head = nn.Linear(s["d"], 10).eval()

        def fn(x):
            return head(layer(x).mean(1))

        shape = (s["b"], s["t"], s["d"])
    elif model == "cnn_w":
        c, h = s["c"], s["h"]
        net = nn.Sequential(nn.Conv2d(3, c, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2),
                            nn.Flatten(), nn.Linear(c * (h // 2) ** 2, 10)).eval()
        x = torch.randn(s["b"], 3, h, h)
        arg = {k: v.detach().clone() for k, v in net.named_parameters()}
        arg_new = {k: v + 0.1 * torch.randn_like(v) for k, v in arg.items()}

        def fn(params):
            return torch.func.functional_call(net, params, (x,))

        return fn, arg, arg_new
    elif model == "stencil":
        def fn(u):
            p = F.pad(u, (1, 1, 1, 1))
            return torch.tanh(4 * u - p[:-2, 1:-1] - p[2:, 1:-1] - p[1:-1, :-2] - p[1:-1, 2:])

        shape = (s["n"], s["n"])
    else:
        raise ValueError(model)
    return fn, torch.randn(shape), torch.randn(shape)


def torch_model(model: str, s: dict):
    """``(fn, arg, arg_new)`` in torch."""
    import torch
    from torch import nn

    if model in TORCH_ONLY:
        return torch_only_model(model, s)
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


def _flat(J, arg):
    """A result as one scipy CSR: the blocks of a dict argument side by side, in its order."""
    if isinstance(J, dict):
        import scipy.sparse as sp

        return sp.hstack([J[k] for k in arg], format="csr")
    return J


def _bytes(J) -> int:
    return int(J.data.nbytes + J.indices.nbytes + J.indptr.nbytes)


def work_first(model: str, s: dict, mode: str = "auto") -> dict:
    import sparsejac

    fn, x, _ = torch_model(model, s)
    try:
        base = reset_peak()
        t0 = time.perf_counter()
        phase(f"jacobian_of first call, mode={mode}")
        J = sparsejac.jacobian_of(fn, x, format="csr", memory_limit=sparsejac_limit(), mode=mode)
        first = time.perf_counter() - t0
        peak = peak_above(base)
    except Exception as e:  # noqa: BLE001 - reported in the table
        return error(e)
    blocks = list(J.values()) if isinstance(J, dict) else [J]
    out = dict(time=first, peak=peak, nnz=sum(int(b.nnz) for b in blocks),
               shape=list(_flat(J, x).shape), result_bytes=sum(_bytes(b) for b in blocks),
               index_dtype=str(blocks[0].indices.dtype), mode=mode)
    del J, blocks
    base = reset_peak()
    t0 = time.perf_counter()
    J = sparsejac.jacobian_of(fn, x, format="csr", memory_limit=sparsejac_limit(), mode=mode)
    out["second"] = time.perf_counter() - t0
    out["second_peak"] = peak_above(base)
    try:
        phase("check")
        out["check_rel_err"], out["check_rows"] = _check(_flat(J, x), fn, x)
    except Exception as e:  # noqa: BLE001
        out["check_rel_err"], out["check_error"] = None, repr(e)[:200]
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


def _factors(fn, x, mode: str = "auto") -> dict:
    """The dense factors of one Jacobian's collection in ``mode``: the largest one a term
    holds (recorded by the tracer, or joined by the sweep of another order), and the most bytes
    of factors and values the guard counted at once. Reads the library's internals (the
    tracer's ``record``, accumulate's ``_joined``, wrapped here for one collection): None where
    they moved."""
    try:
        from sparsejac.programs import accumulate, collect
        from sparsejac.programs import tracer as tracing

        stats = {"largest": 0, "live": None}

        def seen(terms, ledger_bytes):
            for t in terms:
                # what the term holds: an unformed product's parts, not the product
                held = t.held() if hasattr(t, "held") else [t.factor]
                for f in held:
                    n = min(f.untyped_storage().nbytes(), f.numel() * f.element_size())
                    stats["largest"] = max(stats["largest"], n)
            if ledger_bytes is not None:
                stats["live"] = max(stats["live"] or 0, ledger_bytes)

        original, joined = tracing.Tracer.record, accumulate._joined

        def record(self, tensor, terms, value=True):
            original(self, tensor, terms, value)
            if isinstance(terms, dict):
                for ts in terms.values():
                    seen(ts, None)
            seen([], self.live_bytes() if hasattr(self, "live_bytes") else None)

        def join(outer, inner, labels):
            term = joined(outer, inner, labels)
            seen([term], labels.ledger.nbytes if hasattr(labels, "ledger") else None)
            return term

        tracing.Tracer.record, accumulate._joined = record, join
        try:
            c = collect.jacobian_blocks(fn, (x,), 0, sparsejac_limit(), mode)
        finally:
            tracing.Tracer.record, accumulate._joined = original, joined
        del c
        return dict(largest_factor=stats["largest"], factors_held=stats["live"])
    except Exception as e:  # noqa: BLE001
        return dict(largest_factor=None, factors_held=None, factor_error=repr(e)[:200])


FULL_CHECK = 4096  # rows: every row checked up to this many, else CHECK_ROWS random ones
CHECK_ROWS = 48


def _check(J, fn, x, rows: int | None = None) -> tuple[float, int]:
    """Relative max error of ``J`` (one CSR at ``x``) against ``torch.func.vjp``'s rows: every
    row where there are at most :data:`FULL_CHECK` (a dense compare), else ``rows`` random
    ones; and how many rows were compared."""
    import torch

    out, vjp = torch.func.vjp(fn, x)
    n = J.shape[0]
    if rows is None:
        rows = n if n <= FULL_CHECK else CHECK_ROWS
    pick = np.arange(n) if rows >= n else np.random.default_rng(1).choice(n, rows, replace=False)
    keys = list(x) if isinstance(x, dict) else None
    err, scale = 0.0, 0.0
    batched = torch.func.vmap(vjp)
    for start in range(0, len(pick), 256):
        chunk = pick[start:start + 256]
        e = torch.zeros(len(chunk), out.numel(), dtype=out.dtype)
        e[torch.arange(len(chunk)), torch.from_numpy(chunk)] = 1
        (g,) = batched(e.reshape(len(chunk), *out.shape))
        if keys is not None:
            g = torch.cat([g[k].reshape(len(chunk), -1) for k in keys], 1)
        ref = g.detach().reshape(len(chunk), -1).numpy()
        mine = J[chunk].toarray()
        err = max(err, float(np.abs(mine - ref).max()))
        scale = max(scale, float(np.abs(ref).max()))
    return err / max(scale, 1e-30), len(pick)


def _split(plan, x_new, runs: int) -> dict:
    """A refill's parts, timed inside ``runs`` refills (the best one's): the trace (the torch
    ops under the tracer), the sweep of another order (accumulate's cut over the recorded
    steps; 0 in the trace's own forward order) and the rest (the products formed, the values written).
    Wraps the library's internals for these calls: an ``error`` where they moved."""
    try:
        from sparsejac.programs import accumulate, collect
    except Exception as e:  # noqa: BLE001
        return {"split_error": repr(e)[:200]}
    spent = {}
    # (every order's sweep is accumulate.cut at some position; forward, reverse call it)
    saved = {(collect, "trace"): collect.trace, (accumulate, "cut"): accumulate.cut}

    def timer(name, f):
        def run(*a, **k):
            t0 = time.perf_counter()
            try:
                return f(*a, **k)
            finally:
                spent[name] = spent.get(name, 0.0) + time.perf_counter() - t0
        return run

    best = None
    try:
        for (mod, attr), f in saved.items():
            setattr(mod, attr, timer("trace" if attr == "trace" else "sweep", f))
        for _ in range(runs):
            spent.clear()
            t0 = time.perf_counter()
            J = plan.jacobian(x_new, format="csr")
            total = time.perf_counter() - t0
            del J
            if best is None or total < best["refill_paired"]:
                best = dict(refill_paired=total, trace=spent.get("trace", 0.0),
                            sweep=spent.get("sweep", 0.0))
    except Exception as e:  # noqa: BLE001
        return {"split_error": repr(e)[:200]}
    finally:
        for (mod, attr), f in saved.items():
            setattr(mod, attr, f)
    best["write"] = max(best["refill_paired"] - best["trace"] - best["sweep"], 0.0)
    return best


def work_plan(model: str, s: dict, mode: str = "auto") -> dict:
    import sparsejac

    fn, x, x_new = torch_model(model, s)
    try:
        t0 = time.perf_counter()
        phase(f"plan_of mode={mode}")
        plan = sparsejac.plan_of(fn, x, memory_limit=sparsejac_limit(), mode=mode)
        build = time.perf_counter() - t0
        phase("plan.jacobian")
        refill, n, refill_peak, J = harness.refill(plan, x, x_new)
    except Exception as e:  # noqa: BLE001
        return error(e)
    blocks = list(J.values()) if isinstance(J, dict) else [J]
    J = _flat(J, x)
    out = dict(build=build, time=refill, runs=n, refill_peak=refill_peak, nnz=int(J.nnz),
               result_bytes=sum(_bytes(b) for b in blocks), mode=mode,
               chosen=getattr(plan, "mode", None))
    floor = _floor(J.nnz, J.shape[0], J.indices.dtype)
    floor()  # warm-up
    out["floor"], _ = timed(floor)
    phase("split")
    out.update(_split(plan, x_new, n))
    phase("factors")
    out.update(_factors(fn, x, mode))
    try:
        phase("check")
        out["check_rel_err"], out["check_rows"] = _check(J, fn, x_new)
    except Exception as e:  # noqa: BLE001
        out["check_rel_err"], out["check_error"] = None, repr(e)[:200]
    return out


def work_peer(model: str, s: dict, chunk: int | None) -> dict:
    if model in TORCH_ONLY:
        return {"na": "not written in JAX"}
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
    # each order in one fresh process: the first call, then the plan's refills (auto: the
    # existing first/plan columns; auto traces with the steps kept, then picks its order)
    for order in ("auto",) + ORDERS:
        suffix = "" if order == "auto" else f"@{order}"
        r = spawn(model, f"sparsejac@{order}", sizes, timeout)
        for kind in ("first", "plan"):
            res[kind + suffix] = r[kind] if kind in r else r
            log(model, kind + suffix, res[kind + suffix])
    dense = rows * cols * 4
    if dense > JACREV_DENSE_LIMIT:
        res["jacrev"] = {"status": f"skipped: dense J = {dense / GB:.1f} GB"}
    else:
        res["jacrev"] = spawn_chunked(model, "jacrev", sizes, timeout,
                                      (None, max(1, rows // 16), max(1, rows // 256)))
    log(model, "jacrev", res["jacrev"])
    if model in TORCH_ONLY:
        res["peer"] = {"na": "not written in JAX"}
    else:
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


def order_ratios(res: dict) -> dict:
    """jacrev over the first call and over the refill, per order asked for (auto included)."""
    jacrev, out = res["jacrev"], {}
    for order in ("auto",) + ORDERS:
        first = res["first" if order == "auto" else f"first@{order}"]
        plan = res["plan" if order == "auto" else f"plan@{order}"]
        if ok(jacrev) and ok(first):
            out[f"jacrev/first {order}"] = jacrev["time"] / first["time"]
        if ok(jacrev) and ok(plan):
            out[f"jacrev/refill {order}"] = jacrev["time"] / plan["time"]
    if ok(jacrev) and jacrev.get("cold") and ok(res["first"]):
        # cold against cold: jacrev's own first call in its fresh process
        out["jacrev cold/first auto"] = jacrev["cold"] / res["first"]["time"]
    return out


def order_targets(model: str, res: dict) -> list[tuple[str, str]]:
    """The project's targets for the orders of accumulation that apply to ``model``: (target,
    verdict with the ratio seen)."""
    r, out = order_ratios(res), []
    b = res["sizes"].get("b")

    def check(what, key, threshold):
        out.append((what, harness.verdict(r.get(key), threshold, ">=", "{:.2f}x")))

    if model in NARROW and b:
        check(f"first call >= B/3 = {b / 3:.3g}x faster than jacrev (auto)", "jacrev/first auto",
              b / 3)
        check(f"refill >= 2B/3 = {2 * b / 3:.3g}x faster than jacrev (auto)",
              "jacrev/refill auto", 2 * b / 3)
    if model == "cnn":
        check("first call >= 10x faster than jacrev (auto)", "jacrev/first auto", 10)
        peak = ratios(res).get("peak/(result+factor)")
        out.append(("first call's peak <= 1.5x (result + largest factor) (auto)",
                    harness.verdict(peak, 1.5, "<=", "{:.2f}x")))
    if model in WRT_PARAMETERS:
        check("first call no slower than jacrev (auto)", "jacrev/first auto", 1)
        check("refill no slower than jacrev (auto)", "jacrev/refill auto", 1)
    if model in FORWARD_RIGHT:
        plan, auto_first = res["plan"], res["first"]
        for kind, a, f in (("first call", auto_first, res["first@forward"]),
                           ("refill", plan, res["plan@forward"])):
            if ok(a) and ok(f) and ok(plan):
                # auto traces with the steps kept before it picks: not forward's code path
                ratio = a["time"] / f["time"]
                out.append((f"{kind}: auto never slower than forward (auto picks "
                             f"{plan.get('chosen')})",
                            f"auto/forward {ratio:.3f}x " + ("met" if ratio <= 1 else "**missed**")))
            else:
                out.append((f"{kind}: auto never slower than forward", "n/a"))
    return out


def order_table(results: dict) -> str:
    """The orders of accumulation: first call and refill per order, the order auto picks, the
    ratios to jacrev, and the checks of every result."""
    lines = [
        "| model | rows x cols | auto picks | first fwd s | refill fwd s | first rev s "
        "| refill rev s | jacrev s | jacrev/first fwd | jacrev/refill fwd | jacrev/first rev "
        "| jacrev/refill rev | jacrev/first auto | jacrev/refill auto | jacrev cold s "
        "| jacrev cold/first auto | checks: worst rel. err (rows) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for model, res in results.items():
        r = order_ratios(res)
        errs = [(k, res[k].get("check_rel_err"), res[k].get("check_rows")) for k in res
                if k.startswith(("first", "plan")) and ok(res[k])]
        known = [(e, n) for _, e, n in errs if e is not None]
        missing = [k for k, e, _ in errs if e is None]
        worst = max(known) if known else None
        check = (f"{worst[0]:.1e} ({min(n for _, n in known)}-{max(n for _, n in known)} rows, "
                 f"{len(known)} results)" if worst else "")
        if worst and worst[0] > 1e-3:
            check += " **WRONG**"
        if missing:
            check += f"; unchecked: {', '.join(missing)}"
        shape = res["first"].get("shape") if ok(res["first"]) else None
        lines.append("| " + " | ".join([
            model, f"{shape[0]} x {shape[1]}" if shape else "",
            str(res["plan"].get("chosen")) if ok(res["plan"]) else why(res["plan"]),
            cell_time(res["first@forward"]), cell_time(res["plan@forward"]),
            cell_time(res["first@reverse"]), cell_time(res["plan@reverse"]),
            cell_time(res["jacrev"]),
        ] + [f"{r[k]:.2f}x" if k in r else "" for k in (
            "jacrev/first forward", "jacrev/refill forward", "jacrev/first reverse",
            "jacrev/refill reverse", "jacrev/first auto", "jacrev/refill auto")]
            + [f"{res['jacrev']['cold']:.4g}" if ok(res["jacrev"]) else "",
               f"{r['jacrev cold/first auto']:.2f}x" if "jacrev cold/first auto" in r else "",
               check]) + " |")
    rows = [(m, t, v) for m, res in results.items() for t, v in order_targets(m, res)]
    if rows:
        lines += ["", "| model | target (orders of accumulation) | seen |",
                  "|---|---|---|"]
        lines += [f"| {m} | {t} | {v} |" for m, t, v in rows]
    return "\n".join(lines)


def split_notes(results: dict) -> str:
    """Per model and order: the refill's parts (trace, sweep, the rest) and the factors."""
    out = []
    for model, res in results.items():
        parts = []
        for key in ("plan@forward", "plan@reverse"):
            plan = res.get(key)
            if not ok(plan):
                parts.append(f"{key[5:]}: {why(plan)}")
                continue
            text = f"{key[5:]}: refill {plan['time']:.4g} s"
            if "trace" in plan:
                text += (f" (one timed: {plan['refill_paired']:.4g} s = trace {plan['trace']:.4g} s"
                         f" + sweep {plan['sweep']:.4g} s + products and writing "
                         f"{plan['write']:.4g} s)")
            if plan.get("largest_factor") is not None:
                text += (f", largest factor {plan['largest_factor'] / MB:.2f} MB, at most "
                         f"{(plan['factors_held'] or 0) / MB:.1f} MB counted live")
            text += f", refill peak {plan['refill_peak'] / MB:.0f} MB"
            parts.append(text)
        out.append(f"- {model}: " + "; ".join(parts))
    return "\n".join(out)


def notes(results: dict) -> str:
    """Per model: the measured terms of the cost, and anything odd."""
    out = []
    for model, res in results.items():
        first, plan, peer = res["first"], res["plan"], res["peer"]
        parts = []
        if ok(plan):
            tr, rp = plan.get("trace"), plan.get("refill_paired")
            if tr is not None:
                parts.append(f"refill ({plan.get('chosen')}) {rp:.4g} s = trace {tr:.4g} s "
                             f"({100 * tr / rp:.0f}%) + sweep {plan['sweep']:.4g} s + products and "
                             f"writing values {plan['write']:.4g} s; write floor "
                             f"{plan['floor']:.4g} s")
            if plan.get("factors_held") is not None:
                parts.append(f"factors live at once, at most {plan['factors_held'] / MB:.1f} MB "
                             f"(largest {plan['largest_factor'] / MB:.1f} MB)")
            err = plan.get("check_rel_err")
            if err is not None:
                parts.append(f"refill vs torch.func.vjp on {plan['check_rows']} rows: rel. err "
                             f"{err:.1e}" + (" **WRONG**" if err > 1e-3 else ""))
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


def work_sparsejac(model: str, s: dict, mode: str) -> dict:
    """The first call in this fresh process, then a plan's refills: ``{"first", "plan"}``."""
    return {"first": work_first(model, s, mode), "plan": work_plan(model, s, mode)}


WORKERS = {"jacrev": work_jacrev, "peer": work_peer}
for _order in ("auto",) + ORDERS:
    WORKERS[f"sparsejac@{_order}"] = lambda m, s, chunk, o=_order: work_sparsejac(m, s, o)


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
    harness.report(header, items, table(results) + "\n\n" + order_table(results),
                   notes(results) + "\n\nThe refills' parts, per order:\n\n" + split_notes(results),
                   args.json, results,
                   {m: {**ratios(r), **order_ratios(r)} for m, r in results.items()})
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The operation table of the docs, generated from the registry so it cannot go stale.

``python -m sparsejac.programs.table > docs/operations.md`` writes it; a test checks the file
equals what this prints.
"""

from __future__ import annotations

from .collect import load
from .registry import EMPTY, RULES

GROUPS = {
    "linalg": "Linear algebra",
    "elementwise": "Elementwise: arithmetic and activations",
    "reduce": "Reductions",
    "layout": "Layout and selection (index maps)",
    "conv": "Convolution and pooling",
    "norm": "Normalisation",
    "losses": "Losses",
    "attention": "Attention",
    "scatter": "Placements (scatter, index_put, index_add)",
    "order": "Sorting and order statistics",
    "blocks": "Batched small linear algebra (one dense block per batch entry)",
    "composite": "Written with other operations",
    "recurrent": "Recurrent layers",
    "resample": "Resampling (interpolate)",
    "misc": "torch's internal kernels and operations of constant derivative",
    "spectral": "Fourier transforms with real results, spectrum shifts",
}

HEADER = """# Operations `jacobian_of` follows

Generated from the registry by `python -m sparsejac.programs.table`; do not edit by hand.
Each row is one rule; *spellings* are the names torch reports for it (`torch.op`, `Tensor.op`,
`torch.nn.functional.op` and the `nn` module that calls it share one). Keyword arguments are
accepted as in torch. *Kind*: `rule` (its own Jacobian rule) or `decomposition` (written with
other rules, which the tracer follows).

## Beyond this table

- **Writes.** Every in-place form of an operation the tracer follows (`x.relu_()`,
  `inplace=True`, `x += y`, `out=`), slice assignment (`x[idx] = v`), `copy_`, `zero_`,
  `fill_`, `masked_fill_`, `index_put_` and writes through views (into the base and its other
  views) are followed with torch's aliasing: each as its out-of-place form, written over the
  elements it writes (`sparsejac/programs/rules/inplace.py`).
- **torch's reference implementations.** An operation with no rule here whose Python
  reference exists in `torch._refs` (`addcmul`, `addcdiv`, `lerp`, `logaddexp`, `clamp_min`,
  `linalg.cross`, `block_diag`, `nan_to_num`, ...) is followed through it
  (`sparsejac/programs/rules/tables.py`); where the reference reaches a primitive with no
  rule, the operation is refused by name. Sampling (`normal`, `bernoulli`, ...) and
  `linalg.norm` are kept out: their references do not have torch's derivative.
- **Coverage over torch's operator database**, measured by
  `python benchmarks/opinfo_census.py` (torch 2.13, float64, CPU): of the 540 OpInfo entries
  torch differentiates, 449 have samples the census can check (a floating tensor in and out),
  and of those 440 are exact on every sample (98%), 9 are refused by name, none gives a
  different Jacobian and none raises anything else, in every order of accumulation. The
  refused ones: random sampling (`normal`, `bernoulli`, dropout and `rrelu` in training mode,
  `fractional_max_pool`), a sparse argument (`sparse.sampled_addmm`), and
  `as_strided_scatter` differentiated through its input (torch's gradient there is not the
  derivative).

## Tracing limits

- The Jacobian is that of the path the real values took, as with `torch.func`: Python control
  flow on values runs once.
- Which entry a relu, a maximum, a max-pool or a clamp lets through is a value, not structure:
  the pattern covers every entry that could pass.
- Grad modes are torch's: what is computed under `no_grad`, `inference_mode` or
  `set_grad_enabled(False)` is a constant (`enable_grad` inside `no_grad` follows again).
- Custom `torch.autograd.Function` classes and custom operators are refused by name until
  their derivative is declared with `sparsejac.register_function` (torch defines it by their
  backward); reentrant activation checkpointing is declared already.
- Refused, with a message naming the operation, where torch refuses too: a write into the
  differentiated argument, a write under `no_grad` into a traced tensor, a view made under
  `no_grad` read after its base was written; and, where torch's answer is ill-defined, an
  assignment that writes one element twice. Also refused: turning a traced tensor into a
  Python value (`item`, `tolist`, `numpy`); complex results; dropout in training mode; any
  operation neither listed here nor reached as above.
- Integer and boolean results (indices, masks, comparisons) and tensors made `*_like` a traced
  one are constants.
"""

def _params(rule) -> str:
    parts = []
    for name, default in rule.params:
        parts.append(name if default is EMPTY or name.startswith("*") else f"{name}={default!r}")
    return " ".join(parts)


def table() -> str:
    load()
    seen, rows = set(), {}
    for rule in RULES.values():
        if rule.kind not in ("rule", "decomposition") or id(rule) in seen:
            continue
        seen.add(id(rule))
        rows.setdefault(rule.group, []).append(rule)
    lines = [HEADER]
    for group, title in GROUPS.items():
        if group not in rows:
            continue
        lines += [f"## {title}", "", "| spellings | parameters | kind |", "|---|---|---|"]
        for rule in sorted(rows[group], key=lambda r: r.name):
            names = ", ".join(f"`{n}`" for n in rule.names)
            lines.append(f"| {names} | `{_params(rule)}` | {rule.kind} |")
        lines.append("")
    passive = sorted(n for n, r in RULES.items() if r.kind in ("metadata", "constant"))
    lines += ["## Passed through (no derivative)", "", ", ".join(f"`{n}`" for n in passive), ""]
    return "\n".join(lines)


if __name__ == "__main__":
    print(table(), end="")

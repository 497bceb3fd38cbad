"""torch's own ``autograd.Function`` classes whose derivative is known: declared here as users
declare theirs (:mod:`~sparsejac.programs.custom`)."""

from __future__ import annotations

from torch.utils.checkpoint import CheckpointFunction

from ..registry import Rule, parse_params, register_custom


def _checkpointed(run_function, preserve_rng_state, args):
    """Reentrant activation checkpointing (``checkpoint(..., use_reentrant=True)``) recomputes
    ``run_function`` in its backward, so its derivative is ``run_function``'s: trace it."""
    return run_function(*args)


register_custom(CheckpointFunction, Rule(
    ("CheckpointFunction",), "decomposition", parse_params("run_function preserve_rng_state *args"),
    None, _checkpointed, "functions", ("args",)))

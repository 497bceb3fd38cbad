"""Writers: from the terms at the end of a trace to the requested container.

Each block gets one writer, chosen once from its terms (:func:`.choose.writer_for`), which
both the one-shot path (:mod:`.assemble`) and plans (:class:`~sparsejac.programs.api.ProgramPlan`)
use: :class:`~.structured.Structured` writes one plain term (or terms nested in one) from its
structure, :class:`~.rows.ByRows` and :class:`~.coordinates.ByCoordinates` merge the others
(:mod:`.merged`) row by row or through coordinates, and :class:`~.csrpath.CsrPath` gives a
Hessian's symmetric and transposed blocks their CSR (:mod:`.mirror`). Each writer's byte
model sits beside the code it predicts (:mod:`.base`); :mod:`.plans` holds what a plan keeps.

Imports run one way: base, mirror, plans, then structured, merged, rows, coordinates,
csrpath, then choose and assemble. This package reads terms (their public names in
:mod:`sparsejac.programs.terms`), the formats, the ledger and the message prefix
(:mod:`sparsejac.programs.naming`); it never imports the tracer's dispatch or the rules.
"""

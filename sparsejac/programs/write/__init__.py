"""Writers: from the terms at the end of a trace to the requested container.

:mod:`.blocks` writes a block straight into a format's arrays, :mod:`.materialise` writes a
sum of terms as canonical CSR, :mod:`.assemble` guards and writes every block of a call, and
:mod:`.plans` keeps a plan's patterns for refills. This package reads terms
(:mod:`sparsejac.programs.terms`) and the formats; it never imports the tracer's dispatch or
the rules.
"""

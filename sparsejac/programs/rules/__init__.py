"""Operation rules, one module per kind; importing this package fills the registry."""

from . import (  # noqa: F401
    attention,
    blocks,
    composite,
    conv,
    elementwise,
    functions,
    inplace,
    layout,
    linalg,
    losses,
    misc,
    norm,
    order,
    passive,
    recurrent,
    reduce,
    resample,
    scatter,
    spectral,
    tables,
)

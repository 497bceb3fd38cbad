"""Operation rules, one module per kind; importing this package fills the registry."""

from . import (  # noqa: F401
    elementwise,
    linalg,
    layout,
    reduce,
    passive,
)

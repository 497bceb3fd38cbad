"""Peak-memory measurement shared by the benchmarks (Linux /proc).

``start = reset_peak()`` resets the process's high-water mark and returns its resident size;
``peak_above(start)`` is then how far the resident size rose above it since. Each benchmark runs
its measurement in a fresh subprocess, so the figure is that call's alone.
"""

from __future__ import annotations


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def reset_peak() -> int:
    """Reset the high-water mark (``clear_refs`` 5) and return the resident bytes now."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status("VmRSS")


def peak_above(start: int) -> int:
    """Bytes by which the resident size peaked above ``start`` since :func:`reset_peak`."""
    return max(_status("VmHWM") - start, 0)

"""Peak-memory measurement shared by the benchmarks (Linux /proc).

``start = reset_peak()`` resets the process's high-water mark and returns its resident size;
``peak_above(start)`` is then how far the resident size rose above it since. Each benchmark runs
its measurement in a fresh subprocess, so the figure is that call's alone.

:func:`run_guarded` runs such a subprocess with a wall-clock timeout and a watchdog on its
resident size (the machines are shared: a run that would take the machine's memory is killed
and reported, not left to the OOM killer).
"""

from __future__ import annotations

import subprocess
import time


def _status(field: str, pid: str = "self") -> int:
    with open(f"/proc/{pid}/status") as f:
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


def run_guarded(argv: list[str], timeout: float, rss_limit: int, env: dict | None = None) -> dict:
    """Run ``argv``; kill it past ``timeout`` seconds or ``rss_limit`` resident bytes.

    Returns ``{"rc", "stdout", "stderr", "killed"}`` where ``killed`` is None, ``"timeout"`` or
    ``"memory"``; ``max_rss`` is the largest resident size the watchdog saw."""
    import tempfile

    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(argv, stdout=out, stderr=err, text=True, env=env)
        start, killed, max_rss = time.monotonic(), None, 0
        while proc.poll() is None:
            try:
                rss = _status("VmRSS", str(proc.pid))
            except (FileNotFoundError, ProcessLookupError):
                rss = 0
            max_rss = max(max_rss, rss)
            if rss > rss_limit:
                killed = "memory"
            elif time.monotonic() - start > timeout:
                killed = "timeout"
            if killed:
                proc.kill()
                proc.wait()
                break
            time.sleep(0.05)
        out.seek(0)
        err.seek(0)
        return {"rc": proc.returncode, "stdout": out.read(), "stderr": err.read(),
                "killed": killed, "max_rss": max_rss}

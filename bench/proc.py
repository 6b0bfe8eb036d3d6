"""Fresh child processes for start-up figures and peak RSS, and what a figure needs beside it (the machine)."""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

import ldm_runtime

# Child processes' own peak RSS, shared by every start-up child script (ours and the peers').
PEAK_RSS_SNIPPET = r"""
def peak_rss_mb():
    # VmHWM: this process's own high-water mark (ru_maxrss would include the parent's RSS at fork)
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
"""


def run_child(code: str, args: dict, timeout: float = 600.0, env: dict | None = None) -> dict:
    """Run ``code`` in a fresh interpreter with ``json.dumps(args)`` as argv[1]; parse its ``RESULT`` line."""
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(args)], capture_output=True, text=True,
                          timeout=timeout, env=env)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise RuntimeError(f"benchmark subprocess failed (exit {proc.returncode}): {proc.stderr.strip()[-2000:]}")


def startup_runs(code: str, args: dict, repeats: int) -> dict[str, Any]:
    """Medians of ``repeats`` runs of the child ``code`` (after one that warms the page cache: we time
    start-up, not the disk), the worst peak RSS, and the runs themselves."""
    run_child(code, args)
    runs = [run_child(code, args) for _ in range(repeats)]
    out: dict[str, Any] = {k: float(statistics.median([r[k] for r in runs])) for k in runs[0]}
    out["peak_rss_mb"] = max(r["peak_rss_mb"] for r in runs)
    out["runs"] = runs
    return out


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo, else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict[str, Any]:
    """CPU model, core count, load, library versions and the date: what a figure needs beside it."""
    info: dict[str, Any] = {"cpu": cpu_model(), "cores": os.cpu_count(), "platform": platform.platform(),
                            "python": platform.python_version(), "numpy": np.__version__,
                            "ldm_runtime": ldm_runtime.__version__,
                            "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}
    try:
        info["loadavg_1m"] = round(os.getloadavg()[0], 2)
    except OSError:
        pass
    try:
        import onnxruntime

        info["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        pass
    return info

"""The one writer of bench records (bench/results/<name>.json), shared by run.py and gpu.py.

Imports only the standard library and torch, so the GPU harness can use it on a machine without Ray.
"""

from __future__ import annotations

import json
import os
import platform
from datetime import datetime, timezone
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"


def cpu_model() -> str | None:
    """The CPU's model name as /proc/cpuinfo gives it (Linux); None elsewhere."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return None
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), None)


def machine() -> dict:
    return {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        # what `fgdata plan` reads to tell a GPU measurement from a CPU one
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "load_average": [round(v, 2) for v in os.getloadavg()],  # the machine may be shared: how busy it was
        "cpu_model": cpu_model(),  # figures from another CPU are not this machine's
    }


def write_result(name: str, payload: dict, results: Path = RESULTS, file_name: str | None = None, quiet: bool = False) -> Path:
    """Writes `payload` as the record `name` (the planner dispatches on it) to results/<file_name or name>.json."""
    results.mkdir(parents=True, exist_ok=True)
    payload = {"benchmark": name, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": machine(), **payload}
    path = results / f"{file_name or name}.json"
    path.write_text(json.dumps(payload, indent=2) + "\n")
    if not quiet:
        print(json.dumps(payload, indent=2))
    return path

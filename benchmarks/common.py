"""Shared benchmark shell: machine description, timing, and JSON output beside every number."""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from qtmio.atomic import write_text_atomic

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def machine_info() -> dict[str, Any]:
    """CPU model and count, and the GPU name when torch sees one (torch imported only if installed)."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info: dict[str, Any] = {"cpu": cpu, "cpu_count": os.cpu_count(), "python": platform.python_version()}
    try:
        import torch

        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return info


def best_time(fn: Callable[[], Any], *, repeats: int = 3) -> float:
    """Best wall-clock seconds of `repeats` calls of fn (fn must block until its work is done)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def write_results(name: str, figures: dict[str, Any], *, out_dir: Path | None = None) -> Path:
    """Write {machine, figures} to results/<name>.json and print the figures."""
    out_dir = out_dir or RESULTS_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    record = {"benchmark": name, "machine": machine_info(), "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "figures": figures}
    path = out_dir / f"{name}.json"
    write_text_atomic(path, json.dumps(record, indent=2, default=float))
    print(f"== {name} ({record['machine']['cpu']}, {record['machine']['cpu_count']} cpus"
          + (f", {record['machine']['gpu']}" if "gpu" in record["machine"] else "") + ")")
    for key, value in figures.items():
        print(f"   {key}: {value}")
    return path

"""What a benchmark ran on, for its table and JSON line."""

from __future__ import annotations

import json
import os
import platform


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (platform.processor() elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def print_result(result: dict, out_dir: str | None, filename: str) -> None:
    """Prints the benchmark's final JSON line; with `out_dir`, also saves it there."""
    line = json.dumps(result)
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, filename), "w") as f:
            f.write(line + "\n")
    print(line)

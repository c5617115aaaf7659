"""Results files under benchmarks/results/: one per benchmark and device, every run kept.

A `.json` results file holds

    {"benchmark": ..., "device": ..., "script": ..., "runs": [run, run, ...]}

where a run is {"date", "variant", "script", "env", "rows", ...} (oldest first), so a new
run is appended instead of overwriting the last one. `.jsonl` files hold one run per line
and are appended to with `>>`. benchmarks/results/INDEX.md lists every file.
"""

from __future__ import annotations

import datetime
import json
import os
from pathlib import Path


def select_run(data: dict, variant: str | None = None) -> dict:
    """The last run named `variant` (the last run if None). A bare run (a dict with no
    "runs", as older scripts wrote) is returned as it is."""
    if "runs" not in data:
        return data
    runs = [r for r in data["runs"] if variant is None or r.get("variant") == variant]
    if not runs:
        names = sorted({str(r.get("variant")) for r in data["runs"]})
        raise KeyError(f"no run {variant!r} in the results file (runs: {', '.join(names)})")
    return runs[-1]


class RunWriter:
    """Appends one run to a results file, rewritten whole after each `write` (atomically,
    so a run that hits its time limit keeps every row written so far)."""

    def __init__(self, path, *, benchmark: str, script: str, variant: str, env: dict):
        self.path = Path(path)
        if self.path.exists():
            with open(self.path) as f:
                self.data = json.load(f)
            if "runs" not in self.data:  # a bare run written by an older script
                self.data = {"benchmark": benchmark, "runs": [self.data]}
        else:
            self.data = {"benchmark": benchmark, "runs": []}
        self.data.setdefault("device", env.get("device"))
        self.data.setdefault("script", script)
        date = env.get("date") or datetime.date.today().isoformat()
        self.run = {"date": date, "variant": variant, "script": script, "env": env}
        self.data["runs"].append(self.run)

    def write(self, **fields) -> None:
        """Set the run's fields (rows, method, ...) and rewrite the file."""
        self.run.update(fields)
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "w") as f:
            json.dump(self.data, f, indent=1, ensure_ascii=False)
            f.write("\n")
        os.replace(tmp, self.path)

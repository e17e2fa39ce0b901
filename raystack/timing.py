"""Start-up marks for `bench/startup.py`: with IMMUNIZE_STARTUP_LOG=FILE set, each process appends one JSON
line per mark (event, wall time, pid, rank); unset, `mark` does nothing. Ray workers inherit the variable
through the job's runtime environment (`raysession.init_ray`)."""

from __future__ import annotations

import json
import os
import time

ENV = "IMMUNIZE_STARTUP_LOG"


def process_start_time(pid: int | str = "self") -> float:
    """Wall-clock time at which a process started (Linux /proc), for 'from process start' phases."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    start_ticks = int(fields[19])  # field 22 of stat, counted after the command name
    with open("/proc/stat") as f:
        boot = next(int(line.split()[1]) for line in f if line.startswith("btime"))
    return boot + start_ticks / os.sysconf("SC_CLK_TCK")


def mark(event: str, **extra) -> None:
    path = os.environ.get(ENV)
    if not path:
        return
    line = json.dumps({"event": event, "t": time.time(), "pid": os.getpid(), **extra})
    with open(path, "a") as f:  # one short write per line: lines from several processes do not interleave
        f.write(line + "\n")

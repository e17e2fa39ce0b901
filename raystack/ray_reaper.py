"""Parent-death watch for an embedded Ray: `python -m raystack.ray_reaper MARKER`.

The driver starts this with a pipe on stdin and keeps the write end. When the driver ends in any way
(SIGKILL included) the kernel closes the pipe; this process then ends every process that carries
`IMMUNIZE_RAY_SESSION=MARKER` in its environment (GCS, raylet, dashboard and runtime-env agents, workers:
all inherit it from the driver) and removes Ray's temporary folder for that session. Ray's own fate-sharing
stops the GCS and raylet, but not the agents the raylet starts.
Only the standard library loads here: it must start in milliseconds.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import time

ENV = "IMMUNIZE_RAY_SESSION"


def session_pids(marker: str) -> list[int]:
    """Processes of this user whose environment holds ENV=marker (other than this one)."""
    needle = f"{ENV}={marker}".encode()
    me, out = os.getpid(), []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == me:
            continue
        try:
            with open(f"/proc/{name}/environ", "rb") as f:
                if needle in f.read().split(b"\0"):
                    out.append(int(name))
        except OSError:  # gone, or not ours
            continue
    return out


def reap(marker: str, grace: float = 3.0) -> int:
    """SIGTERM the session's processes, SIGKILL what is left after `grace` seconds; returns how many."""
    pids = session_pids(marker)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except OSError:
                pass
        deadline = time.time() + grace
        while sig == signal.SIGTERM and time.time() < deadline and session_pids(marker):
            time.sleep(0.1)
        pids = session_pids(marker)
        if not pids:
            break
    return len(pids)


def main(argv: list[str]) -> None:
    marker, temp_dir = argv[1], argv[2]
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C goes to the driver, which shuts Ray down itself
    try:
        while sys.stdin.buffer.read(1 << 16):  # returns b"" once the driver has gone
            pass
    except OSError:
        pass
    reap(marker)
    if os.path.basename(temp_dir).startswith("immunize-ray-"):
        shutil.rmtree(temp_dir, ignore_errors=True)


if __name__ == "__main__":
    main(sys.argv)

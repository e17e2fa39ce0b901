"""Parent-death watch for an embedded Ray: `python -m raystack.ray_reaper MARKER TEMP_DIR DRIVER_PID`.

The driver starts this with a pipe on stdin and keeps the write end. While the driver lives, this process
records the driver's descendants four times a second (the GCS, the raylet and what the raylet starts: dashboard and
runtime-env agents, workers). When the driver ends in any way (SIGKILL included) the kernel closes the pipe;
this process then ends every recorded descendant still alive (same pid *and* start time, so a reused pid is
never hit) and every process carrying `IMMUNIZE_RAY_SESSION=MARKER` in its environment, and removes Ray's
temporary folder of that session. Ray's own fate-sharing stops the GCS and raylet, but not the agents the
raylet starts (they are re-parented and keep running). Only the standard library loads here.
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


def _stat(pid: int) -> tuple[int, int] | None:
    """(parent pid, start time) of `pid`, or None if it is gone (a zombie is gone: it only waits to be
    collected, and a container's init may never collect it)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        if fields[0] in (b"Z", b"X"):
            return None
        return int(fields[1]), int(fields[19])
    except (OSError, IndexError, ValueError):
        return None


def _process_tree() -> tuple[dict[int, list[int]], dict[int, int]]:
    """({parent: [children]}, {pid: start time}) of every process now."""
    children: dict[int, list[int]] = {}
    starts: dict[int, int] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            st = _stat(int(name))
            if st is not None:
                children.setdefault(st[0], []).append(int(name))
                starts[int(name)] = st[1]
    return children, starts


def _below(roots: list[int], children: dict[int, list[int]], starts: dict[int, int]) -> dict[int, int]:
    out, stack = {}, [c for r in roots for c in children.get(r, [])]
    while stack:
        pid = stack.pop()
        if pid not in out and pid in starts:
            out[pid] = starts[pid]
            stack.extend(children.get(pid, []))
    return out


def descendants(root: int) -> dict[int, int]:
    """{pid: start time} of every process below `root`."""
    children, starts = _process_tree()
    return _below([root], children, starts)


def _alive(recorded: dict[int, int], marker: str) -> list[int]:
    """The recorded processes still alive (same start time), what they have started since, and every process
    carrying the session's marker."""
    me = os.getpid()
    children, starts = _process_tree()
    live = [p for p, start in recorded.items() if p != me and starts.get(p) == start]
    pids = set(live) | set(_below(live, children, starts)) | set(session_pids(marker))
    pids.discard(me)
    return sorted(pids)


def reap(marker: str, recorded: dict[int, int] | None = None, grace: float = 3.0, settle: float = 1.0,
         deadline: float = 30.0) -> int:
    """SIGTERM the session's processes, SIGKILL what is left after `grace` seconds, and keep killing until none
    has been seen for `settle` seconds (a raylet killed mid-fork leaves a child that appears only after the
    first pass: seen once in CI as a RuntimeEnvAgent outliving the driver); returns how many are left."""
    recorded = recorded or {}
    end = time.time() + deadline
    pids = _alive(recorded, marker)
    for pid in pids:
        _kill(pid, signal.SIGTERM)
    stop_waiting = time.time() + grace
    while time.time() < stop_waiting and _alive(recorded, marker):
        time.sleep(0.1)
    quiet_since = None
    while time.time() < end:
        pids = _alive(recorded, marker)
        if pids:
            quiet_since = None
            for pid in pids:
                _kill(pid, signal.SIGKILL)
        elif quiet_since is None:
            quiet_since = time.time()
        elif time.time() - quiet_since >= settle:
            return 0
        time.sleep(0.1)
    return len(_alive(recorded, marker))


def _kill(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except OSError:
        pass


def main(argv: list[str]) -> None:
    import select

    marker, temp_dir, driver = argv[1], argv[2], int(argv[3])
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C goes to the driver, which shuts Ray down itself
    recorded: dict[int, int] = {}
    fd = sys.stdin.fileno()
    driver_start = (_stat(driver) or (0, None))[1]
    while True:
        ready, _, _ = select.select([fd], [], [], 0.25)
        if ready:
            try:
                if not os.read(fd, 1 << 16):  # b"": the driver has gone
                    break
            except OSError:
                break
        if (_stat(driver) or (0, None))[1] != driver_start:  # gone (or its pid reused): never record a stranger's
            break
        recorded.update(descendants(driver))
    reap(marker, recorded)
    if os.path.basename(temp_dir).startswith("immunize-ray-"):
        shutil.rmtree(temp_dir, ignore_errors=True)


if __name__ == "__main__":
    main(sys.argv)

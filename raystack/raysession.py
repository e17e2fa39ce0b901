"""Starting or joining Ray for a command: which cluster, whether the job fits, and an embedded Ray that ends
with its driver.

- `--cluster auto` means a cluster the user started: RAY_ADDRESS, or the head that `ray start` recorded on
  this machine. Ray's own "auto" also joins any GCS it finds in `ps` (another command's short-lived embedded
  Ray): we resolve the address ourselves and say which cluster was joined.
- The job must fit: workers x (1 CPU or 1 GPU) against this machine (embedded) or the cluster's totals, before
  any worker starts, with the numbers in the error.
- An embedded Ray gets a private temporary folder (so no other process's `auto` finds it), token
  authentication with a per-process token held in the environment (nothing written to ~/.ray), and a
  parent-death watch (`ray_reaper`) that ends all of its processes when the driver dies, SIGKILL included.
"""

from __future__ import annotations

import os
import sys
import time

from .errors import UserError
from .ray_reaper import ENV as SESSION_ENV
from .timing import ENV as TIMING_ENV

_reaper = None  # the watch process of this driver's embedded Ray (kept so its pipe stays open)


def check_reachable(address: str, flag: str = "--cluster", timeout: float = 5.0) -> None:
    """A host:port Ray address must accept a TCP connection before ray.init retries it for minutes."""
    import socket

    if address in ("auto", "local"):
        return
    hostport = address.split("://", 1)[-1]
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise UserError(f"{flag} {address}: expected HOST:PORT, ray://HOST:PORT or auto")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as e:
        raise UserError(f"{flag} {address}: unreachable ({e.strerror or type(e).__name__})") from None


def resolve_auto(flag: str = "--cluster") -> str:
    """What `auto` joins: RAY_ADDRESS, else the head `ray start --head` recorded on this machine; never a GCS
    found by scanning processes (that may be another command's embedded Ray)."""
    env = os.environ.get("RAY_ADDRESS")
    if env:
        return env
    from ray._private.utils import read_ray_address

    recorded = read_ray_address()
    if not recorded:
        raise UserError(f"{flag} auto: no cluster to join (RAY_ADDRESS is not set and no `ray start --head` ran on "
                        "this machine); start one, or give --cluster HOST:PORT")
    check_reachable(recorded, f"{flag} auto (recorded by ray start)")
    return recorded


def local_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def check_local_capacity(workers: int, use_gpu: bool, flag: str = "--workers", per_worker_note: str = "",
                         fix: str | None = None) -> None:
    """An embedded Ray places one worker per core (or GPU) of this machine: refuse more, with the numbers.
    `fix`: what to do, naming the caller's own flags (default: `use <flag> <cores> or less`)."""
    if use_gpu:
        import torch

        gpus = torch.cuda.device_count()
        if workers > gpus:
            raise UserError(f"{flag} {workers} --use-gpu: this machine has {gpus} GPU(s){per_worker_note}; "
                            "use fewer workers or a --cluster")
        return
    cores = local_cpus()
    if workers > cores:
        raise UserError(f"{flag} {workers}: this machine has {cores} CPU core(s) and each worker needs one"
                        f"{per_worker_note}; {fix or f'use {flag} {cores} or less'}, or a --cluster")


def ray_running_here() -> bool:
    """This process is already connected to a Ray (a Tune trial, a test session); checked without importing it."""
    ray = sys.modules.get("ray")
    return ray is not None and ray.is_initialized()


def embedded_here() -> bool:
    """This process started its own embedded Ray (it ends with this process)."""
    return _reaper is not None


def will_embed(cluster: str | None) -> bool:
    """True when the command would start its own Ray (no cluster named, none in the environment, none running
    in this process)."""
    return not (cluster or os.environ.get("RAY_ADDRESS") or ray_running_here())


def check_cluster_capacity(workers: int, use_gpu: bool, wait_s: float | None, flag: str = "--workers",
                           hint: str | None = None) -> None:
    """The joined cluster's total CPUs/GPUs must hold the workers. With `wait_s` (an autoscaling cluster) wait
    that long for it to grow; without it, fail at once with the numbers. `hint`: the advice in the error line
    (default: harden's --placement-timeout)."""
    import ray

    key = "GPU" if use_gpu else "CPU"
    deadline = time.time() + (wait_s or 0)
    while True:
        total = ray.cluster_resources().get(key, 0)
        if total >= workers:
            return
        if time.time() >= deadline:
            hint = hint or ("waited --placement-timeout" if wait_s else
                            "if it autoscales, pass --placement-timeout SECONDS to wait for it to grow")
            raise UserError(f"{flag} {workers}: the cluster has {total:g} {key}(s) in total and each worker needs one "
                            f"({hint})")
        time.sleep(2)


def init_ray(cluster: str | None, use_gpu: bool, num_cpus: int) -> str:
    """Join --cluster (or RAY_ADDRESS), else start an embedded local Ray with `num_cpus` logical CPUs.
    Returns a line saying which Ray this is."""
    import ray

    # DeepSpeed's accelerator said either way: a DS_ACCELERATOR=cpu of the driver's environment (a shell's, or
    # quiet_libraries' guess) must not reach GPU workers, where DeepSpeed would run its CPU accelerator
    runtime_env = {"env_vars": {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore",
                                "DS_ACCELERATOR": "cuda" if use_gpu else "cpu",
                                **({TIMING_ENV: os.environ[TIMING_ENV]} if os.environ.get(TIMING_ENV) else {})}}
    if cluster and cluster != "auto":
        check_reachable(cluster, "--cluster")  # a named cluster must answer, even where Ray already runs
    if ray.is_initialized():
        return "the Ray this process already runs in"
    address = resolve_auto() if cluster == "auto" else cluster or os.environ.get("RAY_ADDRESS")
    if address:
        if not cluster:
            check_reachable(address, "RAY_ADDRESS")
        try:
            ray.init(address=address, runtime_env=runtime_env, log_to_driver=False, logging_level="ERROR")
        except Exception as e:  # noqa: BLE001 - ray raises many kinds for a bad address
            raise UserError(f"--cluster {address}: cannot connect to a Ray cluster "
                            f"({type(e).__name__}: {str(e).splitlines()[0][:160]})") from None
        res = ray.cluster_resources()
        return (f"joined the Ray cluster at {address} ({len(ray.nodes())} node(s), {res.get('CPU', 0):g} CPUs, "
                f"{res.get('GPU', 0):g} GPUs)")
    start_embedded(num_cpus, runtime_env)
    return f"started an embedded Ray ({num_cpus} logical CPUs) that ends with this command"


def start_embedded(num_cpus: int, runtime_env: dict) -> None:
    import secrets
    import subprocess
    import tempfile

    import ray

    global _reaper
    temp_dir = tempfile.mkdtemp(prefix="immunize-ray-", dir="/tmp")  # short: AF_UNIX paths <= 107 bytes
    marker = secrets.token_hex(8)
    env = {k: v for k, v in os.environ.items() if k != SESSION_ENV}
    _reaper = subprocess.Popen([sys.executable, "-m", "raystack.ray_reaper", marker, temp_dir, str(os.getpid())],
                               stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               env=env, start_new_session=True, close_fds=True)
    os.environ[SESSION_ENV] = marker  # every Ray process started from here inherits it: the reaper's handle
    if os.environ.get("RAY_AUTH_MODE", "token").lower() == "token" and not os.environ.get("RAY_AUTH_TOKEN"):
        os.environ["RAY_AUTH_MODE"] = "token"
        os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)  # this Ray's own token, never written to disk
        from ray._raylet import Config

        Config.initialize("")  # Ray reads RAY_AUTH_MODE into its config at import: refresh it (as ray.init does)
    ray.init(num_cpus=num_cpus, include_dashboard=False, runtime_env=runtime_env, log_to_driver=False,
             logging_level="ERROR", _temp_dir=temp_dir)


def exit_leaving_ray_to_reaper(code) -> None:
    """End this process now, its outputs written: the embedded Ray it started is stopped by the reaper (which
    sees the driver's pipe close, then ends every process of the session and removes its temporary folder), not
    by `ray.shutdown` at exit (~1.4 s), and the interpreter's own teardown of torch and friends (~1.2 s) is
    skipped. Only for the `immunize-cli` process itself (cli.main.run), never for an in-process caller."""
    if code is not None and not isinstance(code, int):  # sys.exit("message"): what Python would print
        sys.stderr.write(f"{code}\n")
        code = 1
    code = code or 0
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001 - a closed pipe: nothing more can be said
            pass
    os._exit(code)

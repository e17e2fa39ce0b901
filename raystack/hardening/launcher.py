"""Driver side of `harden`: validate, start or join Ray, submit the TorchTrainer, show progress,
assemble `--out` from the final checkpoint (atomically), write the manifest."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Callable

from ..errors import UserError
from .spec import HardenSpec

MANIFEST = "manifest.json"


def validate_inputs(spec: HardenSpec) -> None:
    """Everything that can be checked before any worker starts, each failure naming its flag."""
    from ..imageio import read_image_folder
    from ..models.pipeline_io import check_pipeline_folder, resolve_model_path

    if spec.out is None:
        raise UserError("--out is required")
    if spec.out.exists() and not spec.overwrite and not spec.resume:
        raise UserError(f"--out {spec.out}: already exists (pass --overwrite to replace it)")
    check_writable(spec.out, "--out")
    model = resolve_model_path(spec.model)
    check_pipeline_folder(model, "--model")
    if spec.outer_timestep_range:
        sched = Path(model) / "scheduler" / "scheduler_config.json"
        n = json.loads(sched.read_text()).get("num_train_timesteps", 1000) if sched.is_file() else 1000
        if spec.outer_timestep_range[1] > n:
            raise UserError(f"--outer-timesteps {spec.outer_timesteps}: the model has {n} timesteps (0-{n})")
    for t in spec.target:
        read_image_folder(t, flag="--target")
    if spec.legal is not None:
        read_image_folder(spec.legal, flag="--legal")
    if spec.cluster:
        check_reachable(spec.cluster)
    if spec.zero_stage == 3 and spec.method in ("imma", "imma+freeze"):
        raise UserError("--zero-stage 3: IMMA updates the simulated attacker's adapter by hand inside the UNet, "
                        "which ZeRO-3 partitions across ranks; use --zero-stage 0, 1 or 2 "
                        "(FreezeAsGuard and random-freeze run under ZeRO-3)")


def check_writable(out: Path, flag: str) -> None:
    """The nearest existing ancestor of `out` must take a new file (probed, then removed)."""
    import tempfile

    probe = Path(out).resolve().parent
    while not probe.exists():
        probe = probe.parent
    try:
        if not probe.is_dir():
            raise OSError
        fd, name = tempfile.mkstemp(prefix=".immunize-probe-", dir=probe)
        os.close(fd)
        os.unlink(name)
    except OSError:
        raise UserError(f"{flag} {out}: not writable") from None


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


def connect_ray(spec: HardenSpec, num_cpus: int | None = None) -> None:
    init_ray(spec.cluster, spec.use_gpu, num_cpus or max(2, spec.workers + 1))


def init_ray(cluster: str | None, use_gpu: bool, num_cpus: int) -> None:
    """Join --cluster (or RAY_ADDRESS), else start an embedded local Ray with `num_cpus` logical CPUs."""
    import ray

    runtime_env = {"env_vars": {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore",
                                **({} if use_gpu else {"DS_ACCELERATOR": "cpu"})}}
    if cluster:
        check_reachable(cluster, "--cluster")  # a named cluster must answer, even where Ray already runs
    if ray.is_initialized():
        return
    address = cluster or os.environ.get("RAY_ADDRESS")
    if address:
        if not cluster:
            check_reachable(address, "RAY_ADDRESS")
        try:
            ray.init(address=address, runtime_env=runtime_env, log_to_driver=False, logging_level="ERROR")
        except Exception as e:  # noqa: BLE001 - ray raises many kinds for a bad address
            raise UserError(f"--cluster {address}: cannot connect to a Ray cluster "
                            f"({type(e).__name__}: {str(e).splitlines()[0][:160]})") from None
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=False, runtime_env=runtime_env,
                 log_to_driver=False, logging_level="ERROR")


def _progress_actor():
    import ray

    @ray.remote(num_cpus=0)
    class Progress:
        def __init__(self):
            self.state = None

        def update(self, phase, step, total, losses):
            self.state = {"phase": phase, "step": step, "total": total, "losses": losses}

        def get(self):
            return self.state

    return Progress.remote()


def worker_config(spec: HardenSpec) -> dict:
    """The spec as plain values, every path absolute: workers run in another directory (or machine)."""
    from ..models.pipeline_io import resolve_model_path

    cfg = {k: (str(v) if isinstance(v, Path) else [str(x) for x in v] if isinstance(v, list) else v)
           for k, v in spec.__dict__.items()}
    cfg["model"] = str(resolve_model_path(spec.model).resolve())
    cfg["target"] = [str(Path(t).resolve()) for t in spec.target]
    cfg["legal"] = str(Path(spec.legal).resolve()) if spec.legal is not None else None
    cfg["out"] = str(Path(spec.out).resolve())
    return cfg


def run_dir_for(spec: HardenSpec) -> Path:
    return spec.out.parent / f"{spec.out.name}.run"


def run_harden(spec: HardenSpec, on_progress: Callable[[dict], None] | None = None,
               fault_injection: dict | None = None) -> dict:
    """Submit the job, wait, assemble outputs; returns the manifest."""
    validate_inputs(spec)
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from .job import spec_from_config, train_loop  # noqa: F401 - imported so the worker can import it too

    t0 = time.time()
    connect_ray(spec)
    run_dir = run_dir_for(spec).resolve()
    name = "harden"
    if (run_dir / name).exists() and not spec.resume:
        shutil.rmtree(run_dir / name)  # a fresh run; --resume continues the one there
    progress = _progress_actor()
    cfg = worker_config(spec)
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"spec": cfg, "progress": progress, "fault_injection": fault_injection},
        scaling_config=ScalingConfig(num_workers=spec.workers, use_gpu=spec.use_gpu,
                                     resources_per_worker=None if spec.use_gpu else {"CPU": 1}),
        torch_config=TorchConfig(backend="nccl" if spec.use_gpu else "gloo"),
        run_config=RunConfig(name=name, storage_path=str(run_dir),
                             failure_config=FailureConfig(max_failures=spec.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2)),
    )
    box: dict = {}

    def fit():
        try:
            box["result"] = trainer.fit()
        except BaseException as e:  # noqa: BLE001 - reported on the driver thread
            box["error"] = e

    th = threading.Thread(target=fit, daemon=True)
    th.start()
    while th.is_alive():
        th.join(0.5)
        if on_progress is not None:
            try:
                state = ray.get(progress.get.remote(), timeout=5)
            except Exception:  # noqa: BLE001 - progress is cosmetic
                state = None
            if state:
                on_progress(state)
    if "error" in box:
        raise RuntimeError(f"the Ray Train job failed: {_describe(box['error'])}")
    result = box["result"]
    if result.error is not None:
        raise RuntimeError(f"the Ray Train job failed: {result.error}")
    with result.checkpoint.as_directory() as d:
        manifest = assemble_outputs(spec, Path(d), time.time() - t0)
    return manifest


def _describe(err: BaseException) -> str:
    """The first worker's own exception, not Ray's wrapper."""
    failures = getattr(err, "worker_failures", None)
    if failures:
        rank, exc = sorted(failures.items())[0]
        lines = [ln for ln in str(exc).splitlines() if ln.strip()]
        return f"rank {rank}: {lines[-1][:300] if lines else type(exc).__name__}"
    return f"{type(err).__name__}: {(str(err).splitlines() or [''])[0][:300]}"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def hash_tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): _sha256(p) for p in sorted(Path(root).rglob("*")) if p.is_file()}


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("immunize-cli", "torch", "ray", "deepspeed", "diffusers", "transformers", "peft", "safetensors"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


def assemble_outputs(spec: HardenSpec, ckpt_dir: Path, wall: float) -> dict:
    import torch

    from ..atomic import atomic_dir
    from ..freeze_mask import MASK_FILE, save_freeze_mask
    from ..models.pipeline_io import EXTRA_INFO, load_pipeline, resolve_model_path
    from ..specs import spec_to_yaml_dict
    from .job import MASK_KEY_PREFIX, RESULT_FILE, _load_tensors

    tensors, meta = _load_tensors(ckpt_dir / RESULT_FILE)
    src = resolve_model_path(spec.model)
    pipe = load_pipeline(src)
    theta = {k[len("theta/"):]: v for k, v in tensors.items() if k.startswith("theta/")}
    params = dict(pipe.unet.named_parameters())
    unknown = sorted(set(theta) - set(params))
    if unknown:
        raise RuntimeError(f"hardened tensors do not match the model: {unknown[0]}")
    with torch.no_grad():
        for k, v in theta.items():
            params[k].copy_(v)
    mask = {k[len(MASK_KEY_PREFIX):]: bool(v.item()) for k, v in tensors.items() if k.startswith(MASK_KEY_PREFIX)}
    with atomic_dir(spec.out, overwrite=True) as tmp:
        pipe.save_pretrained(str(tmp), safe_serialization=True)
        ratio = None
        if mask:
            if set(mask) != set(params):
                raise RuntimeError("the learned mask does not cover the UNet's parameters")
            ratio = save_freeze_mask(tmp / MASK_FILE, {n: mask[n] for n in params},
                                     {"method": spec.method, "rho": spec.rho})
        info = {"hardening": {"method": spec.method, "against": spec.against if "imma" in spec.method else None,
                              "rho": spec.rho if mask else None, "frozen_ratio": ratio}}
        (tmp / EXTRA_INFO).write_text(json.dumps(info, indent=2))
        manifest = {
            "method": spec.method,
            "spec": spec_to_yaml_dict(spec),
            "seed": spec.seed,
            "source_model": str(src),
            "source_model_sha256": hash_tree(src),
            "changed_tensors": sorted(theta),
            "frozen_ratio": ratio,
            "final_losses": meta.get("losses", {}),
            "world_size": meta.get("world_size"),
            "resumed_from": meta.get("resumed_from"),
            "worker_seconds": meta.get("wall_seconds"),
            "wall_seconds": round(wall, 2),
            "versions": _versions(),
        }
        manifest["files"] = hash_tree(tmp)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return manifest

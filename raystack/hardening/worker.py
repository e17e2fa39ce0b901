"""The worker side of `harden`: one Ray Train worker (Train V2), one DeepSpeed rank.

`train_loop`: load the pipeline, then for each phase of the method (method.py): build it, put its defender
parameters in a DeepSpeed engine, resume from Ray Train's latest checkpoint if there is one (else `prepare`),
step, report checkpoints every N steps (every rank reports; rank 0 writes the files), and end with a report
that carries the result. The driver (driver.py) assembles `--out` from that last checkpoint.
"""

from __future__ import annotations

import copy
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..checkpoint import load_tensors, save_tensors
from ..distributed import rank as get_rank, world_size
from ..models.pipeline_io import load_pipeline
from ..runtime import compute_precision, configure_threads, seed_everything
from ..specs import build_spec
from ..timing import mark
from .method import LocalEngine, load_into_unet
from .spec import HardenSpec

STATE_FILE = "state.safetensors"
RESULT_FILE = "result.safetensors"
MASK_KEY_PREFIX = "mask/"
WORKER_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE",
              "TRANSFORMERS_VERBOSITY": "error", "DIFFUSERS_VERBOSITY": "error", "HF_HUB_OFFLINE": "1",
              "PYTHONWARNINGS": "ignore"}


def build_phase(phase_cls, spec, pipe, rank: int, world: int, local: bool = False):
    """A phase with its defender parameters in a DeepSpeed engine (or, `local` or when it trains none, its own
    torch optimizer), bound together."""

    phase = phase_cls(spec, pipe, rank, world)
    if local or phase.engine_module() is None:
        engine = LocalEngine(phase)
    else:
        from .engine import Engine

        engine = Engine(phase, spec)
    phase.bind(engine)
    return phase, engine


@dataclass
class MethodRun:
    """What running a method's phases gave: the release's changed tensors and mask, the last losses, and where
    a resumed attempt picked the run up (None: from the start)."""

    changed: dict
    mask: dict | None
    losses: dict
    resumed_from: dict | None


def run_method(spec, pipe, rank: int = 0, world: int = 1, resume: tuple[dict, dict] = ({}, {}),
               local: bool = False, on_step: Callable | None = None, on_checkpoint: Callable | None = None) -> MethodRun:
    """The method's phases in order on `pipe` (one rank): build, resume or prepare, step, checkpoint, result.

    `resume`: (tensors, meta) of a checkpoint `on_checkpoint(phase, engine, meta, carried)` was given;
    `local`: each phase's own torch optimizer instead of DeepSpeed (one process: tests, probes);
    `on_step(phase, done, losses)` after every step."""

    resume_tensors, resume_meta = resume
    carried: dict = {}  # UNet tensors changed by finished phases (IMMA's θ for imma+freeze), by released name
    if resume_meta.get("carried"):
        carried = {k[len("carried/"):]: v for k, v in resume_tensors.items() if k.startswith("carried/")}
    all_phases = spec.phases()
    start_phase = resume_meta.get("phase_index", 0)
    resumed_from = {"phase": all_phases[start_phase].name if start_phase < len(all_phases) else None,
                    "step": int(resume_meta.get("step", 0))} if resume_meta else None
    mask: dict | None = None
    losses: dict = resume_meta.get("losses", {})
    for pi, phase_cls in enumerate(all_phases):
        if pi < start_phase:
            continue
        if carried:
            load_into_unet(pipe.unet, carried, released_names=True)
        phase, engine = build_phase(phase_cls, spec, pipe, rank, world, local=local)
        start = 0
        if pi == start_phase and resume_meta.get("step"):
            phase.load_state({k[len("state/"):]: v for k, v in resume_tensors.items() if k.startswith("state/")})
            if hasattr(engine, "load_state"):
                engine.load_state(resume_tensors)
            start = int(resume_meta["step"])
            print(f"[immunize] rank {rank}: resumed {phase.name} at step {start}", flush=True)
        else:
            with compute_precision(spec.precision, pipe.device.type):
                losses.update(phase.prepare())
        for step in range(start, phase.total_steps()):
            with compute_precision(spec.precision, pipe.device.type):
                stepped = phase.step()
            losses = {k: v for k, v in stepped.items() if v is not None}
            done = step + 1
            if on_step is not None:
                on_step(phase, done, losses)
            if on_checkpoint is not None and done % spec.checkpoint_every == 0 and done < phase.total_steps():
                on_checkpoint(phase, engine, {"phase_index": pi, "step": done, "losses": losses}, carried)
        res = phase.result()
        carried.update(res.changed)
        mask = res.mask if res.mask is not None else mask
        phase.finish()
        if hasattr(engine, "close"):
            engine.close()
        if on_checkpoint is not None and pi < len(all_phases) - 1:  # a checkpoint that starts the next phase
            on_checkpoint(None, None, {"phase_index": pi + 1, "step": 0, "losses": losses}, carried)
    return MethodRun(carried, mask, losses, resumed_from)


def train_loop(config: dict) -> None:
    """Runs on every Ray Train worker: `run_method` with Ray Train's checkpoints and the driver's progress."""

    mark("worker_entered")
    for k, v in WORKER_ENV.items():
        os.environ.setdefault(k, v)

    configure_threads(1)
    import ray.train

    spec = build_spec(HardenSpec, config["spec"], source="worker").localize_inputs()  # URIs: this machine's copy
    progress = config.get("progress")
    rank, world = get_rank(), world_size()
    mark("worker_imported", rank=rank)
    if rank == 0 and progress is not None:  # the driver's sign that the workers were placed
        progress.update.remote("loading", 0, spec.steps, {})
    fault = config.get("fault_injection") or {}

    resume_tensors, resume_meta = {}, {}
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            if (Path(d) / RESULT_FILE).is_file():  # killed after the final report: the result is already made
                with tempfile.TemporaryDirectory() as out:
                    if rank == 0:
                        shutil.copy2(Path(d) / RESULT_FILE, Path(out) / RESULT_FILE)
                    ray.train.report({"final": 1}, checkpoint=ray.train.Checkpoint.from_directory(out))
                mark("worker_done", rank=rank)
                return
            resume_tensors, resume_meta = load_tensors(Path(d) / STATE_FILE)
            mine = Path(d) / _rank_file(get_rank())
            if mine.exists():
                resume_tensors["state/rng/generator"] = load_tensors(mine)[0]["rng/generator"]

    last_shown = [0.0]

    def on_step(phase, done, losses):
        ends = done == 1 or done == phase.total_steps()
        if ends:
            mark("first_step" if done == 1 else "last_step", rank=rank, phase=phase.name)
        # the driver's bar polls twice a second: one actor call per 0.25 s is enough (and not one per step)
        if rank == 0 and progress is not None and (ends or time.time() - last_shown[0] >= 0.25):
            progress.update.remote(phase.name, done, phase.total_steps(), losses)
            last_shown[0] = time.time()
        if fault.get("rank") == rank and fault.get("step") == done and not _fault_fired(fault):
            _mark_fault(fault)
            time.sleep(float(fault.get("delay", 0)))  # let the controller take the last report first
            os._exit(1)  # fault injection: this worker dies once

    pipe = seeded_pipeline(spec)
    mark("pipeline_loaded", rank=rank)
    t0 = time.time()
    run = run_method(spec, pipe, rank, world, (resume_tensors, resume_meta), on_step=on_step,
                     on_checkpoint=lambda phase, engine, meta, carried: _report(phase, engine, meta, carried, rank))
    # final report: the result itself
    with tempfile.TemporaryDirectory() as d:
        if rank == 0:
            write_result(Path(d), run, world, time.time() - t0)
        ray.train.report({"final": 1, **run.losses}, checkpoint=ray.train.Checkpoint.from_directory(d))
    mark("worker_done", rank=rank)


def seeded_pipeline(spec):
    """The job's pipeline as every worker starts it: every RNG seeded from --seed, then loaded on the worker's
    device (a GPU when asked for and present)."""
    import torch

    seed_everything(spec.seed)
    pipe = load_pipeline(spec.model, device="cuda" if spec.use_gpu and torch.cuda.is_available() else "cpu")
    if spec.gradient_checkpointing:
        pipe.unet.enable_gradient_checkpointing()
    return pipe


def write_result(folder: Path, run: "MethodRun", world: int, seconds: float) -> None:
    """The result file the driver assembles `--out` from: the changed tensors, the mask, the last losses."""
    import torch

    tensors = {f"theta/{k}": v for k, v in run.changed.items()}
    for name, frozen in (run.mask or {}).items():
        tensors[MASK_KEY_PREFIX + name] = torch.tensor([1 if frozen else 0], dtype=torch.uint8)
    save_tensors(folder / RESULT_FILE, tensors or {"empty": torch.zeros(1)},
                 {"losses": run.losses, "wall_seconds": round(seconds, 2), "world_size": world, "final": True,
                  "resumed_from": run.resumed_from})


def run_in_this_process(spec, folder: Path, on_step: Callable | None = None) -> None:
    """A one-worker job's `train_loop` in the calling process, without a Ray Train group: for a Tune trial,
    which already is a Ray worker holding its CPU (or GPU), a fresh Train controller and worker cost more than
    a short hardening (bench/startup.py). The same code runs — the method's phases in a DeepSpeed engine on a
    one-process gloo group, seeded as a worker seeds — and writes the same result file into `folder`."""
    import socket

    import torch.distributed as dist

    from ..runtime import configure_threads

    if spec.workers != 1:
        raise ValueError("run_in_this_process runs one-worker jobs only")
    spec = copy.copy(spec).localize_inputs()  # a copy, not checked again: the caller's spec keeps its URIs
    configure_threads(1)
    # what a Ray Train worker's environment holds for DeepSpeed (a launcher's ranks; the CPU accelerator)
    env = {**WORKER_ENV, "LOCAL_RANK": "0", "RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
           **({} if spec.use_gpu else {"DS_ACCELERATOR": "cpu"})}
    saved = {k: os.environ.get(k) for k in env}
    for k, v in env.items():
        os.environ.setdefault(k, v)
    if not dist.is_initialized():
        # one process group for the process's life: DeepSpeed keeps a handle on the first one, so a later trial in
        # a reused process must find the same group, not a destroyed and re-made one
        with socket.socket() as sock:  # a free local port for the one-process group
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    elif dist.get_world_size() != 1:
        raise RuntimeError("run_in_this_process: this process is already in a group of several ranks")
    try:
        pipe = seeded_pipeline(spec)
        t0 = time.time()
        run = run_method(spec, pipe, 0, 1, on_step=on_step)
        write_result(folder, run, 1, time.time() - t0)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _report(phase, engine, meta: dict, carried: dict, rank: int) -> None:
    import ray.train
    import torch

    with tempfile.TemporaryDirectory() as d:
        tensors = {}
        if phase is not None:
            tensors.update({f"state/{k}": v for k, v in phase.state().items()})
            if hasattr(engine, "optimizer_state"):
                tensors.update(engine.optimizer_state())
        tensors.update({f"carried/{k}": v for k, v in carried.items()})
        meta = {**meta, "carried": bool(carried)}
        if rank == 0:
            save_tensors(Path(d) / STATE_FILE, tensors or {"empty": torch.zeros(1)}, meta)
        if phase is not None:  # every rank draws its own noise: each keeps its own RNG (Ray merges the files)
            save_tensors(Path(d) / _rank_file(rank), {"rng/generator": phase.generator.get_state()}, {})
        ray.train.report({"step": meta["step"], "phase_index": meta["phase_index"], **meta["losses"]},
                         checkpoint=ray.train.Checkpoint.from_directory(d))


def _rank_file(rank: int) -> str:
    return f"rng-rank{rank}.safetensors"


def _fault_fired(fault: dict) -> bool:
    return Path(fault["marker"]).exists()


def _mark_fault(fault: dict) -> None:
    Path(fault["marker"]).write_text("fired")

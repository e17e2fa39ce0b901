"""`harden` as a Ray Train job: one TorchTrainer (Train V2), one DeepSpeed rank per worker.

Worker side (`train_loop`): load the pipeline, build the method's recipe, put the defender's parameters
in a DeepSpeed engine, resume from Ray Train's latest checkpoint if there is one, step, report
checkpoints every N steps (every rank reports; rank 0 writes the files) and a final one with the result.
Driver side (`run_harden`): start or join Ray, submit, show progress, then assemble `--out` atomically
from the final checkpoint (so it works when the workers are on other machines).
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

from ..errors import UserError

STATE_FILE = "state.safetensors"
RESULT_FILE = "result.safetensors"
MASK_KEY_PREFIX = "mask/"
WORKER_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE",
              "TRANSFORMERS_VERBOSITY": "error", "DIFFUSERS_VERBOSITY": "error", "HF_HUB_OFFLINE": "1",
              "PYTHONWARNINGS": "ignore"}


def make_recipe(spec, pipe, rank: int, world: int, phase: str):
    from .freezeasguard import FreezeAsGuardRecipe
    from .imma import IMMARecipe

    if phase == "imma":
        return IMMARecipe(spec, pipe, rank, world)
    return FreezeAsGuardRecipe(spec, pipe, rank, world)


def bind_phase(spec, pipe, rank: int, world: int, phase: str):
    """The phase's recipe with its defender parameters in a DeepSpeed engine, wired together."""
    from .engine import Engine

    recipe = make_recipe(spec, pipe, rank, world, phase)
    engine = Engine(recipe, spec, world)
    if phase == "imma":
        recipe.bind(engine, after_inner=engine.refresh_master_weights)
    else:
        recipe.bind(engine, gather=engine.gather)
    return recipe, engine


def phases(method: str) -> list[str]:
    return {"imma": ["imma"], "freezeasguard": ["freezeasguard"], "imma+freeze": ["imma", "freezeasguard"],
            "random-freeze": []}[method]


def spec_from_config(cfg: dict):
    from .spec import HardenSpec

    d = dict(cfg)
    d["target"] = [Path(t) for t in d.get("target", [])]
    for k in ("legal", "out"):
        if d.get(k) is not None:
            d[k] = Path(d[k])
    return HardenSpec(**d)


def _save_tensors(path: Path, tensors: dict, meta: dict) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata={"immunize": json.dumps(meta)})


def _load_tensors(path: Path) -> tuple[dict, dict]:
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["immunize"])
    return load_file(str(path)), meta


def train_loop(config: dict) -> None:
    """Runs on every Ray Train worker."""
    for k, v in WORKER_ENV.items():
        os.environ.setdefault(k, v)
    from ..runtime import configure_threads

    configure_threads(1)
    import ray.train
    import torch

    from ..models.pipeline_io import load_pipeline
    from ..runtime import seed_everything
    from .comm import rank as get_rank
    from .comm import world_size
    spec = spec_from_config(config["spec"])
    progress = config.get("progress")
    rank, world = get_rank(), world_size()
    if rank == 0 and progress is not None:  # the driver's sign that the workers were placed
        progress.update.remote("loading", 0, spec.steps, {})
    device = "cuda" if spec.use_gpu and torch.cuda.is_available() else "cpu"
    fault = config.get("fault_injection") or {}

    resume_tensors, resume_meta = {}, {}
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            resume_tensors, resume_meta = _load_tensors(Path(d) / STATE_FILE)
            mine = Path(d) / _rank_file(get_rank())
            if mine.exists():
                resume_tensors["state/rng/generator"] = _load_tensors(mine)[0]["rng/generator"]

    seed_everything(spec.seed)
    pipe = load_pipeline(spec.model, device=device)
    carried: dict = {}  # tensors from finished phases (IMMA's θ for imma+freeze)
    if resume_meta.get("carried"):
        carried = {k[len("carried/"):]: v for k, v in resume_tensors.items() if k.startswith("carried/")}
    all_phases = phases(spec.method)
    start_phase = resume_meta.get("phase_index", 0)
    # where this attempt picked the run up (None: from the start), kept in the manifest
    resumed_from = {"phase": all_phases[start_phase] if start_phase < len(all_phases) else None,
                    "step": int(resume_meta.get("step", 0))} if resume_meta else None
    result: dict = {}
    losses: dict = resume_meta.get("losses", {})
    t0 = time.time()

    for pi, phase in enumerate(all_phases):
        if pi < start_phase:
            continue
        if carried:
            _apply_released(pipe.unet, carried)
        recipe, engine = bind_phase(spec, pipe, rank, world, phase)
        start = 0
        if pi == start_phase and resume_meta.get("step"):
            recipe.load_state_tensors({k[len("state/"):]: v for k, v in resume_tensors.items()
                                       if k.startswith("state/")})
            if phase != "imma":
                recipe.load_logits(resume_tensors["state/mask/logits"])
            engine.load_state(resume_tensors)
            start = int(resume_meta["step"])
            print(f"[immunize] rank {rank}: resumed {phase} at step {start}", flush=True)
        elif phase != "imma":
            losses.update(recipe.prepare())
        for step in range(start, spec.steps):
            stats = recipe.step()
            losses = {k: v for k, v in stats.items() if v is not None}
            done = step + 1
            if rank == 0 and progress is not None:
                progress.update.remote(phase, done, spec.steps, losses)
            if fault.get("rank") == rank and fault.get("step") == done and not _fault_fired(fault):
                _mark_fault(fault)
                time.sleep(float(fault.get("delay", 0)))  # let the controller take the last report first
                os._exit(1)  # fault injection: this worker dies once
            if done % spec.checkpoint_every == 0 and done < spec.steps:
                _report(recipe, engine, {"phase_index": pi, "step": done, "losses": losses}, carried, rank, phase)
        if phase == "imma":
            carried = recipe.changed_tensors()
        else:
            result["mask"] = recipe.final_mask()
        recipe.finish()
        if pi < len(all_phases) - 1:  # phase boundary: a checkpoint that starts the next phase
            _report(None, None, {"phase_index": pi + 1, "step": 0, "losses": losses}, carried, rank, phase)

    if spec.method == "random-freeze":
        from .freezeasguard import random_mask

        result["mask"] = random_mask([n for n, _ in pipe.unet.named_parameters()], spec.rho, spec.seed)
    # final report: the result itself
    with tempfile.TemporaryDirectory() as d:
        if rank == 0:
            tensors = {f"theta/{k}": v for k, v in carried.items()}
            for name, frozen in result.get("mask", {}).items():
                tensors[MASK_KEY_PREFIX + name] = torch.tensor([1 if frozen else 0], dtype=torch.uint8)
            _save_tensors(Path(d) / RESULT_FILE, tensors or {"empty": torch.zeros(1)},
                          {"losses": losses, "wall_seconds": round(time.time() - t0, 2), "world_size": world,
                           "final": True, "resumed_from": resumed_from})
        ray.train.report({"final": 1, **losses}, checkpoint=ray.train.Checkpoint.from_directory(d))


def _apply_released(unet, tensors: dict) -> None:
    import torch

    params = dict(unet.named_parameters())
    with torch.no_grad():
        for k, v in tensors.items():
            params[k].copy_(v)


def _report(recipe, engine, meta: dict, carried: dict, rank: int, phase: str) -> None:
    import ray.train
    import torch

    with tempfile.TemporaryDirectory() as d:
        tensors = {}
        if recipe is not None:
            tensors.update({f"state/{k}": v for k, v in recipe.state_tensors().items()})
            tensors.update(engine.optimizer_state())
        tensors.update({f"carried/{k}": v for k, v in carried.items()})
        meta = {**meta, "carried": bool(carried), "phase": phase}
        if rank == 0:
            _save_tensors(Path(d) / STATE_FILE, tensors or {"empty": torch.zeros(1)}, meta)
        if recipe is not None:  # every rank draws its own noise: each keeps its own RNG (Ray merges the files)
            _save_tensors(Path(d) / _rank_file(rank), {"rng/generator": recipe.generator.get_state()}, {})
        ray.train.report({"step": meta["step"], "phase_index": meta["phase_index"], **meta["losses"]},
                         checkpoint=ray.train.Checkpoint.from_directory(d))


def _rank_file(rank: int) -> str:
    return f"rng-rank{rank}.safetensors"


def _fault_fired(fault: dict) -> bool:
    return Path(fault["marker"]).exists()


def _mark_fault(fault: dict) -> None:
    Path(fault["marker"]).write_text("fired")

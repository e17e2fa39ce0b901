"""Driver side of `harden`: validate, start or join Ray, submit the TorchTrainer, show progress,
assemble `--out` from the final checkpoint (atomically), write the manifest."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Callable

from ..atomic import disk_full, is_disk_full, sha256_file
from ..errors import DiskFull, RunFailed, UserError
from ..outputs import (OUTPUT_MARKER, check_disjoint, check_replaceable, confined_rmtree, make_output_dir,
                       output_lock, shown)
from ..storage import fetched_from, has_objects, is_uri, local_input, remove_prefix, uri_with
from ..raysession import (check_cluster_capacity, check_local_capacity, check_reachable, embedded_here, init_ray,
                          ray_running_here, will_embed)
from .spec import HardenSpec
from ..timing import mark
from ..atomic import atomic_dir
from ..checkpoint import load_tensors
from ..diffusion import encode_prompts, unet_predict
from ..freeze_mask import MASK_FILE, save_freeze_mask
from ..imageio import read_image_folder
from ..models.pipeline_io import (EXTRA_INFO, check_component_shapes, check_pipeline_folder, config_geometry, is_sdxl_folder, is_shipped_tiny_world, resolve_model_path, weights_variant)
from ..models.single_file import PROVENANCE_FILE
from ..planning import header_shapes
from ..release_card import source_license
from ..signing import SIGNATURE_FILE
from ..specs import spec_to_dict
from ..verification import PICKLED_SUFFIXES
from .erase import ERASERS, concept_words
from .method import load_into_unet
from .methods import method_names, method_phases
from .worker import MASK_KEY_PREFIX, RESULT_FILE, run_in_this_process, train_loop

MANIFEST = "manifest.json"

#: Ray Train settings for a short job (the user's own environment wins): the controller polls the workers
#: every 0.2 s instead of 2 s (a finished or failed worker is noticed at once: up to ~2 s at start and at end),
#: and no metrics callbacks. `bench/startup.py` measures them against Ray's defaults.
TRAIN_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2", "RAY_TRAIN_METRICS_ENABLED": "0"}
#: only for the embedded Ray (one machine, nothing to preempt): no preemption-watcher actor
EMBEDDED_TRAIN_ENV = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}


def validate_inputs(spec: HardenSpec) -> None:
    """Everything that can be checked before any worker starts, each failure naming its flag."""

    if spec.out is None:
        raise UserError("--out is required")
    if spec.out.exists() and not spec.overwrite and not spec.resume:
        raise UserError(f"--out {shown(str(spec.out))}: already exists (pass --overwrite to replace it)")
    check_writable(spec.out, "--out")
    model = resolve_model_path(spec.model)
    local_inputs = [("--target", t) for t in spec.target if not is_uri(t)]
    if spec.legal is not None and not is_uri(spec.legal):
        local_inputs.append(("--legal", spec.legal))
    check_disjoint(spec.out, [("--model", model), *local_inputs], with_run_dir=True)
    check_replaceable(spec.out)
    check_replaceable(run_dir_for(spec), "--out's run folder")
    check_pipeline_folder(model, "--model")
    check_component_shapes(model, "--model")

    if (is_sdxl_folder(model) and spec.against == "textual-inversion" and spec.attacker_space is None
            and any(p.simulates_attacker for p in spec.phases())):
        raise UserError("--against textual-inversion: not built for SDXL (the new token needs an embedding in both "
                        "text encoders); simulate lora, dreambooth-lora, dreambooth or full")
    if spec.resolution is not None:
        check_resolution_for_model(model, spec.resolution)
    if spec.outer_timestep_range:
        sched = Path(model) / "scheduler" / "scheduler_config.json"
        n = json.loads(sched.read_text()).get("num_train_timesteps", 1000) if sched.is_file() else 1000
        if spec.outer_timestep_range[1] > n:
            raise UserError(f"--outer-timesteps {spec.outer_timesteps}: the model has {n} timesteps (0-{n})")
    erasing = any(p.name in ("uce", "esd-x", "ablation") for p in spec.phases()) or \
        spec.imma_objective == "hold-erasure"  # its goal is the anchor caption's prediction
    for t in spec.target:
        folder = read_image_folder(local_input(t, "--target"), flag="--target", check_only=True)
        if erasing:
            from .erase import check_erase_captions, check_uce_anchor

            check_erase_captions(spec, [c or "" for c in folder.captions], f"--target {t}")
            if any(p.name == "uce" for p in spec.phases()):
                check_uce_anchor(spec, model, [c or "" for c in folder.captions])
    if spec.legal is not None:
        read_image_folder(local_input(spec.legal, "--legal"), flag="--legal", check_only=True)
    if spec.sign_key is not None:
        from ..signing import load_private_key

        check_disjoint(spec.out, [("--sign-key", spec.sign_key)], with_run_dir=True)
        load_private_key(spec.sign_key)
    if spec.cluster:
        check_reachable(spec.cluster)
    if will_embed(spec.cluster):
        check_local_capacity(spec.workers, spec.use_gpu)
    elif ray_running_here():  # a Tune trial, a test session: the Ray this process is connected to
        check_cluster_capacity(spec.workers, spec.use_gpu, spec.placement_timeout)

    no_zero3 = [p for p in spec.phases() if not p.supports_zero3]
    if spec.zero_stage == 3 and no_zero3:
        others = [m for m in method_names() if all(p.supports_zero3 for p in method_phases(m))]
        raise UserError(f"--zero-stage 3: {no_zero3[0].name} {no_zero3[0].zero3_reason}, which ZeRO-3 partitions "
                        f"across ranks; use --zero-stage 0, 1 or 2 ({', '.join(others)} run under ZeRO-3)")


def check_resolution_for_model(model: Path, resolution: int, flag: str = "--resolution") -> None:
    """The model's own multiple (VAE factor x UNet down-sampling), from its configs, before anything starts."""

    geometry = config_geometry(model)
    if geometry is None:
        return  # check_pipeline_folder has named what is wrong with the configs
    step = geometry[1]
    if resolution % step:
        raise UserError(f"{flag} {resolution}: this model needs a multiple of {step} (VAE factor x UNet down-sampling)")


def erase_record(spec: HardenSpec) -> dict | None:
    """What was erased, for the manifest and the release's info (None: nothing)."""

    method = spec.erase or (spec.method if spec.method in ERASERS else None)
    if method is None:
        return None
    record = {"method": method, "concept": concept_words(spec), "anchor": spec.anchor,
              "steps": None if method == "uce" else spec.erase_steps}
    if method == "esd-x":  # which goal: the default changed from the empty prompt to the anchor caption
        record.update(guidance=spec.esd_guidance, neutral=spec.esd_neutral)
    return record


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
        raise UserError(f"{flag} {shown(str(out))}: not writable") from None


def connect_ray(spec: HardenSpec, num_cpus: int | None = None) -> str:
    """Start or join Ray for a harden run; a cluster joined here must hold the workers (an embedded Ray, or the
    one this process already runs in, was checked by `validate_inputs`)."""
    joins = not will_embed(spec.cluster) and not ray_running_here()
    line = init_ray(spec.cluster, spec.use_gpu, num_cpus or max(2, spec.workers + 1))
    if joins:
        check_cluster_capacity(spec.workers, spec.use_gpu, spec.placement_timeout)
    return line


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

    def absolute(p):  # a URI travels as it is: each worker's machine fetches it (`HardenSpec.localize_inputs`)
        return p if is_uri(p) else str(Path(p).resolve())

    cfg = spec_to_dict(spec)
    cfg["model"] = spec.model if is_uri(spec.model) else str(resolve_model_path(spec.model).resolve())
    cfg["target"] = [absolute(t) for t in spec.target]
    cfg["legal"] = absolute(spec.legal) if spec.legal is not None else None
    cfg["out"] = str(Path(spec.out).resolve())
    return cfg


def run_dir_for(spec: HardenSpec) -> Path:
    return spec.out.parent / f"{spec.out.name}.run"


#: how long a cluster that can hold the workers in total may keep them waiting (busy) without --placement-timeout
DEFAULT_BUSY_WAIT_S = 600.0


def run_harden(spec: HardenSpec, on_progress: Callable[[dict], None] | None = None,
               fault_injection: dict | None = None, on_info: Callable[[str], None] | None = None,
               validated: bool = False, in_this_process: bool = False, run_storage: str | None = None) -> dict:
    """Submit the job, wait, assemble outputs; returns the manifest. Holds the lock on `--out` (and its run
    folder) from before Ray starts until the output is committed. `validated`: the caller has just run
    `validate_inputs(spec)` (the CLI does, before its progress bar), so it is not run twice.
    `in_this_process` (Tune trials of one-worker jobs): the worker's code runs here, no Ray Train group
    (`worker.run_in_this_process`); same result, no checkpoints to resume from. `run_storage`: an object-storage
    URI for the run's checkpoints instead of `<out>.run` (a release bound for object storage: every node writes
    its checkpoints there, and `--resume` reads them back)."""
    if not validated:
        validate_inputs(spec)
    with output_lock(spec.out, "--out", with_run_dir=True):
        if spec.out.exists() and not spec.overwrite and not spec.resume:  # made while we waited for Ray's import
            raise UserError(f"--out {shown(str(spec.out))}: already exists (pass --overwrite to replace it)")
        if in_this_process:
            return _run_in_this_process(spec)
        return _run_harden_locked(spec, on_progress, fault_injection, on_info, run_storage)


def _run_in_this_process(spec: HardenSpec) -> dict:
    import tempfile

    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="immunize-result-") as d:
        run_in_this_process(spec, Path(d))
        return assemble_outputs(spec, Path(d), time.time() - t0)


def _run_harden_locked(spec: HardenSpec, on_progress, fault_injection, on_info, run_storage=None) -> dict:
    t0 = time.time()
    line = connect_ray(spec)
    mark("ray_ready")
    if on_info is not None:
        on_info(line)
    run_dir = run_storage or run_dir_for(spec).resolve()
    fresh_run_dir = not (has_objects(run_dir, "--out") if run_storage else run_dir.exists())
    try:
        manifest = _fit_and_assemble(spec, on_progress, fault_injection, run_dir, t0)
    except BaseException as e:
        full = is_disk_full(e)
        if (full or isinstance(e, RunFailed)) and fresh_run_dir and not spec.resume:
            if run_storage:  # no litter: nothing in it is worth resuming
                remove_prefix(run_storage, "--out")
            else:
                confined_rmtree(run_dir, run_dir.parent)
        if full and not isinstance(e, DiskFull):
            raise disk_full(spec.out, e) from None
        raise
    # a run in object storage is removed by the caller once the release is uploaded (an upload that fails can
    # then be retried with --resume from the same checkpoints)
    if not run_storage and not spec.keep_run and (spec.out / MANIFEST).is_file():
        try:
            remove_finished_run(run_dir_for(spec))  # --out is written: nothing left to resume
        except (UserError, OSError) as e:  # the release is complete: a leftover run folder is only untidy
            if on_info is not None:
                on_info(f"left {run_dir_for(spec)} in place ({str(e).splitlines()[0][:120]})")
    return manifest


def remove_finished_run(run_dir: Path) -> None:
    """Remove what this tool wrote in `<out>.run` (Ray Train's `harden` folder), then the folder if that left it
    empty; never through a symlink, never anything else in it."""
    if run_dir.is_symlink() or not run_dir.is_dir():
        return
    confined_rmtree(run_dir / "harden", run_dir)
    marker = run_dir / OUTPUT_MARKER
    text = marker.read_text() if marker.is_file() else None
    marker.unlink(missing_ok=True)
    try:
        run_dir.rmdir()
    except OSError:  # something else is in it: left alone, still marked as ours
        if text is not None:
            marker.write_text(text)


def _fit_and_assemble(spec: HardenSpec, on_progress, fault_injection, run_dir: Path, t0: float) -> dict:
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    for k, v in {**TRAIN_ENV, **(EMBEDDED_TRAIN_ENV if embedded_here() else {})}.items():
        os.environ.setdefault(k, v)  # read by TorchTrainer.fit here and passed on to its controller
    name = "harden"
    if is_uri(run_dir):  # Ray Train writes and reads the checkpoints there itself (its storage_path)
        if not spec.resume:
            remove_prefix(uri_with(run_dir, f"/{name}"), "--out")  # a fresh run; --resume continues the one there
    else:
        make_output_dir(run_dir)
        if (run_dir / name).exists() and not spec.resume:
            confined_rmtree(run_dir / name, run_dir)  # a fresh run; --resume continues the one there
        elif spec.resume:
            drop_cut_snapshot(run_dir / name)
    progress = _progress_actor()
    cfg = worker_config(spec)
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"spec": cfg, "progress": progress, "fault_injection": fault_injection},
        scaling_config=ScalingConfig(num_workers=spec.workers, use_gpu=spec.use_gpu,
                                     resources_per_worker=None if spec.use_gpu else {"CPU": 1}),
        torch_config=TorchConfig(backend="nccl" if spec.use_gpu else "gloo"),
        run_config=RunConfig(name=name, storage_path=run_dir if is_uri(run_dir) else str(run_dir),
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
    mark("fit_called")
    th.start()
    placed, started = False, time.time()
    wait_s = spec.placement_timeout or DEFAULT_BUSY_WAIT_S
    while th.is_alive():
        th.join(0.5)
        try:
            state = ray.get(progress.get.remote(), timeout=5)
        except Exception:  # noqa: BLE001 - progress is cosmetic
            state = None
        placed = placed or state is not None
        if not placed and time.time() - started > wait_s:
            raise UserError(f"--workers {spec.workers}: the cluster did not place the workers within {wait_s:.0f} s "
                            f"(each needs 1 {'GPU' if spec.use_gpu else 'CPU'}; free: "
                            f"{ray.available_resources().get('GPU' if spec.use_gpu else 'CPU', 0):g}); "
                            "free resources or pass a longer --placement-timeout")
        if state and on_progress is not None:
            on_progress(state)
    if "error" in box:
        raise RuntimeError(f"the Ray Train job failed: {_describe(box['error'])}")
    result = box["result"]
    if result.error is not None:
        raise RuntimeError(f"the Ray Train job failed: {_describe(result.error)}")
    mark("fit_returned")
    with result.checkpoint.as_directory() as d:
        manifest = assemble_outputs(spec, Path(d), time.time() - t0)
    return manifest


#: Ray Train's list of a run's checkpoints (ray.train.v2 CHECKPOINT_MANAGER_SNAPSHOT_FILENAME)
RAY_SNAPSHOT = "checkpoint_manager_snapshot.json"


def drop_cut_snapshot(experiment: Path) -> bool:
    """Ray Train rewrites its checkpoint list in place (truncate, then write): a run killed in between leaves it
    empty or cut, and Ray then cannot resume at all. Such a list is removed, so `--resume` starts the run over
    (the same weights, later) instead of failing; returns True when it was."""
    snap = experiment / RAY_SNAPSHOT
    if not snap.is_file():
        return False
    try:
        json.loads(snap.read_text())
        return False
    except (ValueError, UnicodeDecodeError):
        snap.unlink()
        return True


def _describe(err: BaseException) -> str:
    """The first worker's own exception, not Ray's wrapper."""
    failures = getattr(err, "worker_failures", None)
    if failures:
        rank, exc = sorted(failures.items())[0]
        lines = [ln for ln in str(exc).splitlines() if ln.strip()]
        return f"rank {rank}: {lines[-1][:300] if lines else type(exc).__name__}"
    return f"{type(err).__name__}: {(str(err).splitlines() or [''])[0][:300]}"


def hash_tree(root: Path) -> dict[str, str]:
    """SHA-256 of every file under `root`, but this tool's output marker (it names the command and the time)."""
    return {str(p.relative_to(root)): sha256_file(p) for p in sorted(Path(root).rglob("*"))
            if p.is_file() and p.relative_to(root) != Path(OUTPUT_MARKER)}


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
    from ..models.pipeline_io import EXTRA_INFO, load_pipeline, resolve_model_path

    tensors, meta = load_tensors(ckpt_dir / RESULT_FILE)
    src = resolve_model_path(spec.model)
    theta = {k[len("theta/"):]: v for k, v in tensors.items() if k.startswith("theta/")}
    mask = {k[len(MASK_KEY_PREFIX):]: bool(v.item()) for k, v in tensors.items() if k.startswith(MASK_KEY_PREFIX)}
    copied = copyable_release(src, theta, mask)  # a mask-only release: the source's files, never loaded
    pipe = None
    if copied is None:
        pipe = load_pipeline(src)
        check_finite_release(theta)
        load_into_unet(pipe.unet, theta)
        if theta:
            check_release_forward(pipe)
    params = copied if copied is not None else [n for n, _ in pipe.unet.named_parameters()]
    with atomic_dir(spec.out, overwrite=True) as tmp:
        if pipe is not None:
            pipe.save_pretrained(str(tmp), safe_serialization=True)
            left_out = keep_source_components(src, tmp)  # the safety checker and feature extractor
        else:
            copy_model_files(src, tmp)
            left_out = []
        travelling = copy_source_notices(src, tmp)  # license, notice and the source's own card
        ratio = None
        if mask:
            if set(mask) != set(params):
                raise RuntimeError("the learned mask does not cover the UNet's parameters")
            ratio = save_freeze_mask(tmp / MASK_FILE, {n: mask[n] for n in params},
                                     {"method": spec.method, "rho": spec.rho})

        simulated = any(p.simulates_attacker for p in spec.phases())
        erased = erase_record(spec)
        against = spec.against if simulated else None
        if spec.attacker_space is not None:  # robust hardening: the drawn pool, as simulated
            from .attacker_pool import describe, draw_pool

            against = {"attacker_space": relative_to_out(spec.attacker_space, spec.out),
                       "restart": spec.attacker_restart, "pool": [describe(a) for a in draw_pool(spec)]}
        info = {"hardening": {"method": spec.method, "against": against,
                              "rho": spec.rho if mask else None, "frozen_ratio": ratio,
                              **({"erase": erased} if erased else {})}}
        (tmp / EXTRA_INFO).write_text(json.dumps(info, indent=2))
        manifest = {
            "method": spec.method,
            "spec": recorded_spec(spec),
            "seed": spec.seed,
            "source_model": source_identity(src),
            "source_model_sha256": hash_tree(src),
            "erase": erased,
            "changed_tensors": sorted(theta),
            "frozen_ratio": ratio,
            "final_losses": meta.get("losses", {}),
            "world_size": meta.get("world_size"),
            "resumed_from": meta.get("resumed_from"),
            "worker_seconds": meta.get("wall_seconds"),
            "wall_seconds": round(wall, 2),
            "versions": _versions(),
        }
        manifest["copied_from_source"] = travelling
        manifest["left_out_from_source"] = left_out
        manifest["files"] = hash_tree(tmp)
        from ..verification import COVERS

        manifest["covers"] = COVERS
        manifest_bytes = json.dumps(manifest, indent=2).encode()
        (tmp / MANIFEST).write_bytes(manifest_bytes)
        from ..release_card import CARD_FILE, make_card

        # after the hashes: the card is the publisher's to edit (verify lists it as not covered)
        source = manifest["source_model"]
        hub_id = source.split("@")[0] if "@" in source and not is_uri(source) else None
        (tmp / CARD_FILE).write_text(make_card(manifest, src, license_id=source_license_id(src),
                                               base_model=hub_id))  # a hub download: its id is the base model
        if spec.sign_key is not None:
            from ..signing import SIGNATURE_FILE, load_private_key, sign_manifest

            (tmp / SIGNATURE_FILE).write_bytes(sign_manifest(manifest_bytes, load_private_key(spec.sign_key)))
    return manifest


def copyable_release(src: Path, theta: dict, mask: dict) -> list[str] | None:
    """The UNet's tensor names when the release can be the source folder's own files plus the mask (no tensor
    changed, the mask names exactly the UNet's tensors, every weight file safetensors in the standard layout);
    else None (the pipeline is loaded and saved). Copying never loads or re-serialises a model: FreezeAsGuard's
    and Random-ρ's releases of an SDXL checkpoint skip ~14 GB of reading, converting and writing."""

    if theta or not mask or weights_variant(src) is not None:
        return None
    components = _index_components(src)
    if components is None or not set(components) <= COPYABLE_COMPONENTS:
        return None  # e.g. a safety checker, which the loaded pipeline leaves out
    for f in (p for c in components for p in (src / c).rglob("*")):
        if f.is_symlink() or (f.is_file() and not _plain_file(f.name)):
            return None
    names = list(header_shapes(src / "unet"))
    return names if set(names) == set(mask) else None


#: components a mask-only release copies (those `load_pipeline` keeps); any other named component: load + save
COPYABLE_COMPONENTS = {"unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler",
                       "safety_checker", "feature_extractor"}


def _plain_file(name: str) -> bool:
    """What save_pretrained itself writes: configs, tokenizer files, and safetensors weights without a variant
    infix (diffusion_pytorch_model.safetensors, its shards model-00001-of-00002.safetensors)."""
    if name.endswith(".safetensors"):
        return name.count(".") == 1
    return name.endswith((".json", ".txt")) and ".fp16." not in name and ".bf16." not in name


def _index_components(src: Path) -> list[str] | None:
    """The component folders model_index.json names (those it sets to null are not part of the pipeline);
    None if one it names is not a plain folder."""
    index = json.loads((src / "model_index.json").read_text())
    names = [k for k, v in index.items() if not k.startswith("_") and isinstance(v, list) and v and v[0] is not None]
    return names if all((src / k).is_dir() and not (src / k).is_symlink() for k in names) else None


def copy_source_notices(src: Path, dest: Path) -> list[str]:
    """The source's other top-level files (LICENSE, NOTICE, its own model card as README.source.md, ...), byte
    for byte: a license such as SD-1.5's OpenRAIL-M must travel with derivatives. Weight files there (a
    single-file checkpoint beside the pipeline), links, and the model's and this tool's own records are not
    copied; returns what was, as named in dest."""
    import shutil

    not_notices = {"model_index.json", MANIFEST, SIGNATURE_FILE, ".gitattributes", EXTRA_INFO, OUTPUT_MARKER}
    copied = []
    for f in sorted(Path(src).iterdir()):
        if f.is_symlink() or not f.is_file() or f.name in not_notices or \
                f.name.lower().endswith((".safetensors", *PICKLED_SUFFIXES)):
            continue
        name = "README.source.md" if f.name == "README.md" else f.name
        shutil.copyfile(f, dest / name)
        copied.append(name)
    return copied


def source_license_id(src: Path) -> str:
    """The release card's license: the source card's, apache-2.0 for the shipped tiny world (this project's),
    else "other" (the copied license file says which)."""

    return source_license(src) or ("apache-2.0" if is_shipped_tiny_world(src) else "other")


def source_identity(src: Path) -> str:
    """What the manifest records as the source: "tinyworld" for the shipped model, else the source folder's name
    (a hub snapshot: the repository id and revision) — never a path of the publisher's machine; its content is
    `source_model_sha256`."""
    from ..models.pipeline_io import is_shipped_tiny_world

    real = Path(os.path.realpath(str(src)))
    if is_shipped_tiny_world(real):
        return "tinyworld"
    if real.parent.name == "snapshots" and real.parent.parent.name.startswith("models--"):
        return f"{real.parent.parent.name[len('models--'):].replace('--', '/')}@{real.name}"

    uri = fetched_from(real)
    if uri is not None:  # fetched from object storage: its URI
        return uri
    if (real / PROVENANCE_FILE).is_file():  # converted from a single-file checkpoint: that file, by name and hash
        try:
            prov = json.loads((real / PROVENANCE_FILE).read_text())
            return f"{prov['single_file']} (single file, sha256 {prov['sha256']})"
        except (OSError, ValueError, KeyError, TypeError):
            pass
    return real.name


def keep_source_components(src: Path, dest: Path) -> list[str]:
    """A loaded-and-saved release keeps the source's safety checker and feature extractor (loading leaves them
    out): their folders copied byte for byte and model_index.json naming them as the source does. A folder with
    pickled weights is left out (a release holds safetensors only); returns what was left out, and why."""
    import shutil

    from ..verification import PICKLED_SUFFIXES

    index_src = json.loads((Path(src) / "model_index.json").read_text())
    index = json.loads((dest / "model_index.json").read_text())
    changed, left_out = False, []
    for name in ("safety_checker", "feature_extractor"):
        entry = index_src.get(name)
        folder = Path(src) / name
        if not (isinstance(entry, list) and entry and entry[0] is not None and folder.is_dir()):
            continue
        files = [f for f in folder.rglob("*") if f.is_file() or f.is_symlink()]
        if folder.is_symlink() or any(f.is_symlink() or f.name.lower().endswith(PICKLED_SUFFIXES) for f in files):
            left_out.append(f"{name}: pickled weights or links (convert it to safetensors to keep it)")
            continue
        shutil.copytree(folder, dest / name, dirs_exist_ok=True)
        index[name] = entry
        changed = True
    if changed:
        if "requires_safety_checker" in index_src:
            index["requires_safety_checker"] = index_src["requires_safety_checker"]
        (dest / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return left_out


def copy_model_files(src: Path, dest: Path) -> None:
    """model_index.json and the component folders it names, byte for byte."""
    import shutil

    shutil.copyfile(src / "model_index.json", dest / "model_index.json")
    for c in _index_components(src) or []:
        for f in sorted((src / c).rglob("*")):
            if f.is_file():
                target = dest / f.relative_to(src)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(f, target)


def check_finite_release(tensors: dict) -> None:
    """Refuse to release weights holding NaN or inf (a diverged run), before anything is written."""
    import torch

    bad = [k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise RunFailed(f"the hardened weights are not finite: {len(bad)} of {len(tensors)} changed UNet tensors hold "
                        f"NaN or inf (e.g. {bad[0]}); nothing was written to --out (the run diverged: lower "
                        "--outer-lr, or check the data)")


def check_release_forward(pipe) -> None:
    """One denoising prediction of the hardened UNet must be finite: finite but absurd weights (a run at a huge
    learning rate leaves |w| ~ 1e30) overflow here, and such a model is refused like a NaN one."""
    import torch

    unet = pipe.unet
    side = min(16, int(unet.config.sample_size))
    g = torch.Generator().manual_seed(0)

    with torch.no_grad():
        cond = encode_prompts(pipe, [""])
        x = torch.randn(1, unet.config.in_channels, side, side, generator=g)
        t = torch.tensor([pipe.scheduler.config.num_train_timesteps // 2])
        pred = unet_predict(unet, x.to(unet.dtype), t, cond.to(unet.dtype))
    if not bool(torch.isfinite(pred).all()):
        raise RunFailed("the hardened UNet predicts NaN or inf (the run diverged: its weights reach "
                        f"{max(float(p.detach().abs().max()) for p in unet.parameters()):.3g}); nothing was written to "
                        "--out (lower --outer-lr, or check the data)")


def relative_to_out(path, out: Path) -> str:
    """A path as the manifest records it: relative to --out, so no absolute local path leaks into a release
    (the shipped tiny world is recorded by name)."""
    from ..models.pipeline_io import is_shipped_tiny_world

    if is_shipped_tiny_world(path):
        return "tinyworld"
    return os.path.relpath(os.path.realpath(str(path)), os.path.realpath(str(out)))


def recorded_spec(spec: HardenSpec) -> dict:
    """The spec as the manifest records it: paths relative to --out, the signing key's location left out."""
    from ..models.pipeline_io import resolve_model_path
    from ..specs import spec_to_dict

    d = spec_to_dict(spec)
    d["out"] = "."
    d["sign_key"] = None
    d["model"] = spec.model if is_uri(spec.model) else relative_to_out(resolve_model_path(spec.model), spec.out)
    d["target"] = [t if is_uri(t) else relative_to_out(t, spec.out) for t in spec.target]
    d["legal"] = None if spec.legal is None else spec.legal if is_uri(spec.legal) else relative_to_out(spec.legal,
                                                                                                         spec.out)
    if spec.attacker_space is not None:
        d["attacker_space"] = relative_to_out(spec.attacker_space, spec.out)
    return d


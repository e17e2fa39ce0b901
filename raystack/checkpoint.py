"""Training state (modules, optimizers, counters) as one safetensors file: resumable and never pickled."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .atomic import atomic_write_bytes


def flatten_optimizer(prefix: str, sd: dict, tensors: dict, meta: dict) -> None:
    import torch

    scalars: dict[str, dict[str, Any]] = {}
    for idx, st in sd["state"].items():
        for key, val in st.items():
            if isinstance(val, torch.Tensor):
                tensors[f"{prefix}/state/{idx}/{key}"] = val.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(idx), {})[key] = val
    meta[prefix] = {"param_groups": sd["param_groups"], "scalars": scalars}


def unflatten_optimizer(prefix: str, tensors: dict, meta: dict) -> dict:
    state: dict[int, dict[str, Any]] = {}
    for name, val in tensors.items():
        if name.startswith(prefix + "/state/"):
            idx, key = name[len(prefix) + 7 :].split("/", 1)
            state.setdefault(int(idx), {})[key] = val
    for idx, sc in meta[prefix]["scalars"].items():
        state.setdefault(int(idx), {}).update(sc)
    return {"state": state, "param_groups": meta[prefix]["param_groups"]}


def save_tensors(path: Path, tensors: dict, meta: dict) -> None:
    """The one checkpoint format: a safetensors file of named tensors, `meta` as JSON in its header (written
    atomically; read back with `load_tensors`, never unpickled)."""
    from safetensors.torch import save

    flat = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    atomic_write_bytes(Path(path), save(flat, metadata={"immunize": json.dumps(meta)}))


def load_tensors(path: Path) -> tuple[dict, dict]:
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as f:
        meta = json.loads((f.metadata() or {}).get("immunize", "{}"))
    return load_file(str(path)), meta


def save_training_state(path: Path, modules: dict, optimizers: dict | None = None,
                        tensors: dict | None = None, extra: dict | None = None) -> None:
    out: dict = {}
    meta: dict = {"extra": extra or {}, "optimizers": {}}
    for name, mod in modules.items():
        for k, v in mod.state_dict().items():
            out[f"module/{name}/{k}"] = v.detach().cpu().contiguous()
    for name, opt in (optimizers or {}).items():
        flatten_optimizer(f"optim/{name}", opt.state_dict(), out, meta["optimizers"])
    for k, v in (tensors or {}).items():
        out[f"tensor/{k}"] = v.detach().cpu().contiguous()
    save_tensors(Path(path), out, meta)


def load_training_state(path: Path, modules: dict, optimizers: dict | None = None) -> tuple[dict, dict]:
    """Restore in place; returns (free tensors, extra) as saved."""
    flat, meta = load_tensors(path)
    for name, mod in modules.items():
        pre = f"module/{name}/"
        mod.load_state_dict({k[len(pre):]: v for k, v in flat.items() if k.startswith(pre)})
    for name, opt in (optimizers or {}).items():
        opt.load_state_dict(unflatten_optimizer(f"optim/{name}", flat, meta["optimizers"]))
    free = {k[len("tensor/"):]: v for k, v in flat.items() if k.startswith("tensor/")}
    return free, meta["extra"]

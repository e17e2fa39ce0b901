"""Rebuild an attacked pipeline from an attack folder (or one of its checkpoints) for evaluation."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import UserError
from ..outputs import shown
from .methods import LORA_FILE, TI_FILE
from .recipe import ATTACK_INFO
from ..models.pipeline_io import load_pipeline
from .spec import METHODS


def read_attack_info(attack_dir: Path, flag: str = "--attacked") -> dict:
    f = Path(attack_dir) / ATTACK_INFO
    if not f.is_file():
        raise UserError(f"{flag} {attack_dir}: not an attack output (no {ATTACK_INFO})")
    try:
        info = json.loads(f.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UserError(f"{flag} {shown(str(f))}: corrupt {ATTACK_INFO}") from None
    check_attack_info(info, f"{flag} {f}")
    return info


def check_attack_info(info, where: str) -> None:
    """The keys evaluation reads, with their types: a hand-edited or foreign attack.json fails here, in one line."""
    import re

    if not isinstance(info, dict):
        raise UserError(f"{where}: expected a JSON object")
    need = {"method": str, "steps": int, "base_model": str, "checkpoints": list, "spec": dict}
    for key, typ in need.items():
        if key not in info:
            raise UserError(f"{where}: lacks the key {key!r} (not written by `immunize-cli attack`?)")
        if not isinstance(info[key], typ) or isinstance(info[key], bool):
            raise UserError(f"{where}: {key!r} must be a {typ.__name__}")
    if info["method"] not in METHODS:
        raise UserError(f"{where}: unknown method {info['method'][:40]!r}")
    if not all(isinstance(c, str) and re.fullmatch(r"step-\d{1,9}", c) for c in info["checkpoints"]):
        raise UserError(f"{where}: 'checkpoints' must list step-NNNNNN folder names")
    if info["method"] == "textual-inversion" and not (isinstance(info["spec"].get("token"), str)
                                                       and isinstance(info.get("placeholder"), str)):
        raise UserError(f"{where}: a textual-inversion attack needs spec.token and placeholder")


def attack_checkpoints(attack_dir: Path) -> list[tuple[int, Path]]:
    """(step, folder) for every saved checkpoint and the final weights, in step order."""
    info = read_attack_info(attack_dir)
    out = [(int(name.split("-")[1]), Path(attack_dir) / "checkpoints" / name) for name in info["checkpoints"]]
    return sorted(out) + [(int(info["steps"]), Path(attack_dir))]


def load_attacked_pipeline(attack_dir: Path, weights_dir: Path | None = None, model: str | None = None,
                           device: str = "cpu"):
    """The base pipeline with the attack applied; `weights_dir` picks a checkpoint."""
    from diffusers import UNet2DConditionModel

    info = read_attack_info(attack_dir)
    w = Path(weights_dir or attack_dir)
    pipe = load_pipeline(model or info["base_model"], device=device)
    method = info["method"]
    if method in ("lora", "dreambooth-lora"):
        pipe.load_lora_weights(str(w), weight_name=LORA_FILE)
        pipe.fuse_lora()
        pipe.unload_lora_weights()
    elif method == "textual-inversion":
        from safetensors.torch import load_file

        emb = load_file(str(w / TI_FILE))
        (token, vec), = emb.items()
        pipe.load_textual_inversion({token: vec}, token=token)
    else:
        pipe.unet = UNet2DConditionModel.from_pretrained(str(w / "unet"), use_safetensors=True).to(device)
    return pipe, info


def attacked_prompt(info: dict, prompt: str) -> str:
    """The prompt as the attacker writes it for the attacked model (TI: the new token)."""
    if info["method"] != "textual-inversion":
        return prompt
    token = info["spec"]["token"]
    # diffusers expands a multi-vector placeholder itself (maybe_convert_prompt): name it once
    return " ".join(info["placeholder"] if w == token else w for w in prompt.split())

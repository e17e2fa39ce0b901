"""Probe one IMMA setting on the tiny world: harden (the real CLI; seed 0, 1 worker unless overridden), score the other
concepts without attack, run the default LoRA attack on the held-out style, score the target after it.

    .venv/bin/python research/imma/imma_probe.py NAME OUTER_LR [extra harden flags, e.g. --retain-weight 10]
    .venv/bin/python research/imma/imma_probe.py NAME none --rank 1     # no IMMA: the original model, attacked
    .venv/bin/python research/imma/imma_probe.py NAME 3e-3 --workers 2 --seed 1   # the demo config as shipped

Harden flags after OUTER_LR override the probe's own (`--workers 1`, `--seed 0`): with `--workers 2` each
rank draws its own batch of 4 and the gradients are averaged, so the simulated attacker and the ascent see
8 images per step, as in the demo config.

`--rank R` sets the LoRA rank of both IMMA's simulated attacker and the attack (default 8); OUTER_LR `none`
skips hardening and attacks the original model, the baseline for a non-default attack.

Data: bench/effectiveness.py's folders (`prepare_data`, made here if missing). The retain set (`--legal`) is
`legal-all`: every trained style, plain included (the untextured style is the held-out sunset's nearest
neighbour; without it IMMA took plain down with sunset).
Appends one JSON row to results/imma_probe.jsonl. Others: 8 samples per concept (8 concepts);
target: 40 samples.
"""

import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from scale import ROOT, SMOKE_DIR, attack_steps, n, results, shared_data, work  # noqa: E402


def main() -> None:
    name, lr = sys.argv[1], sys.argv[2]
    extra = sys.argv[3:]
    d = shared_data()
    rank = int(extra[extra.index("--rank") + 1]) if "--rank" in extra else None
    legal = d / "legal-all"
    out = work("imma-probe") / name
    atk = work("imma-probe") / f"{name}.attack"  # beside the release, not inside it: an output never lies in an input
    model = None if lr == "none" else out  # the attacked model: the original, or the IMMA release
    t0 = time.time()
    if model is not None and not (out / "manifest.json").exists():
        subprocess.run([str(ROOT / ".venv/bin/immunize-cli"), "harden", "--config",
                        str(ROOT / "configs/demo_imma_lora.yaml"), "--target", str(d / "protect"), "--legal",
                        str(legal), "--seed", "0", "--overwrite", "--outer-lr", lr, "--workers", "1",
                        "--out", str(out), *(["--steps", "1"] if SMOKE_DIR else []), *extra], check=True,
                       stdout=subprocess.DEVNULL)
    harden_s = time.time() - t0

    from cli.common import quiet_libraries

    quiet_libraries()
    from raystack.atomic import atomic_write_text
    from raystack.attacks.loading import load_attacked_pipeline
    from raystack.attacks.recipe import run_attack
    from raystack.attacks.spec import DEFAULT_RANK, AttackSpec
    from raystack.evaluation import sampled_accuracy, tiny_world_others, tiny_world_target
    from raystack.models.pipeline_io import load_pipeline
    from raystack.runtime import configure_threads
    from raystack.tinyworld.classifier import Judge

    configure_threads(1)
    judge = Judge()
    target, _ = tiny_world_target("sunset")
    others = tiny_world_others("sunset")

    def acc(pipe, c, n):
        return sampled_accuracy(pipe, c.prompts, c.criterion, n, judge, seed=11)

    hardened = load_pipeline(model)
    others_no_attack = sum(acc(hardened, c, n(8)) for c in others) / len(others)
    if not (atk / "attack.json").exists():
        run_attack(AttackSpec(method="lora", data=d / "attacker", out=atk,
                              model=model and str(model), seed=0, overwrite=True, rank=rank, steps=attack_steps()))
    attacked = load_attacked_pipeline(atk)[0]
    row = {"name": name, "lr": lr, "extra": extra, "attack_rank": rank or DEFAULT_RANK,
           "harden_min": round(harden_s / 60, 1),
           "others_no_attack": others_no_attack, "target_attacked": acc(attacked, target, n(40, 2)),
           "others_attacked": sum(acc(attacked, c, n(8)) for c in others) / len(others)}
    print(json.dumps(row), flush=True)
    log = results("imma_probe.jsonl")
    old = log.read_text() if log.exists() else ""
    atomic_write_text(log, old + json.dumps(row) + "\n")


if __name__ == "__main__":
    main()

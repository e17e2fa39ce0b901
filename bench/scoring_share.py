"""What share of a red-team trial's time is scoring, at SD-1.5's width, and which sampler and step count keep the
judge's ranking while cutting it.

    OMP_NUM_THREADS=1 .venv/bin/python bench/scoring_share.py                  # both parts (~30 min on 2 busy cores)
    # per-image cost at a larger sampling batch, added beside the first timing:
    OMP_NUM_THREADS=1 .venv/bin/python bench/scoring_share.py --score-images 8 --score-configs dpm-solver:10 \
        --methods lora --precisions fp32 --skip-ranking --keep-timing
    .venv/bin/python bench/scoring_share.py --resolutions 256 --methods lora --keep-timing --skip-ranking
                                                                  # another image size (full at 256 px: > 20 GB)
    .venv/bin/python bench/scoring_share.py --skip-timing                     # ranking check only (timings reused)
    .venv/bin/python bench/scoring_share.py --skip-ranking                    # timing only (ranking reused)

**Timing** (measured through the product's own code, one torch thread as a trial runs, `configure_threads(1)`):

- An SD-1.5-shaped pipeline with random weights, built in memory: the UNet of SD-1.5's published config, which
  `raystack.models.shapes.build_pipeline_folder("sd15", width=320, text_width=768)` also builds (blocks 320, 640,
  1280, 1280; 2 layers a block; 8 attention heads; cross-attention 768; 859.5 M parameters), and two parts at SD's
  real size instead of the shapes module's reduced ones: the VAE at SD's widths (128, 256, 512, 512; the shapes
  module makes it 320, 320, 640, 640, about 6x the decoder's work) and SD-1.5's text encoder (12 layers, 768 wide,
  prompts padded to 77 tokens; the shapes module: 2 layers, 16 tokens). PNDM scheduler (SD-1.5's). Images
  `--resolutions` pixels square (128 by default: a full fine-tune's AdamW state at SD-1.5 width is 14 GB, and
  the machine has 23 GB).
- A CLIP judge of ViT-L/14's shape (vision 1024 wide, 24 layers, 14-px patches, 224-px input; text 768 wide,
  12 layers; projection 768), random weights, saved as a local folder `judges.load_judge` accepts (tokenizer:
  the tiny world's), judging on concepts/van_gogh.yaml (5 other concepts).
- Times are the process's CPU seconds (user + system; one thread), wall seconds recorded beside them: the
  machine's 2 cores may be shared with other work, which inflates wall time far more than CPU time.
- Seconds per attack step: `attacks.recipe.setup(spec, pipe).step()`, batch 4 (sd.yaml's fixed batch_size), for
  LoRA rank 16 and a full UNet fine-tune; 1 warm-up step, then `--attack-steps` timed steps. fp32 (what scoring
  runs at: the product samples in the pipeline's own dtype), and bf16 autocast (sd.yaml's `precision`) for
  reference.
- Seconds per scored image: `redteam.sweep._scores` on the target with `--score-images` images (one pipeline
  call: the product batches `images_per_call` images a call, which on a CPU costs the same per image), for the
  default scheduler at 25 steps (sd.yaml today) and `eval_sampler: dpm-solver` at 20, 15 and 10 steps.
  Each includes the prompts' text encoding, every UNet evaluation (with classifier-free guidance: 2 images a
  step), the VAE decode and the CLIP judge. A least-squares line, seconds per image = a x UNet evaluations + b,
  splits it into the UNet's part (a) and the fixed part (b).

**Computed** (`trial_scores`, the schedule of `redteam.sweep.attack_trial`): a trial of S steps scores the target
(`eval_samples` images) at every `checkpoint_every` and at its end, and the other concepts (`other_samples`
images of each) at the first checkpoint at or past each ASHA rung (25%, 50%) and at its end. Its scoring share =
scoring / (attack steps + scoring), trial set-up and checkpoint writes left out (both would lower it). Per step
choice of attack_spaces/sd.yaml, and for the space: the mean of the choices' shares, and the share of the sweep
sd.yaml runs (16 strong corners at its longest steps, the rest drawn uniformly from the choices, none stopped
early). Goal: <= 25%.

**Ranking check** (tiny world): the tiny-world judge's target accuracy (sunset, 32 samples, `_scores`) of
attacked models from runs/ under the default scheduler at the tiny world's eval_steps (15) and under dpm-solver
at 15, 10 and 8 steps: Kendall's tau-b against the default's ordering and the mean absolute difference; the
default again with another sampling seed gives the noise floor the others are read against.

Writes bench/results/scoring_share.{json,md}.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

SPACE = ROOT / "attack_spaces" / "sd.yaml"
CONCEPTS = ROOT / "concepts" / "van_gogh.yaml"
ATTACK_DATA = ROOT / "runs" / "demo" / "data" / "attacker"
#: (sampler, steps) scored per image; the first is sd.yaml's setting today
SCORE_CONFIGS = [("default", 25), ("dpm-solver", 20), ("dpm-solver", 15), ("dpm-solver", 10)]
#: the tiny world's ranking check: its space's eval_steps (attack_spaces/default.yaml: 15) with the default
#: scheduler, the same again with another seed (noise floor), and dpm-solver at fewer steps
RANK_CONFIGS = [("default", 15, 0), ("default", 15, 1), ("dpm-solver", 15, 0), ("dpm-solver", 10, 0),
                ("dpm-solver", 8, 0)]
RANK_MODELS = [
    ("unattacked-original", "tiny"),
    ("unattacked-hardened", "runs/demo/hardened"),
    ("demo-original-full200", "runs/demo/attack_original"),
    ("demo-hardened-full200", "runs/demo/attack_hardened"),
    ("rt-original-dblora1600", "runs/redteam-fixed-s0/attacks/default-original/7660f2a1"),
    ("rt-hardened-full1600-lr1e-2", "runs/redteam-fixed-hardened-s0/attacks/default-hardened.compliant/11636d98"),
    ("rt-hardened-full1600-lr1e-3", "runs/redteam-fixed-hardened-s0/attacks/default-hardened.compliant/7ab7528d"),
    ("rt-hardened-lora1600", "runs/redteam-fixed-hardened-s0/attacks/default-hardened.compliant/86140582"),
    ("rt-hardened-dblora1600", "runs/redteam-fixed-hardened-s0/attacks/default-hardened.compliant/983bc67d"),
    ("rt-hardened-lora200-lr8e-3", "runs/redteam-fixed-hardened-s0/attacks/default-hardened.compliant/64f6a641"),
    ("rt-hardened-full200", "runs/redteam-fixed-hardened-s0/attacks/default-hardened.compliant/7a6c5a3a"),
    ("rt-hardened-lora800", "runs/redteam-fixed-hardened-s0/attacks/default-hardened.compliant/b6cc849a"),
]
GOAL = 0.25
#: dpm-solver step counts the ranking check covers beyond the timed ones: their cost computed from the fit
EXTRA_DPM_STEPS = (8,)


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def peak_rss_gb() -> float:
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 1)


# the SD-1.5-shaped pipeline and the ViT-L/14-shaped judge ----------------------------------------------------
def build_sd15_pipeline(resolution: int, seed: int = 0):
    """SD-1.5's UNet (as build_pipeline_folder("sd15", width=320, text_width=768) builds it), VAE and text
    encoder at SD's real sizes, PNDM scheduler; random weights, in memory."""
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from raystack.models.pipeline_io import assemble_pipeline, default_model_path
    from raystack.models.shapes import ARCHITECTURES

    torch.manual_seed(seed)
    tok = CLIPTokenizer.from_pretrained(str(default_model_path() / "tokenizer"))
    tok.model_max_length = 77  # SD's prompts: 77 tokens (the tiny world's tokenizer pads to 16)
    text = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tok), hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
        max_position_embeddings=77, hidden_act="quick_gelu", bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
                        block_out_channels=[128, 256, 512, 512], down_block_types=["DownEncoderBlock2D"] * 4,
                        up_block_types=["UpDecoderBlock2D"] * 4, norm_num_groups=32, sample_size=resolution,
                        scaling_factor=0.18215)
    w = 320
    unet = UNet2DConditionModel(
        sample_size=resolution // 8, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=[w, 2 * w, 4 * w, 4 * w], cross_attention_dim=768,
        down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
        up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3, norm_num_groups=32, **ARCHITECTURES["sd15"]["unet"])
    scheduler = PNDMScheduler(skip_prk_steps=True, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              num_train_timesteps=1000, prediction_type="epsilon", set_alpha_to_one=False,
                              steps_offset=1)
    pipe = assemble_pipeline(vae.eval(), text.eval(), tok, unet, scheduler)
    sizes = {k: round(sum(p.numel() for p in m.parameters()) / 1e6, 2)
             for k, m in (("unet", unet), ("vae", vae), ("text_encoder", text))}
    return pipe, sizes


def build_clip_folder(out: Path, seed: int = 0) -> dict:
    """A ViT-L/14-shaped CLIPModel, random weights, saved with the tiny world's tokenizer (as tiny CLIP is)."""
    import torch
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    from raystack.models.pipeline_io import default_model_path

    torch.manual_seed(seed)
    tok = CLIPTokenizer.from_pretrained(str(default_model_path() / "tokenizer"))
    cfg = CLIPConfig(
        text_config={"vocab_size": len(tok), "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                     "num_attention_heads": 12, "max_position_embeddings": 77, "hidden_act": "quick_gelu",
                     "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
                     "pad_token_id": tok.pad_token_id},
        vision_config={"image_size": 224, "patch_size": 14, "hidden_size": 1024, "intermediate_size": 4096,
                       "num_hidden_layers": 24, "num_attention_heads": 16, "hidden_act": "quick_gelu"},
        projection_dim=768)
    model = CLIPModel(cfg).eval()
    model.save_pretrained(str(out), safe_serialization=True)
    tok.save_pretrained(str(out))
    return {"params_M": round(sum(p.numel() for p in model.parameters()) / 1e6, 1),
            "vision": "ViT-L/14 shape: 1024 wide, 24 layers, 14-px patches, 224 px",
            "text": "768 wide, 12 layers", "projection_dim": 768}


# timing --------------------------------------------------------------------------------------------------------
def sd_space(sampler: str, steps: int):
    from raystack.redteam.space import load_attack_space

    return load_attack_space(SPACE, [f"eval_sampler={sampler}", f"eval_steps={steps}"])


def unet_evaluations(pipe, sampler: str, steps: int) -> int:
    """UNet evaluations a sampling of `steps` steps makes (PNDM without PRK steps makes steps + 1)."""
    from raystack.sampling import sampler as using

    with using(pipe, sampler):
        pipe.scheduler.set_timesteps(steps)
        n = len(pipe.scheduler.timesteps)
    return n


def time_scoring(pipe, spec: dict, n_images: int, configs=SCORE_CONFIGS) -> list[dict]:
    """Seconds per scored target image through `_scores`, per (sampler, steps)."""
    from raystack.judges import load_judge
    from raystack.redteam.sweep import _scores

    judge = load_judge(spec)
    _scores(pipe, sd_space("default", 1), spec, judge, 0, 1, 0)  # warm-up: first-call allocations
    rows = []
    for sampler, steps in configs:
        w0, c0 = time.perf_counter(), time.process_time()
        acc, _ = _scores(pipe, sd_space(sampler, steps), spec, judge, 0, n_images, 0)
        wall, cpu = time.perf_counter() - w0, time.process_time() - c0
        evals = unet_evaluations(pipe, sampler, steps)
        rows.append({"sampler": sampler, "steps": steps, "unet_evaluations": evals, "images": n_images,
                     "wall_seconds": round(wall, 2), "cpu_seconds": round(cpu, 2),
                     "s_per_image": round(cpu / n_images, 3), "wall_s_per_image": round(wall / n_images, 3)})
        say(f"  scoring {sampler} {steps} steps ({evals} UNet evaluations): {cpu / n_images:.1f} CPU s/image "
            f"({wall / n_images:.1f} s wall)")
    # the judge alone on images of this size (its share of the fixed part)
    import numpy as np

    from raystack.diffusion import resolution_of

    r = resolution_of(pipe)
    imgs = np.random.default_rng(0).integers(0, 256, (n_images, r, r, 3), dtype=np.uint8)
    judge.target_accuracy(imgs)
    c0 = time.process_time()
    judge.target_accuracy(imgs)
    judge_s = (time.process_time() - c0) / n_images
    if len({x["unet_evaluations"] for x in rows}) > 1:
        fit = np.polyfit([x["unet_evaluations"] for x in rows], [x["s_per_image"] for x in rows], 1)
    else:  # one setting: no line; the judge alone is the fixed part known
        fit = [(rows[0]["s_per_image"] - judge_s) / rows[0]["unet_evaluations"], judge_s]
    for x in rows:
        x["unet_s_per_image"] = round(float(fit[0]) * x["unet_evaluations"], 3)
    return rows, {"s_per_unet_evaluation_per_image": round(float(fit[0]), 4),
                  "fixed_s_per_image": round(float(fit[1]), 3),
                  "judge_s_per_image": round(judge_s, 3)}


def time_attack(pipe, method: str, precision: str, steps: int) -> dict:
    """Seconds per attack step, `setup(spec, pipe).step()` at batch 4 (the first step a warm-up)."""
    from raystack.attacks.recipe import setup
    from raystack.attacks.spec import AttackSpec
    from raystack.specs import build_spec

    spec = build_spec(AttackSpec, {"method": method, "data": str(ATTACK_DATA), "steps": 3000, "lr": 1e-4,
                                   "rank": 16, "batch_size": 4, "precision": precision, "checkpoint_every": 500,
                                   "snr_gamma": 0.0, "noise_offset": 0.0, "optimizer": "adamw", "seed": 0},
                      source="bench")
    st = setup(spec, pipe)
    st.step()
    times, walls = [], []
    for _ in range(steps):
        w0, c0 = time.perf_counter(), time.process_time()
        st.step()
        times.append(time.process_time() - c0)
        walls.append(time.perf_counter() - w0)
    trained = sum(p.numel() for p in st.ad.parameters())
    del st
    if method == "lora":  # the next LoRA attaches its own adapter
        pipe.unet.delete_adapters("attack")
    for p in pipe.unet.parameters():
        p.grad = None
    gc.collect()
    return {"method": method, "rank": 16 if method == "lora" else None, "precision": precision, "batch_size": 4,
            "timed_steps": steps, "cpu_step_seconds": [round(t, 2) for t in times],
            "wall_step_seconds": [round(t, 2) for t in walls], "s_per_step": round(sum(times) / len(times), 2),
            "wall_s_per_step": round(sum(walls) / len(walls), 2), "trained_params_M": round(trained / 1e6, 2),
            "peak_rss_gb": peak_rss_gb()}


def measure_resolution(resolution: int, clip_dir: Path, n_images: int, attack_steps: int,
                       precisions: list[str], methods=("full", "lora"), configs=SCORE_CONFIGS) -> dict:
    from raystack.judges import _LOADED, judge_spec

    say(f"{resolution} px: building the SD-1.5-shaped pipeline")
    pipe, sizes = build_sd15_pipeline(resolution)
    spec = judge_spec(f"clip:{clip_dir}", str(CONCEPTS), None)
    scoring, fit = time_scoring(pipe, spec, n_images, configs)
    _LOADED.clear()  # the judge's 1.7 GB out before the full fine-tune's optimizer state
    gc.collect()
    attacks = []
    # the full fine-tune first: LoRA then attaches to the same UNet (its weights are random either way)
    for method in methods:
        for precision in precisions:
            say(f"  attack {method} {precision}: 1 warm-up + {attack_steps} steps")
            a = time_attack(pipe, method, precision, attack_steps)
            say(f"  attack {method} {precision}: {a['s_per_step']:.1f} CPU s/step ({a['wall_s_per_step']:.1f} s wall; "
                f"peak RSS {a['peak_rss_gb']} GB)")
            attacks.append(a)
    del pipe
    gc.collect()
    return {"resolution": resolution, "params_M": sizes, "scoring": scoring, "scoring_fit": fit, "attacks": attacks}


# the trial schedule ----------------------------------------------------------------------------------------------
def trial_scores(steps: int, checkpoint_every: int) -> tuple[int, int]:
    """(target scorings, other-concept scorings) of a trial run to its end, as `attack_trial` schedules them."""
    from raystack.redteam.sweep import ASHA_RUNGS

    target = others = 0
    last = 0.0
    for step in [*range(checkpoint_every, steps, checkpoint_every), steps]:
        progress = 100.0 * step / steps
        at_rung = any(last < r <= progress for r in ASHA_RUNGS)
        target += 1
        others += step == steps or at_rung
        last = progress
    return target, others


def space_shares(measured: dict) -> dict:
    """Per attack method (fp32) and scoring setting: the share at each step choice of sd.yaml, their mean, and
    the sweep's pooled share."""
    from raystack.judges import load_concept_file
    from raystack.redteam.space import load_attack_space, strong_corners

    space = load_attack_space(SPACE)
    n_others = len(load_concept_file(CONCEPTS)["others"])
    choices = sorted(next(iter(space.search["steps"].values())))
    every = int(space.fixed["checkpoint_every"])
    corners = len(strong_corners(space)[:space.samples])
    drawn = space.samples - corners
    schedule = {s: trial_scores(s, every) for s in choices}
    images = {s: t * space.eval_samples + o * space.other_samples * n_others for s, (t, o) in schedule.items()}
    out = {"space": {"steps": choices, "checkpoint_every": every, "eval_samples": space.eval_samples,
                     "other_samples": space.other_samples, "other_concepts": n_others, "samples": space.samples,
                     "strong_corners": corners, "corner_steps": max(choices)},
           "schedule": {str(s): {"target_scorings": t, "other_scorings": o, "images": images[s]}
                        for s, (t, o) in schedule.items()},
           "shares": []}
    fit = measured["scoring_fit"]
    rows = list(measured["scoring"])
    measured_settings = {(r["sampler"], r["steps"]) for r in rows}
    if len({r["unet_evaluations"] for r in rows}) > 1:  # settings the ranking check covered, computed from the fit
        for steps in EXTRA_DPM_STEPS:
            if ("dpm-solver", steps) not in measured_settings:
                s_img = fit["s_per_unet_evaluation_per_image"] * steps + fit["fixed_s_per_image"]
                rows.append({"sampler": "dpm-solver", "steps": steps, "unet_evaluations": steps, "computed": True,
                             "s_per_image": round(s_img, 3), "wall_s_per_image": None,
                             "unet_s_per_image": round(fit["s_per_unet_evaluation_per_image"] * steps, 3)})
    bf16 = {a["method"]: a["s_per_step"] for a in measured["attacks"] if a["precision"] == "bf16"}
    def mean_share(s_per_image, s_per_step):
        """The mean over the step choices of scoring / (attack + scoring), or None without both times."""
        if not s_per_image or not s_per_step:
            return None
        shares = [images[s] * s_per_image / (s * s_per_step + images[s] * s_per_image) for s in choices]
        return round(sum(shares) / len(shares), 4)

    mean_steps, mean_images = sum(choices) / len(choices), sum(images.values()) / len(choices)
    for a in measured["attacks"]:
        if a["precision"] != "fp32":
            continue
        for row in rows:
            per = {}
            for s in choices:
                attack, score = s * a["s_per_step"], images[s] * row["s_per_image"]
                per[str(s)] = round(score / (attack + score), 4)
            sweep_attack = (corners * max(choices) + drawn * mean_steps) * a["s_per_step"]
            sweep_score = (corners * images[max(choices)] + drawn * mean_images) * row["s_per_image"]
            out["shares"].append({
                "method": a["method"], "sampler": row["sampler"], "steps": row["steps"], "per_step_choice": per,
                "mean_over_choices": round(sum(per.values()) / len(per), 4),
                "computed": bool(row.get("computed")),
                "mean_over_choices_wall": mean_share(row["wall_s_per_image"], a["wall_s_per_step"]),
                "mean_over_choices_bf16_attack": mean_share(row["s_per_image"], bf16.get(a["method"])),
                "sweep_pooled": round(sweep_score / (sweep_attack + sweep_score), 4),
                "unet_only_mean_over_choices": mean_share(row["unet_s_per_image"], a["s_per_step"])})
    return out


# the ranking check ----------------------------------------------------------------------------------------------
def kendall_tau_b(x: list[float], y: list[float]) -> float | None:
    conc = disc = tx = ty = 0
    for i in range(len(x)):
        for j in range(i + 1, len(x)):
            dx, dy = x[i] - x[j], y[i] - y[j]
            if dx == 0 and dy == 0:
                continue
            if dx == 0:
                tx += 1
            elif dy == 0:
                ty += 1
            elif dx * dy > 0:
                conc += 1
            else:
                disc += 1
    denom = ((conc + disc + tx) * (conc + disc + ty)) ** 0.5
    return round((conc - disc) / denom, 3) if denom else None


def ranking_check(n_samples: int) -> dict:
    from raystack.attacks.loading import attacked_prompt, load_attacked_pipeline
    from raystack.judges import TinyWorldJudge
    from raystack.models.pipeline_io import load_pipeline, weights_digest, resolve_model_path
    from raystack.redteam.space import load_attack_space
    from raystack.redteam.sweep import _scores

    judge = TinyWorldJudge("sunset")
    spaces = {(s, n): load_attack_space(ROOT / "attack_spaces" / "default.yaml",
                                        [f"eval_sampler={s}", f"eval_steps={n}"]) for s, n, _ in RANK_CONFIGS}
    models, seen = [], set()
    for name, where in RANK_MODELS:
        path = ROOT / where if where != "tiny" else None
        if path is not None and not path.exists():
            say(f"  {name}: {where} missing, skipped")
            continue
        if (path is None or not (path / "attack.json").exists()):
            digest = weights_digest(resolve_model_path(where if path is None else str(path)))
            if digest in seen:
                say(f"  {name}: same weights as an earlier unattacked model, skipped")
                continue
            seen.add(digest)
        models.append((name, where, path))
    rows = []
    for name, where, path in models:
        if path is not None and (path / "attack.json").exists():
            pipe, info = load_attacked_pipeline(path)
            to_prompt = ((lambda p, info=info: attacked_prompt(info, p)) if info["method"] == "textual-inversion"
                         else None)
        else:
            pipe, to_prompt = load_pipeline(where if path is None else str(path)), None
        accs = {}
        for sampler, steps, seed in RANK_CONFIGS:
            t0 = time.perf_counter()
            acc, _ = _scores(pipe, spaces[(sampler, steps)], "sunset", judge, seed, n_samples, 0, to_prompt)
            accs[f"{sampler}-{steps}-seed{seed}"] = {"target": acc, "seconds": round(time.perf_counter() - t0, 2)}
        rows.append({"model": name, "path": where, "accuracy": accs})
        say(f"  {name}: " + ", ".join(f"{k} {v['target']:.3f}" for k, v in accs.items()))
    ref_key = "default-15-seed0"
    ref = [r["accuracy"][ref_key]["target"] for r in rows]
    summary = []
    for sampler, steps, seed in RANK_CONFIGS:
        key = f"{sampler}-{steps}-seed{seed}"
        vals = [r["accuracy"][key]["target"] for r in rows]
        summary.append({"config": key, "sampler": sampler, "steps": steps, "seed": seed,
                        "kendall_tau_b_vs_default15": kendall_tau_b(ref, vals),
                        "mean_abs_diff": round(sum(abs(a - b) for a, b in zip(ref, vals)) / len(rows), 4),
                        "max_abs_diff": round(max(abs(a - b) for a, b in zip(ref, vals)), 4),
                        "seconds_per_model": round(sum(r["accuracy"][key]["seconds"] for r in rows) / len(rows), 2)})
    return {"target": "sunset", "samples": n_samples, "reference": ref_key, "models": rows, "summary": summary}


# the report ------------------------------------------------------------------------------------------------------
def recommend(res: dict) -> dict | None:
    """Per scoring setting of the first timing (every method timed): does it keep the ranking (the tiny-world
    check at the nearest step count at or below it: Kendall tau within 0.05 of the noise floor's or above, mean
    difference at most 1.5x the noise floor's + 0.01; the default scheduler is the reference) and meet the goal
    (the space mean share of the costlier method)? The choice: the cheapest that does both (None: none does;
    `cheapest_kept` then is the honest best)."""
    rank = res.get("ranking")
    timing = res.get("timing")
    if not rank or not timing:
        return None
    floor = next(s for s in rank["summary"] if s["sampler"] == "default" and s["seed"] != 0)
    keeps = {}
    for s in rank["summary"]:
        if s["sampler"] == "dpm-solver":
            tau, ftau = s["kendall_tau_b_vs_default15"], floor["kendall_tau_b_vs_default15"]
            keeps[s["steps"]] = (tau is not None and ftau is not None and tau >= ftau - 0.05
                                 and s["mean_abs_diff"] <= 1.5 * floor["mean_abs_diff"] + 0.01)
    out = []
    settings = {}
    for x in timing[0]["space_shares"]["shares"]:
        settings.setdefault((x["sampler"], x["steps"]), []).append(x)
    for (sampler, steps), xs in settings.items():
        worst = max(xs, key=lambda x: x["mean_over_choices"])
        checked = [k for k in keeps if k <= steps] if sampler == "dpm-solver" else []
        kept = sampler == "default" or (bool(checked) and keeps[max(checked)])
        out.append({"sampler": sampler, "steps": steps, "computed": worst.get("computed", False),
                    "worst_method": worst["method"], "worst_method_mean_share": worst["mean_over_choices"],
                    "sweep_pooled_worst_method": worst["sweep_pooled"],
                    "shares_by_method": {x["method"]: x["mean_over_choices"] for x in xs},
                    "meets_goal": worst["mean_over_choices"] <= GOAL, "ranking_kept": kept})
    out.sort(key=lambda o: o["worst_method_mean_share"])
    ok = [o for o in out if o["meets_goal"] and o["ranking_kept"]]
    kept = [o for o in out if o["ranking_kept"]]
    return {"candidates": out, "choice": ok[0] if ok else None, "cheapest_kept": kept[0] if kept else None,
            "ranking_kept_by_tiny_steps": keeps}


def markdown(res: dict) -> list[str]:
    lines = [f"Command: `{res['command']}`. Machine: {res['machine']}. A background benchmark was running on the "
             "same 2 cores throughout, so wall seconds are inflated and noisy; times are this process's CPU seconds "
             "(user + system, one torch thread as a trial runs), which the contention disturbs far less, and the "
             "shares are ratios of times measured in one run (wall-clock shares beside them)."
             + (f" Timing from an earlier run: `{res['timing_command']}`." if res.get("timing_command")
                and res["timing_command"] != res["command"] else ""), ""]
    for t in res.get("timing", []):
        r = t["resolution"]
        sp = t["space_shares"]["space"]
        lines += [f"## Timing at {r} px, {t['scoring'][0]['images']} images a sampling call (SD-1.5 widths, "
                  "random weights)", "",
                  f"Measured: seconds per attack step (`recipe.setup(spec, pipe).step()`, batch 4, 1 warm-up then "
                  f"{t['attacks'][0]['timed_steps']} timed) and seconds per scored image (`sweep._scores`, "
                  f"{t['scoring'][0]['images']} target images a setting, CLIP ViT-L/14-shaped judge). Computed: "
                  f"the trials' scoring from attack_trial's schedule (target {sp['eval_samples']} images at every "
                  f"{sp['checkpoint_every']} steps and the end; {sp['other_samples']} images x {sp['other_concepts']} "
                  "other concepts at the rung checkpoints and the end), shares = scoring / (attack + scoring). "
                  f"Parameters (M): {t['params_M']}.", "",
                  "| attack | precision | CPU s/step | wall s/step | peak RSS |", "|---|---|---|---|---|"]
        for a in t["attacks"]:
            name = f"LoRA rank {a['rank']}" if a["method"] == "lora" else "full UNet fine-tune"
            lines.append(f"| {name} | {a['precision']} | {a['s_per_step']:.1f} | {a['wall_s_per_step']:.1f} | "
                         f"{a['peak_rss_gb']} GB |")
        f = t["scoring_fit"]
        lines += ["", "| scoring | UNet evaluations | CPU s/image | of which UNet (fit) | wall s/image |",
                  "|---|---|---|---|---|"]
        for s in t["scoring"]:
            lines.append(f"| {s['sampler']} {s['steps']} steps | {s['unet_evaluations']} | {s['s_per_image']:.1f} | "
                         f"{s['unet_s_per_image']:.1f} | {s['wall_s_per_image']:.1f} |")
        lines += ["", f"Fit: {f['s_per_unet_evaluation_per_image']:.2f} s per UNet evaluation per image (two "
                  f"images' worth with guidance), {f['fixed_s_per_image']:.1f} s fixed per image (text encoding, "
                  f"VAE decode, judge; the judge alone {f['judge_s_per_image']:.1f} s).", ""]
        sched = t["space_shares"]["schedule"]
        choices = sp["steps"]
        lines += ["Images scored per trial run to its end: " + ", ".join(
            f"{s} steps: {sched[str(s)]['images']} ({sched[str(s)]['target_scorings']} target + "
            f"{sched[str(s)]['other_scorings']} guard scorings)" for s in choices) + ".", "",
            f"**Scoring share of a trial** (fp32 attack; goal <= {GOAL:.0%}). Space mean: the mean over sd.yaml's "
            f"step choices; sweep: the {sp['samples']}-trial sweep pooled ({sp['strong_corners']} corners at "
            f"{sp['corner_steps']} steps, the rest drawn uniformly), no early stopping; UNet only: the space mean "
            "counting the sampling's UNet work alone (the part that scales with resolution as the attack does).", "",
            "| attack | scoring | " + " | ".join(f"{s} steps" for s in choices)
            + " | space mean | sweep | UNet only (mean) | space mean, wall | space mean, bf16 attack |",
            "|---|---|" + "---|" * (len(choices) + 5)]
        for x in t["space_shares"]["shares"]:
            name = "LoRA r16" if x["method"] == "lora" else "full"
            mean = x["mean_over_choices"]
            mark = "**" if mean <= GOAL else ""
            label = f"{x['sampler']} {x['steps']}" + (" (computed from the fit)" if x.get("computed") else "")
            wall = "—" if x.get("mean_over_choices_wall") is None else f"{x['mean_over_choices_wall']:.0%}"
            b16 = x.get("mean_over_choices_bf16_attack")
            b16 = "—" if b16 is None else f"{b16:.0%}"
            lines.append(f"| {name} | {label} | " + " | ".join(
                f"{x['per_step_choice'][str(s)]:.0%}" for s in choices)
                + f" | {mark}{mean:.0%}{mark} | {x['sweep_pooled']:.0%} | {x['unet_only_mean_over_choices']:.0%} | "
                f"{wall} | {b16} |")
        lines.append("")
    rank = res.get("ranking")
    if rank:
        lines += [f"## Ranking check (tiny world, target {rank['target']}, {rank['samples']} samples a model)", "",
                  "Target accuracy by the tiny world's judge (`_scores`, `TinyWorldJudge`); every setting samples "
                  "from the same seeds (seed 0) but the noise-floor row (the default again, seed 1).", "",
                  "| model | " + " | ".join(s["config"] for s in rank["summary"]) + " |",
                  "|---|" + "---|" * len(rank["summary"])]
        for m in rank["models"]:
            lines.append(f"| {m['model']} | " + " | ".join(f"{m['accuracy'][s['config']]['target']:.2f}"
                                                          for s in rank["summary"]) + " |")
        lines += ["", "| setting | Kendall tau-b vs default 15 (seed 0) | mean abs diff | max abs diff | s/model |",
                  "|---|---|---|---|---|"]
        for s in rank["summary"]:
            tau = "—" if s["kendall_tau_b_vs_default15"] is None else f"{s['kendall_tau_b_vs_default15']:.2f}"
            lines.append(f"| {s['config']} | {tau} | {s['mean_abs_diff']:.3f} | {s['max_abs_diff']:.3f} | "
                         f"{s['seconds_per_model']:.1f} |")
        lines.append("")
    lines += ["## Notes", "",
              "- Sampling batch: the product samples `images_per_call` images a pipeline call (64 at 128 px, 4 at "
              "512 px). Where a second timing at more images a call is shown, its per-image cost is the nearer to "
              "a real trial's (at 128 px a UNet call has a large fixed part, its 3.4 GB of weights read once a "
              "call); its shares come from its own run (the attack step timed again there).",
              "- bf16 attack column: sd.yaml trains under bf16 autocast while scoring samples in the pipeline's fp32; "
              "on a GPU that gap is larger than on this CPU, so unless sampling also runs in bf16, the share there "
              "is nearer this column than the fp32 one.",
              "- Left out of the trial's time: its set-up and checkpoint writes (a full fine-tune writes a 3.4 GB "
              "UNet every 500 steps); both would lower the share. Not timed: DreamBooth with prior preservation "
              "(two losses a step) and textual inversion, which sd.yaml also draws.",
              "- Resolution: the attack step and the sampling are both UNet work, so their ratio stays roughly, not "
              "exactly, the same across image sizes: at 128 px a UNet call's fixed part favours the attack's batch "
              "of 4 over small sampling batches, and the fixed per-image part (VAE decode, the judge at 224 px) is "
              "a smaller share at 512 px; both make these shares, if anything, high for 512 px.",
              ""]
    rec = res.get("recommendation")
    if rec:
        c, k = rec["choice"], rec["cheapest_kept"]
        lines += ["## Recommendation", "",
                  "The ranking counts as kept when the tiny-world check at the nearest step count at or below the "
                  "setting has Kendall tau within 0.05 of the noise floor's (or above) and a mean difference at most "
                  "1.5x the floor's + 0.01 (kept at dpm-solver steps: " + ", ".join(
                      f"{n}: {'yes' if v else 'no'}" for n, v in sorted(rec["ranking_kept_by_tiny_steps"].items()))
                  + "). Share: the space mean of the costlier method.", ""]
        if c:
            lines.append(f"eval_sampler: {c['sampler']}, eval_steps: {c['steps']}"
                         f"{' (cost computed from the fit)' if c['computed'] else ''}: the cheapest that keeps the "
                         f"ranking and meets the goal ({c['worst_method']} {c['worst_method_mean_share']:.0%}).")
        else:
            lines.append(f"No setting meets <= {GOAL:.0%} for every method while keeping the ranking. The cheapest "
                         f"that keeps it: eval_sampler: {k['sampler']}, eval_steps: {k['steps']}"
                         f"{' (cost computed from the fit)' if k['computed'] else ''}: "
                         + ", ".join(f"{m} {v:.0%}" for m, v in k["shares_by_method"].items())
                         + f" (sweep pooled, {k['worst_method']}: {k['sweep_pooled_worst_method']:.0%}).")
        lines.append("")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--resolutions", type=int, nargs="+", default=[128])
    ap.add_argument("--score-images", type=int, default=2, help="target images per scoring setting timed")
    ap.add_argument("--attack-steps", type=int, default=2, help="timed attack steps after 1 warm-up")
    ap.add_argument("--precisions", default="fp32,bf16", help="attack precisions timed (shares use fp32)")
    ap.add_argument("--rank-samples", type=int, default=32)
    ap.add_argument("--methods", default="full,lora", help="attacks timed (full: 14 GB of AdamW state)")
    ap.add_argument("--score-configs", default=",".join(f"{s}:{n}" for s, n in SCORE_CONFIGS),
                    help="SAMPLER:STEPS scoring settings timed")
    ap.add_argument("--keep-timing", action="store_true",
                    help="add this run's resolutions to the last results file's timing instead of replacing it")
    ap.add_argument("--skip-timing", action="store_true", help="reuse the timing of the last results file")
    ap.add_argument("--skip-ranking", action="store_true", help="reuse the ranking of the last results file")
    args = ap.parse_args()
    from _results import write_results

    from raystack.runtime import configure_threads

    threads = configure_threads(1)
    dest = ROOT / "bench" / "results"
    before = {}
    if (dest / "scoring_share.json").exists():
        before = json.loads((dest / "scoring_share.json").read_text())
    machine = (f"{platform.machine()}, {os.cpu_count()} logical CPUs, no GPU, {threads} torch thread; torch "
               f"{__import__('torch').__version__}")
    res = {"command": "OMP_NUM_THREADS=1 .venv/bin/python bench/scoring_share.py " + " ".join(sys.argv[1:]),
           "machine": machine, "note": "a concurrent background benchmark shared the 2 cores: absolute seconds are "
           "inflated, the shares are ratios of times from one run"}
    if args.skip_timing:
        res["timing"] = before.get("timing", [])
        res["timing_command"] = before.get("timing_command", before.get("command"))
    else:
        with tempfile.TemporaryDirectory(prefix="scoring-share-") as tmp:
            clip_dir = Path(tmp) / "clip-vit-l14-random"
            say("building the ViT-L/14-shaped CLIP judge folder")
            res["clip_judge"] = build_clip_folder(clip_dir)
            res["timing"] = []
            for r in args.resolutions:
                configs = [(c.split(":")[0], int(c.split(":")[1])) for c in args.score_configs.split(",")]
                m = measure_resolution(r, clip_dir, args.score_images, args.attack_steps,
                                       args.precisions.split(","), args.methods.split(","), configs)
                m["space_shares"] = space_shares(m)
                res["timing"].append(m)
        res["timing_command"] = res["command"]
        if args.keep_timing:
            kept = [t for t in before.get("timing", []) if (t["resolution"], t["scoring"][0]["images"])
                    not in [(r, args.score_images) for r in args.resolutions]]
            res["timing"] = kept + res["timing"]
            res["timing_command"] = " ; ".join(c for c in (before.get("timing_command"), res["command"]) if c)
    if args.skip_ranking:
        res["ranking"] = before.get("ranking")
    else:
        say("ranking check on the tiny world")
        res["ranking"] = ranking_check(args.rank_samples)
    res.setdefault("clip_judge", before.get("clip_judge"))
    for m in res["timing"]:  # the computed part, from the measured times (again when reused)
        m["space_shares"] = space_shares(m)
    res["recommendation"] = recommend(res)
    write_results(dest, "scoring_share", res, markdown(res))


if __name__ == "__main__":
    main()

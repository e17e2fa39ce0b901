"""Probe an IMMA setting in one process, scoring snapshots along the run (faster than imma_probe.py).

    .venv/bin/python research/imma/imma_snapshots.py NAME SEED '{"params": "resnets", "outer_lr": 1e-2}'
    .venv/bin/python research/imma/imma_snapshots.py --table   # results/imma_snapshots.md from the rows

The JSON holds `HardenSpec` fields over this probe's defaults (IMMA against LoRA, target `protect`, legal
`legal-all`, 300 steps, batch 8, outer lr 3e-3, retain weight 10, S = attn2; `rank` sets the LoRA rank of both
the simulated and the scoring attacker) plus probe-only keys:
- `eval_at`: steps to snapshot, 0 for the unhardened baseline; default: the last;
- `legal`: folder name under runs/bench-effectiveness/data;
- `restart_every`: φ and the attacker's AdamW moments back to the method's initialisation every N iterations
  (a simulated attacker that is always early in its fine-tune, instead of Alg. 1 line 5's warm start);
- `outer_objective`: `ascent` (Alg. 1), `erase` (`erase_losses`: a bounded ESD-style target held under the
  attacker's adapter) or `unrolled` (`unrolled_losses`: second order, the loss drop of `unroll` =
  {"steps": K, "lr": β} differentiable attacker steps from φ's initialisation, or the warm φ with
  `unroll_from: warm`). Research variants outside ALGORITHMS.md, kept here with their rows, not in the CLI;
  they reach the product's IMMA through its public hook `IMMARecipe.outer_objective`.

The recipe is
the repo's `IMMARecipe` with a torch Adam outer optimizer (no Ray, no DeepSpeed: one process, one thread);
each snapshot of the released tensors goes into a fresh tiny-world pipeline, is scored on the 8 other
concepts (8 samples each) without attack, attacked by the default LoRA attack (seed 0) and scored on the
held-out style (40 samples). One JSON row per snapshot is appended to results/imma_snapshots.jsonl.
Two probes in parallel on this 2-core machine take about 7.5 min (300 steps, two snapshots).
Data: bench/effectiveness.py's folders (`prepare_data`, made here if missing).
"""

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from scale import attack_steps, n, results, shared_data, work  # noqa: E402

RESULTS = results("imma_snapshots.jsonl")


def table() -> None:
    """results/imma_snapshots.md from the rows: one line per probe and snapshot, the baseline first."""
    rows = [json.loads(line) for line in RESULTS.read_text().splitlines() if line.strip()]
    def rank(r):  # the attackers' LoRA rank, which the unhardened baseline must share
        return r["cfg"].get("rank", 8)

    refs = {rank(r): (r["target_attacked"], r["others_no_attack"]) for r in rows if r["step"] == 0}
    lines = ["Machine: 2-core x86-64 CPU, one torch thread per probe, two probes at a time. Made by "
             "`research/imma/imma_snapshots.py` (see its docstring); rows in `imma_snapshots.jsonl`. Others: 8 samples of "
             "each of 8 legal concepts, no attack. Sunset: 40 samples after the default LoRA attack (seed 0; rank 8 "
             "unless the settings give `rank`, which then holds for IMMA's simulated attacker too). Ratios are to the "
             "unhardened row of the same rank.", "",
             "| probe | harden seed | IMMA steps | settings over the probe's defaults | others, no attack (kept) "
             "| sunset after LoRA (/ unhardened, target ≤ 0.5) |", "|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (rank(r) != 8, r["step"] != 0, r["name"], r["seed"], r["step"])):
        cfg = {k: v for k, v in r["cfg"].items() if k not in ("eval_at", "steps")}
        ref = refs.get(rank(r))
        kept, ratio = ((f" ({r['others_no_attack'] / ref[1]:.2f})", f" ({r['target_attacked'] / ref[0]:.2f})")
                       if ref and ref[0] and ref[1] else ("", ""))
        lines.append(f"| {r['name']} | {r['seed']} | {r['step']} | {json.dumps(cfg) if cfg else '—'} | "
                     f"{r['others_no_attack']:.1%}{kept} | {r['target_attacked']:.1%}{ratio} |")
    results("imma_snapshots.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def erase_losses(recipe):
    """`outer_objective: erase`, a bounded alternative to Alg. 1's ascent: with the simulated attacker's
    adapter on, the UNet's prediction on a noisy target image under its own caption should equal the
    unhardened UNet's under the caption with the style named `plain` (ESD's target, held after adaptation).
    Returned negated, since `imma_iteration` ascends the first loss; the retain term is the recipe's."""
    import torch

    if recipe.teacher is None:
        raise SystemExit("outer_objective erase needs retain_target original (the unhardened UNet)")
    shard, b, g = recipe.target, recipe.spec.batch_size, recipe.generator
    idx = torch.randint(0, len(shard.bank), (b,), generator=g)
    latents = shard.bank.sample(idx, g)
    captions = [shard.captions[i] for i in idx.tolist()]
    noise = torch.randn(latents.shape, generator=g)
    t = torch.randint(0, recipe.noise.config.num_train_timesteps, (b,), generator=g)
    noisy = recipe.noise.add_noise(latents, noise, t).contiguous()
    with torch.no_grad():
        decoy = recipe.teacher(noisy, t, recipe.ad.encode([c.replace("sunset", "plain") for c in captions])).sample
    erase = (recipe.pipe.unet(noisy, t, recipe.ad.encode(captions)).sample - decoy).pow(2).mean()
    return -erase, recipe.retain_loss()


class _Reparam:
    """The UNet with some parameters replaced by tensors (a graph through the attacker's unrolled steps)."""

    def __init__(self, unet, over: dict):
        self.unet, self.over = unet, over

    def parameters(self):
        return self.unet.parameters()

    def __call__(self, *args, **kwargs):
        import torch

        return torch.func.functional_call(self.unet, self.over, args, kwargs, strict=False)


def unrolled_losses(recipe, unroll: dict, phi_start: dict | None):
    """`outer_objective: unrolled`: how much K differentiable attacker steps lower the target loss, which θ
    should make small, with the graph kept through the steps (second order, unlike Alg. 1's first order).
    The steps are Adam's first steps (each coordinate moves by lr · g/|g|, |g| held constant) from φ's
    initialisation (`unroll_from: fresh`, where a real attacker starts) or from the warm φ. Returned as
    (L(θ, φ_K) − L(θ, φ_0) on one batch with common noise, retain) for `imma_iteration` to ascend."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH):  # CPU flash attention has no double backward
        return _unrolled_losses(recipe, unroll, phi_start)


def _unrolled_losses(recipe, unroll: dict, phi_start: dict | None):
    import torch

    from raystack.hardening.data import shard_loss

    unet, g, b = recipe.pipe.unet, recipe.generator, recipe.spec.batch_size
    live = recipe.ad.named_parameters()
    start = phi_start if phi_start is not None else {n: p.detach() for n, p in live.items()}
    phi = {n: start[n].detach().clone().requires_grad_(True) for n in live}
    kw = dict(snr_gamma=recipe.attacker.snr_gamma, noise_offset=recipe.attacker.noise_offset)
    for _ in range(unroll["steps"]):
        loss = shard_loss(_Reparam(unet, phi), recipe.noise, recipe.ad.encode, recipe.target, b, g, **kw)
        grads = torch.autograd.grad(loss, list(phi.values()), create_graph=True)
        phi = {n: p - unroll["lr"] * gr / (gr.detach().abs() + 1e-8) for (n, p), gr in zip(phi.items(), grads)}
    state = g.get_state()
    before = shard_loss(_Reparam(unet, {n: start[n].detach() for n in live}), recipe.noise, recipe.ad.encode,
                        recipe.target, b, g, **kw)
    g.set_state(state)
    after = shard_loss(_Reparam(unet, phi), recipe.noise, recipe.ad.encode, recipe.target, b, g, **kw)
    return after - before, recipe.retain_loss()


def main() -> None:
    if sys.argv[1:] == ["--table"]:
        return table()
    name, seed, cfg = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3] if len(sys.argv) > 3 else "{}")
    from cli.common import quiet_libraries

    quiet_libraries()
    import torch

    from raystack.attacks.recipe import run_attack
    from raystack.attacks.spec import AttackSpec
    from raystack.evaluation import sampled_accuracy, tiny_world_others, tiny_world_target
    from raystack.hardening.imma import IMMARecipe
    from raystack.hardening.method import LocalEngine, load_into_unet
    from raystack.hardening.spec import HardenSpec
    from raystack.models.pipeline_io import load_pipeline
    from raystack.runtime import configure_threads
    from raystack.tinyworld.classifier import Judge

    configure_threads(1)
    data = shared_data()
    settings = dict(cfg)
    eval_at = settings.pop("eval_at", None)
    legal = settings.pop("legal", "legal-all")
    restart = settings.pop("restart_every", None)  # scratch: φ and its AdamW moments back to A's init every N
    objective = settings.pop("outer_objective", "ascent")
    unroll = settings.pop("unroll", {"steps": 3, "lr": 3e-3})
    unroll_from = settings.pop("unroll_from", "fresh")
    kw = dict(method="imma", against="lora", target=[data / "protect"], legal=data / legal, seed=seed, steps=n(300),
              batch_size=8, outer_lr=3e-3, retain_weight=10.0, params="attn2")
    kw.update(settings)
    spec = HardenSpec(**kw)
    eval_at = eval_at or [spec.steps]
    torch.manual_seed(seed)
    pipe = load_pipeline(None)
    recipe = IMMARecipe(spec, pipe)
    recipe.bind(LocalEngine(recipe))  # the recipe's own Adam on S, no DeepSpeed
    if objective == "erase":
        recipe.outer_objective = erase_losses  # the public hook: what the outer step ascends
    elif objective == "unrolled":
        fresh = {k: v.clone() for k, v in recipe.ad.state().items()}
        recipe.outer_objective = lambda r: unrolled_losses(r, unroll, fresh if unroll_from == "fresh" else None)
    snapshots, log, t0 = {}, [], time.time()
    phi_init = recipe.ad.state()
    if 0 in eval_at:  # the unhardened model through the same attack and scoring: the baseline
        snapshots[0] = recipe.changed_tensors()
    def mean(k):  # over the last 25 steps (fewer in a shorter run)
        last = log[-25:]
        return sum((x[k] or 0.0) for x in last) / len(last)

    for i in range(1, spec.steps + 1):
        if restart and i > 1 and (i - 1) % restart == 0:
            recipe.phi_prev = {k: v.clone() for k, v in phi_init.items()}
            if recipe.inner_opt is not None:  # --inner-optimizer sgd keeps no moments
                recipe.inner_opt.state.clear()
        log.append(recipe.step())
        if i % 25 == 0:
            print(f"{name} s{seed} step {i} inner {mean('inner_loss'):.4f} outer {mean('outer_loss'):.4f} "
                  f"retain {mean('retain_loss'):.4f} {time.time() - t0:.0f}s", flush=True)
        if i in eval_at:
            snapshots[i] = recipe.changed_tensors()
    harden_s = time.time() - t0
    recipe.finish()

    judge = Judge()
    target, _ = tiny_world_target("sunset")
    others = tiny_world_others("sunset")

    def acc(p, concept, n):
        return sampled_accuracy(p, concept.prompts, concept.criterion, n, judge, seed=11)

    for step, tensors in snapshots.items():
        p = load_pipeline(None)
        load_into_unet(p.unet, tensors)
        other = {c.name: acc(p, c, n(8)) for c in others}
        info = run_attack(AttackSpec(method="lora", data=data / "attacker", seed=0, overwrite=True, rank=spec.rank,
                                     steps=attack_steps(), out=work("imma-snapshots") / f"{name}-{seed}-{step}"),
                          pipe=p)
        row = {"name": name, "seed": seed, "step": step, "cfg": cfg, "harden_s": round(harden_s),
               "final_losses": {k: round(mean(k), 4) for k in ("inner_loss", "outer_loss", "retain_loss")},
               "others_no_attack": sum(other.values()) / len(other), "target_attacked": acc(p, target, n(40, 2)),
               "attack_final_loss": info["final_loss"], "others": other}
        print(json.dumps(row), flush=True)
        with open(RESULTS, "a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()

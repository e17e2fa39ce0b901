"""Device bugs a code review found (issue 41, items 1, 2, 3 and 5), each caught on the CPU, and two nets for the
class behind items 1 and 2 (a tensor left on the CPU beside a model on the GPU):

- net A, *the model elsewhere*: the UNet and text encoder on the meta device stand in for a GPU. Everything a
  phase builds, and everything it restores from a checkpoint (read on the CPU), must be on the model's device,
  and no op may mix two devices (`OneDevice`: CUDA's rule, which meta alone does not enforce for every op).
- net B, *nothing on the default device*: the model on the CPU and one step of every method and attack with the
  default device meta for this repository's code: a tensor it makes without device= lands on meta and fails the
  step. Seeded draws (`generator=`) are made on the CPU by design and moved, so they are left alone, as are the
  libraries' own tensors (token ids, peft adapters, optimizer steps: made on the host and moved, upstream).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._device import _device_constructors

from test_robust_hardening import SPACE  # the same small attacker space

ROOT = Path(__file__).resolve().parents[1]
OURS = (str(ROOT / "raystack") + "/", str(ROOT / "tests") + "/")


ERASE = dict(concept="circle", anchor="square")
METHODS = {  # every hardening phase with a step, robust hardening (the attacker pool) included
    **{f"imma-{a}": dict(method="imma", against=a) for a in ("lora", "dreambooth-lora", "full", "dreambooth",
                                                              "textual-inversion")},
    "freezeasguard": dict(method="freezeasguard"),
    "imma-pool": dict(method="imma", attacker_space="space.yaml"),
    "freezeasguard-pool": dict(method="freezeasguard", attacker_space="space.yaml", attackers_per_step=2),
    "esd-x": dict(method="esd-x", **ERASE),
    "ablation": dict(method="ablation", **ERASE),
    "uce": dict(method="uce", **ERASE),
}
ATTACKS = ("lora", "dreambooth", "dreambooth-lora", "textual-inversion", "full")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from raystack.tinyworld.folder import write_concept_folder

    d = tmp_path_factory.mktemp("gpu_review")
    write_concept_folder(d / "t", ["circle"], ["red"], ["sunset"], 2, 1, None, False)
    write_concept_folder(d / "l", ["square"], ["blue"], ["striped", "plain"], 1, 2, None, False)
    (d / "space.yaml").write_text(SPACE)
    return d


def _spec(world, method: str, **kw):
    from raystack.hardening.spec import HardenSpec

    kw = {**METHODS[method], **kw}
    if "attacker_space" in kw:
        kw.update(attacker_space=world / kw["attacker_space"], attacker_pool=3)
    base = dict(target=[world / "t"], legal=world / "l", out=world / "o", batch_size=2, steps=4, finetune_steps=1,
                user_steps=1, retain_weight=1.0, seed=3)
    return HardenSpec(**{**base, **kw})


def _phase(spec, pipe):
    from raystack.hardening.methods import method_phases
    from raystack.hardening.worker import build_phase

    return build_phase(method_phases(spec.method)[0], spec, pipe, 0, 1, local=True)[0]


def _pipe(device: str | None = None):
    """The tiny pipeline; with `device` its UNet and text encoder go there (the VAE stays: the data is encoded on
    the host in every run, then kept there)."""
    from raystack.models.pipeline_io import load_pipeline

    pipe = load_pipeline(None)
    if device is not None:
        pipe.unet.to(device)
        pipe.text_encoder.to(device)
    return pipe


# the nets' tools -----------------------------------------------------------------------------------------
_MOVES = {torch.Tensor.to, torch.Tensor.cpu, torch.Tensor.cuda, torch.Tensor.copy_, torch.Tensor.__getitem__,
          torch._has_compatible_shallow_copy_type}


class OneDevice(TorchFunctionMode):
    """CUDA's rule on any device: the tensors of one op on one device (0-dim ones, moves, copies and index
    tensors aside). The meta device does not check it for every op (an indexed write takes a CPU value)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.__setitem__:
            ts = [args[0], args[2]]
        elif func in _MOVES:
            ts = []
        else:
            flat = [*args, *kwargs.values()]
            ts = flat + [b for a in flat if isinstance(a, (list, tuple)) for b in a]
        devices = {t.device for t in ts if isinstance(t, torch.Tensor) and t.dim() > 0}
        if len(devices) > 1:
            raise RuntimeError(f"{getattr(func, '__name__', func)}: tensors on {sorted(map(str, devices))}")
        return func(*args, **kwargs)


class OursOnMeta(TorchFunctionMode):
    """torch.set_default_device("meta") for this repository's code only (seeded draws aside, see the top)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _device_constructors() and kwargs.get("device") is None and kwargs.get("generator") is None \
                and sys._getframe(1).f_code.co_filename.startswith(OURS):
            kwargs["device"] = "meta"
        return func(*args, **kwargs)


HOST = {"pipe", "spec", "engine", "generator", "noise", "illegal", "legal", "legal_uncond", "target", "_encode",
        "_text", "text", "_frozen_text", "_keep", "mask", "inner_opt", "user_opts", "opt", "outer_objective",
        "after_inner"}
"""Attributes held on the host by design (data banks, RNG, text caches, index masks, config), or moved by torch
when used (an optimizer's state_dict follows its parameters in load_state_dict)."""


def held(obj, path: str = "phase", seen: set | None = None):
    """(path, tensor) for every tensor a phase keeps between steps: its attributes, recursively through this
    repository's objects, containers and modules."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        yield path, obj
    elif isinstance(obj, torch.nn.Module):
        for n, t in [*obj.named_parameters(), *obj.named_buffers()]:
            yield f"{path}.{n}", t
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from held(v, f"{path}[{k!r}]", seen)
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from held(v, f"{path}[{i}]", seen)
    elif type(obj).__module__.startswith("raystack") and hasattr(obj, "__dict__"):
        for k, v in vars(obj).items():
            if k not in HOST:
                yield from held(v, f"{path}.{k}", seen)


def elsewhere(phase, device: str = "meta") -> list[str]:
    return [f"{p} on {t.device}" for p, t in held(phase) if t.device.type != device]


# item 1: FreezeAsGuard without DeepSpeed ------------------------------------------------------------------
def test_mask_logits_follow_the_unet_without_deepspeed(world):
    """The mask logits were made on the CPU and only DeepSpeed moved them: `run_method(local=True)` mixed them
    with the couplings on the GPU at the first mask step."""
    r = _phase(_spec(world, "freezeasguard"), _pipe("meta"))
    c = torch.zeros(len(r.params), device="meta")  # the couplings come from the UNet's gradients
    assert r.engine.forward(c, r.spec.rho, r.spec.temperature).device.type == "meta"
    assert r.mask_module.w.device.type == "meta"


def test_local_engine_puts_the_defenders_module_beside_the_unet():
    """As DeepSpeed does: a phase's engine module made on the CPU follows the UNet."""
    from types import SimpleNamespace

    from raystack.hardening.method import HardeningPhase, LocalEngine

    class Toy(HardeningPhase):
        def __init__(self):
            super().__init__(None, SimpleNamespace(unet=torch.nn.Linear(2, 2, device="meta")))
            self.mod = torch.nn.Linear(2, 1)

        def engine_module(self):
            return self.mod

        def engine_params(self):
            return list(self.mod.parameters())

        def make_optimizer(self):
            return torch.optim.SGD(self.engine_params(), lr=0.1)

    engine = LocalEngine(Toy())
    assert engine.module.weight.device.type == "meta"
    assert engine.optimizer.param_groups[0]["params"][0] is engine.module.weight


# item 2: resumed runs ------------------------------------------------------------------------------------
def _checkpoint(phase, steps: int) -> dict:
    """`phase.state()` after `steps` steps of a fresh run, as a resumed worker reads it: on the CPU."""
    phase.prepare()
    for _ in range(steps):
        phase.step()
    return {k: v.detach().cpu().clone() for k, v in phase.state().items()}


def test_resumed_freezeasguard_pool_relaxes_beside_the_unet(world):
    """The pool's users' θ_ft came back on the CPU: `_set_relaxed` mixed it with θ_pre on the GPU."""
    spec = _spec(world, "freezeasguard-pool")
    saved = _checkpoint(_phase(spec, _pipe()), 2)
    r = _phase(spec, _pipe("meta"))
    r.load_state(saved)
    users = [m for m in r.pool.members if m.phi]
    assert users
    with OneDevice():  # the mask's values are read on the host (the meta mask has none)
        r._set_relaxed([users[0].phi[n] for n in r.names], torch.full((len(r.names),), 0.5))
    assert all(t.device.type == "meta" for m in users for t in m.phi.values())


def test_resumed_imma_pool_keeps_a_dense_users_displacement_beside_the_unet(world):
    """A dense user's Δ came back on the CPU: its next turn added it to the UNet's tensors on the GPU."""
    spec = _spec(world, "imma-pool")
    r = _phase(spec, _pipe())
    dense = next(k for k, m in enumerate(r.pool.members) if m.dense)
    r.pool.iteration = next(i for i in range(100) if r.pool.choose(i)[0] == dense)  # its turn first
    saved = _checkpoint(r, 1)
    again = _phase(spec, _pipe("meta"))
    again.load_state(saved)
    delta = again.pool.members[dense].phi
    assert delta
    params = dict(again.pipe.unet.named_parameters())
    with OneDevice(), torch.no_grad():  # what its next turn does first
        for n, d in delta.items():
            params[n].add_(d)
    assert all(d.device.type == "meta" for d in delta.values())


@pytest.mark.parametrize("method", ATTACKS)
def test_adaptation_state_from_a_cpu_checkpoint_loads_onto_the_models_device(world, method):
    """IMMA's warm start (φ) after a resume: the checkpoint's tensors are on the CPU, the model is not; textual
    inversion's indexed write did not move them."""
    from raystack.attacks.methods import make_adaptation
    from raystack.attacks.spec import AttackSpec

    pipe = _pipe()
    ad = make_adaptation(AttackSpec(method=method, data=str(world / "t"), prompt="sks red circle"), pipe)
    state = {k: v.detach().cpu() + 0.5 for k, v in ad.state().items()}
    pipe.unet.to("meta")
    pipe.text_encoder.to("meta")
    with OneDevice():
        ad.load_state(state)
    assert all(p.device.type == "meta" for p in ad.parameters())


# net A: everything a phase builds or restores is on the model's device -------------------------------------
@pytest.mark.parametrize("method", [m for m in METHODS if m != "imma-textual-inversion"])
def test_what_a_phase_builds_and_restores_follows_the_model(world, method):
    """(imma-textual-inversion is left out: transformers' resize of the token table cannot run on meta; its
    warm start is the test above.)"""
    spec = _spec(world, method)
    saved = _checkpoint(_phase(spec, _pipe()), 2) if method != "uce" else None
    with OneDevice():
        phase = _phase(spec, _pipe("meta"))
        assert not elsewhere(phase), elsewhere(phase)[:5]
        if saved is not None:
            phase.load_state(saved)
            assert not elsewhere(phase), elsewhere(phase)[:5]


# net B: one step makes nothing on the default device -------------------------------------------------------
@pytest.mark.parametrize("method", list(METHODS))
def test_one_hardening_step_makes_nothing_on_the_default_device(world, method):
    phase = _phase(_spec(world, method), _pipe())
    phase.prepare()
    if method != "uce":  # a first step makes what torch makes lazily (optimizer state), as in any run
        phase.step()
    with OursOnMeta():
        for _ in range(2 if "pool" in method else 1):
            phase.step()


@pytest.mark.parametrize("method", ATTACKS)
def test_one_attack_step_makes_nothing_on_the_default_device(world, method):
    from raystack.attacks.recipe import setup
    from raystack.attacks.spec import AttackSpec

    st = setup(AttackSpec(method=method, data=str(world / "t"), prompt="sks red circle", batch_size=2), _pipe())
    st.step()
    with OursOnMeta():
        st.step()


def test_the_default_device_net_catches_a_tensor_made_without_a_device():
    w = torch.nn.Parameter(torch.ones(3))
    with OursOnMeta(), pytest.raises(RuntimeError, match="meta"):
        (w * torch.ones(3)).sum().backward()
    with OursOnMeta():
        (w * torch.ones(3, device=w.device) + torch.randn(3, generator=torch.Generator())).sum().backward()


# item 3: DeepSpeed's accelerator on GPU runs ----------------------------------------------------------------
def test_gpu_runs_tell_the_workers_deepspeed_to_use_cuda(monkeypatch):
    """A DS_ACCELERATOR=cpu in the driver's environment (exported, or guessed where no /dev/nvidia0 is) reached
    the GPU workers: the embedded Ray inherits it and the runtime_env did not say otherwise."""
    import ray

    from raystack import raysession

    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    started = []
    monkeypatch.setattr(raysession, "start_embedded", lambda n, env: started.append(env))
    raysession.init_ray(None, True, 2)
    raysession.init_ray(None, False, 2)
    assert [env["env_vars"]["DS_ACCELERATOR"] for env in started] == ["cuda", "cpu"]


def test_the_cpu_accelerator_is_guessed_only_where_no_gpu_can_be(monkeypatch):
    import glob

    from cli import common

    for k in ("DS_ACCELERATOR", "CUDA_VISIBLE_DEVICES", "NVIDIA_VISIBLE_DEVICES"):
        monkeypatch.delenv(k, raising=False)
    devices: list[str] = []
    monkeypatch.setattr(glob, "glob", lambda pattern: [d for d in devices if d.startswith(pattern[:11])])
    common.quiet_libraries(use_gpu=True)  # --use-gpu: never the CPU accelerator
    assert "DS_ACCELERATOR" not in os.environ
    devices.append("/dev/nvidia1")  # the container's GPU is not index 0
    common.quiet_libraries()
    assert "DS_ACCELERATOR" not in os.environ
    devices.clear()
    monkeypatch.setenv("NVIDIA_VISIBLE_DEVICES", "GPU-1234")
    assert common._has_cuda_hint()
    monkeypatch.setenv("NVIDIA_VISIBLE_DEVICES", "void")
    common.quiet_libraries()
    assert os.environ["DS_ACCELERATOR"] == "cpu"


# item 5: sweeps on a GPU; host syncs per mask step ----------------------------------------------------------
def _space(**kw):
    from raystack.tuning.space import TuneSpace

    return TuneSpace(**{"name": "s", "harden": {"method": "freezeasguard"}, "search": {"rho": {"grid": [0.2]}},
                        **kw})


@pytest.mark.parametrize("kw, says", [
    (dict(harden={"method": "freezeasguard", "use_gpu": True}), "harden.use_gpu"),
    (dict(search={"rho": {"grid": [0.2]}, "use_gpu": {"grid": [False, True]}}), "search.use_gpu"),
    (dict(attacks=[{"method": "lora"}, {"method": "full", "device": "cuda"}]), r"attacks\[1\].device"),
])
def test_a_sweep_that_asks_for_a_gpu_is_refused_before_anything_runs(tmp_path, kw, says):
    """A trial holds one CPU and runs in-process: Ray shows it no GPU, so use_gpu silently ran on the CPU."""
    from raystack.errors import UserError
    from raystack.tuning.sweep import run_sweep, trial_resources

    assert trial_resources(_space()) == {"cpu": 1}
    with pytest.raises(UserError, match=f"^{says}: a sweep runs each trial on one CPU"):
        run_sweep(_space(**kw), tmp_path / "sweep")
    assert not (tmp_path / "sweep").exists()


class HostSyncs(TorchFunctionMode):
    """Counts this repository's reads of tensor values on the host (each one a device sync on a GPU; torch's own
    optimizers read a step counter kept on the CPU)."""

    READS = {torch.Tensor.__float__, torch.Tensor.__bool__, torch.Tensor.__int__, torch.Tensor.item,
             torch.Tensor.tolist}

    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.n += func in self.READS and sys._getframe(1).f_code.co_filename.startswith(OURS)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("method", ["freezeasguard", "freezeasguard-pool"])
def test_a_mask_step_reads_the_mask_once_not_once_per_tensor(world, method):
    r = _phase(_spec(world, method), _pipe())
    r.prepare()
    r.step()
    with HostSyncs() as syncs:
        r.step()
    assert syncs.n < 40 < len(r.params), syncs.n


def test_the_one_read_mask_updates_equal_the_per_tensor_ones():
    """user_steps and follow_mask as they read m per tensor before, bit for bit."""
    from raystack.hardening.freezeasguard import follow_mask, mask_of, user_steps

    g = torch.Generator().manual_seed(0)
    shapes = [(3, 4), (5,), (2, 2, 3), (7,)]
    pre = [torch.randn(s, generator=g) for s in shapes]
    ft = [torch.randn(s, generator=g) for s in shapes]
    target = [torch.randn(s, generator=g) for s in shapes]
    m, m_new = mask_of(torch.randn(4, generator=g), 0.2), mask_of(torch.randn(4, generator=g), 0.2)

    def loss(ps):
        return sum(((t.sin() - y) ** 2).sum() for t, y in zip(ps, target))

    def start():
        return ([torch.nn.Parameter(m[i] * pre[i] + (1 - m[i]) * ft[i]) for i in range(4)],
                [p - f for p, f in zip(pre, ft)])

    params, theta_d = start()
    user_steps(params, theta_d, m, lambda: loss(params), lr=0.05, steps=3)
    follow_mask(params, theta_d, m, m_new)
    old_params, old_d = start()
    for _ in range(3):  # the code before: float(m[i]) per tensor
        grads = torch.autograd.grad(loss(old_params), old_params)
        with torch.no_grad():
            for i, (p, gr) in enumerate(zip(old_params, grads)):
                free = 1.0 - m[i]
                old_d[i].view(-1).add_(gr.reshape(-1), alpha=float(0.05 * free))
                p.sub_(gr, alpha=float(0.05 * free * free))
    with torch.no_grad():
        for i, p in enumerate(old_params):
            dm = float(m_new[i] - m[i])
            if dm:
                p.add_(old_d[i], alpha=dm)
    assert all(torch.equal(a, b) for a, b in zip(params, old_params))
    assert all(torch.equal(a, b) for a, b in zip(theta_d, old_d))

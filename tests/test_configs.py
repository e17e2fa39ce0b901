"""Every shipped YAML parses and holds what it must: cluster configs, harden configs."""

from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["cluster.yaml", "cluster-local.yaml"])
def test_cluster_config_structure(name):
    cfg = yaml.safe_load((ROOT / name).read_text())
    for key in ("cluster_name", "provider", "auth", "setup_commands", "head_start_ray_commands",
                "worker_start_ray_commands", "file_mounts"):
        assert key in cfg, key
    head = " ".join(cfg["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head  # dashboard and job server on loopback only
    assert any("pip install" in c and "immunize-cli" in c for c in cfg["setup_commands"])
    # token authentication (Ray 2.60 turns it on only when told to, or when a token already exists): every
    # `ray start` runs with RAY_AUTH_MODE=token, every node gets the token, and the nodes' clients use it too
    starts = [c for c in cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"] if "ray start" in c]
    assert len(starts) == 2 and all(c.startswith("RAY_AUTH_MODE=token ray start") for c in starts), starts
    mounts = {str(k): str(v) for k, v in cfg["file_mounts"].items()}
    assert any(k.endswith("/.ray/auth_token") and v == "~/.ray/auth_token" for k, v in mounts.items()), mounts
    assert any("export RAY_AUTH_MODE=token" in c for c in cfg["setup_commands"])
    assert "RAY_AUTH_MODE=disabled" not in (ROOT / name).read_text()
    if cfg["provider"]["type"] == "local":
        assert cfg["provider"]["head_ip"] and cfg["provider"]["worker_ips"]
    else:
        assert cfg["head_node_type"] in cfg["available_node_types"]


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_harden_configs_build_a_spec(path, tmp_path):
    from raystack.hardening.spec import HardenSpec
    from raystack.specs import build_spec, read_yaml

    header = path.read_text().splitlines()[0]
    assert header.startswith("# immunize-cli harden --config configs/" + path.name)
    values = read_yaml(path)
    values.setdefault("target", [str(tmp_path)])
    values.setdefault("legal", str(tmp_path))
    spec = build_spec(HardenSpec, values, source=str(path))
    assert spec.method in ("imma", "freezeasguard", "random-freeze", "imma+freeze")


@pytest.mark.parametrize("path", sorted((ROOT / "tune_spaces").glob("*.yaml")), ids=lambda p: p.name)
def test_tune_spaces_validate_and_show_their_command(path):
    from raystack.tuning.space import load_space, param_space

    first = path.read_text().splitlines()[0]
    assert first.startswith("# immunize-cli tune --space tune_spaces/" + path.name), first
    space = load_space(path)
    assert set(param_space(space)) == set(space.search)
    assert space.attacks and all(a["method"] for a in space.attacks)


def test_pareto_front_and_scalarisation():
    from raystack.tuning.space import TuneSpace
    from raystack.tuning.sweep import pareto_front, scalarise

    rows = [{"mitigation": 0.1, "utility": 0.8}, {"mitigation": 0.2, "utility": 0.9},
            {"mitigation": 0.3, "utility": 0.7}, {"mitigation": 0.1, "utility": 0.6}]
    assert pareto_front(rows) == [0, 1]  # 2 is beaten by 0 on both; 3 by 0 on utility at equal mitigation
    space = TuneSpace(name="s", harden={"method": "freezeasguard"}, search={"rho": {"grid": [0.2]}},
                      mitigation_weight=2.0, utility_weight=0.5)
    assert scalarise(space, 0.1, 0.8) == pytest.approx(0.5 * 0.8 - 2.0 * 0.1)


def test_search_algorithm_and_scheduler_are_selectable():
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search import ConcurrencyLimiter

    from raystack.tuning.space import TuneSpace
    from raystack.tuning.sweep import make_scheduler, make_search_alg

    def space(**kw):
        return TuneSpace(name="s", harden={"method": "freezeasguard"}, search={"rho": {"uniform": [0.1, 0.8]}}, **kw)

    assert make_search_alg(space(algorithm="random"), 2) is None
    alg = make_search_alg(space(algorithm="optuna"), 2)
    assert isinstance(alg, ConcurrencyLimiter) and type(alg.searcher).__name__ == "OptunaSearch"
    assert isinstance(make_scheduler(space(scheduler="asha")), ASHAScheduler)
    assert make_scheduler(space(scheduler="fifo")) is None


def test_tune_space_overrides_are_dotted_and_typed():
    from raystack.tuning.space import load_space

    path = ROOT / "tune_spaces" / "freezeasguard_vs_random_rho.yaml"
    base = load_space(path)
    space = load_space(path, ["harden.seed=1", "name=seed1", "search.rho={grid: [0.2, 0.4]}", "eval_samples=8"])
    assert space.harden == {**base.harden, "seed": 1} and base.harden.get("seed") is None
    assert space.name == "seed1" and space.eval_samples == 8
    assert space.search == {**base.search, "rho": {"grid": [0.2, 0.4]}}

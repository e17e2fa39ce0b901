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

"""The Kubernetes deployment (deploy/kuberay/*.yaml, Dockerfile) holds what it must, checked without a cluster,
Docker or Ray: the KubeRay objects' structure, one image built from this project on head and workers, no shared
disk, credentials from Secrets, and a RayJob entrypoint that the real `harden` parser accepts (parsed and turned
into a HardenSpec in this process; nothing runs)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
KUBERAY = ROOT / "deploy" / "kuberay"
#: volume sources a pod may use: its own scratch space and what Kubernetes mounts from its API (no disk shared
#: between pods, no node's disk)
POD_LOCAL_VOLUMES = {"emptyDir", "secret", "configMap", "projected", "downwardAPI"}
#: the flags of harden that name data; on Kubernetes each must be a bucket URI (no pod shares a disk)
DATA_FLAGS = ("--model", "--target", "--legal", "--out")


@pytest.fixture(autouse=True)
def _threads():
    """Replaces the session's thread and library setup (conftest.py), which imports torch and diffusers: these
    checks import neither, and stay well under a second."""
    yield


def pyproject() -> dict:
    try:
        import tomllib
    except ImportError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def manifests() -> dict[str, dict]:
    """kind -> the one object of each YAML file in deploy/kuberay (each file holds exactly one)."""
    found = {}
    for path in sorted(KUBERAY.glob("*.y*ml")):
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
        assert len(docs) == 1, f"{path.name}: {len(docs)} objects"
        obj = docs[0]
        assert obj["apiVersion"] == "ray.io/v1", path.name
        assert obj["kind"] not in found, f"two {obj['kind']} objects"
        found[obj["kind"]] = obj
    return found


def cluster_specs() -> list[tuple[str, dict]]:
    m = manifests()
    return [("RayCluster", m["RayCluster"]["spec"]), ("RayJob", m["RayJob"]["spec"]["rayClusterSpec"])]


def pods(spec: dict) -> list[tuple[str, dict]]:
    """(group, pod spec) of the head and of every worker group."""
    return [("head", spec["headGroupSpec"]["template"]["spec"])] + \
        [(g["groupName"], g["template"]["spec"]) for g in spec["workerGroupSpecs"]]


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined, comments dropped."""
    lines = [ln for ln in (ROOT / "Dockerfile").read_text().splitlines() if not ln.lstrip().startswith("#")]
    text = re.sub(r"\\\n", " ", "\n".join(lines))
    return [(ln.split(None, 1)[0].upper(), ln.split(None, 1)[1] if " " in ln.strip() else "")
            for ln in text.splitlines() if ln.strip()]


def image_ray_version() -> str:
    """RAY_VERSION of the Dockerfile, after checking that the image is Ray's own GPU image of that version."""
    instr = dockerfile()
    args = dict(a.split("=", 1) for i, a in instr if i == "ARG" and "=" in a)
    froms = [a for i, a in instr if i == "FROM"]
    assert len(froms) == 1, froms
    image = froms[0].replace("${RAY_VERSION}", args.get("RAY_VERSION", "")).replace("$RAY_VERSION", args.get("RAY_VERSION", ""))
    m = re.fullmatch(r"rayproject/ray:(\d+\.\d+\.\d+)-py3(11|12)-(gpu|cu\d+)", image)
    assert m, f"FROM {image}: expected rayproject/ray:<version>-py311|py312-gpu"
    return m.group(1)


def test_deploy_folder_holds_a_raycluster_and_a_rayjob():
    assert set(manifests()) == {"RayCluster", "RayJob"}
    readme = (KUBERAY / "README.md").read_text()
    assert "raycluster.yaml" in readme and "rayjob.yaml" in readme and "kubectl apply" in readme


@pytest.mark.parametrize("where,spec", cluster_specs(), ids=lambda v: v if isinstance(v, str) else "")
def test_cluster_spec(where, spec):
    assert spec["rayVersion"] == image_ray_version(), "rayVersion must be the image's Ray (Dockerfile RAY_VERSION)"
    assert spec.get("authOptions", {}).get("mode") == "token", "Ray token authentication"
    # the head: CPU-only and no Ray work on it (it runs the driver); no GPU requested
    head = spec["headGroupSpec"]
    assert head["rayStartParams"].get("num-cpus") == "0" and head["rayStartParams"].get("num-gpus") == "0"
    for c in head["template"]["spec"]["containers"]:
        res = c.get("resources", {})
        assert "nvidia.com/gpu" not in {**res.get("requests", {}), **res.get("limits", {})}
    # GPU workers: one GPU per pod, sane bounds
    assert spec["workerGroupSpecs"]
    for g in spec["workerGroupSpecs"]:
        assert 0 <= g["minReplicas"] <= g["replicas"] <= g["maxReplicas"], g["groupName"]
        (worker,) = g["template"]["spec"]["containers"]
        assert int(worker["resources"]["limits"]["nvidia.com/gpu"]) == 1, g["groupName"]
    images = set()
    for group, pod in pods(spec):
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        for v in volumes.values():  # no shared disk: no PVC, hostPath, NFS, CSI, ...
            kinds = set(v) - {"name"}
            assert kinds <= POD_LOCAL_VOLUMES, f"{group}: volume {v['name']} is {kinds}"
        for c in pod["containers"]:
            images.add(c["image"])
            mounts = {m["mountPath"]: volumes[m["name"]] for m in c.get("volumeMounts", [])}
            assert mounts["/dev/shm"]["emptyDir"].get("medium") == "Memory", f"{group}: /dev/shm"
            env = {e["name"]: e for e in c.get("env", [])}
            assert env["IMMUNIZE_CACHE"]["value"] in mounts and "emptyDir" in mounts[env["IMMUNIZE_CACHE"]["value"]]
            for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):  # from a Secret, never written here
                assert "value" not in env[key] and env[key]["valueFrom"]["secretKeyRef"]["key"] == key, key
            assert "RAY_AUTH_MODE" not in env or env["RAY_AUTH_MODE"].get("value") == "token"
    assert len(images) == 1, f"head and workers run different images: {images}"
    (image,) = images
    assert not image.startswith("rayproject/") and ":" in image.rsplit("/", 1)[-1], \
        f"{image}: the image built from this project's Dockerfile, with a tag"


def test_rayjob_makes_the_raycluster_and_deletes_it():
    m = manifests()
    job = m["RayJob"]["spec"]
    assert job["shutdownAfterJobFinishes"] is True
    assert job["rayClusterSpec"] == m["RayCluster"]["spec"], \
        "rayjob.yaml's rayClusterSpec differs from raycluster.yaml's spec: change both"


def test_rayjob_entrypoint_parses_with_the_real_harden_flags():
    import typer

    from cli.main import app
    from raystack.hardening.spec import HardenSpec
    from raystack.specs import spec_from_cli

    spec = manifests()["RayJob"]["spec"]
    argv = shlex.split(spec["entrypoint"])
    assert argv[:2] == ["immunize-cli", "harden"], argv[:2]
    assert "immunize-cli" in pyproject()["project"]["scripts"]
    harden = typer.main.get_command(app).commands["harden"]
    ctx = harden.make_context("harden", argv[2:])  # unknown flags and bad values raise here; nothing runs
    params = dict(ctx.params)
    assert params["cluster"] == "auto" and params["use_gpu"] is True
    gpus = sum(g["maxReplicas"] * int(g["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
               for g in spec["rayClusterSpec"]["workerGroupSpecs"])
    assert 1 <= params["workers"] <= gpus, f"--workers {params['workers']}: the cluster has at most {gpus} GPUs"
    built = spec_from_cli(HardenSpec, params.pop("config"), params)  # the spec's own checks, as harden makes it
    assert built.workers == params["workers"] and built.use_gpu
    # every data flag is a bucket URI (a pod's disk is its own); --model and --out are given
    given = {}
    for i, word in enumerate(argv):
        flag, _, value = word.partition("=")
        if flag in DATA_FLAGS:
            given.setdefault(flag, []).append(value or argv[i + 1])
    assert {"--model", "--target", "--out"} <= set(given), given
    for flag, values in given.items():
        assert all(v.startswith("s3://") for v in values), f"{flag} {values}"
    assert isinstance(built.out, str) and built.out.startswith("s3://")
    assert all(isinstance(t, str) and t.startswith("s3://") for t in built.target)
    # the same parser refuses a misspelled flag: the check above can fail
    with pytest.raises(Exception, match="No such option"):
        harden.make_context("harden", [*argv[2:], "--worker", "2"])


def test_dockerfile_installs_this_project_with_the_clusters_ray():
    instr = dockerfile()
    version = image_ray_version()
    from packaging.requirements import Requirement

    (ray_req,) = [Requirement(r) for r in pyproject()["project"]["dependencies"] if Requirement(r).name == "ray"]
    assert ray_req.specifier.contains(version), f"image Ray {version} does not meet pyproject's {ray_req}"
    for _, spec in cluster_specs():
        assert spec["rayVersion"] == version
    # `pip install .` of this project (the GPU path: never the CPU-only pin), and the image's Ray kept
    commands = " ".join(args for _, args in instr)  # the instructions, not the comments
    assert "constraints-cpu" not in commands and "constraint" not in commands.lower()
    installs = []  # the words of each `pip install` command of a RUN (split at &&, ;, || outside quotes)
    for kind, args in instr:
        if kind == "RUN":
            lexer = shlex.shlex(args, posix=True, punctuation_chars=";&|")
            lexer.whitespace_split = True
            command: list[str] = []
            for word in [*lexer, ";"]:
                if set(word) <= set(";&|"):
                    if "pip" in command and "install" in command:
                        installs.append(command)
                    command = []
                else:
                    command.append(word)
    assert any("." in words for words in installs), installs
    assert any("ray[train,tune,default]==${RAY_VERSION}" in words for words in installs), installs
    assert not any(kind in ("ENTRYPOINT", "CMD") for kind, _ in instr), "the entrypoint is left to Ray"
    ignored = {ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()}
    assert {".venv", "runs", ".git"} <= ignored
    assert not ignored & {"README.md", "pyproject.toml", "cli", "raystack", "*"}  # what `pip install .` reads

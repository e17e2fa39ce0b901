"""One run per --out; an embedded Ray dies with its driver; oversubscription fails fast; a release that
diverged is refused; a signed release is checked (Reliability II)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from raystack.tinyworld.folder import write_concept_folder

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "cli.main"]


def _env(**extra):
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    env.update(extra)
    return env


def test_two_runs_on_one_out_the_second_is_refused_naming_the_holder(tmp_path):
    """The first run holds its lock while it saves (paused there by the fault hook); a second run on the same
    --out gets one line with the first one's pid, and the first still finishes."""
    out, marker = tmp_path / "data", tmp_path / "saving"
    first = subprocess.Popen(CLI + ["world", "generate", "--out", str(out), "--style", "sunset", "--n", "1"],
                             cwd=ROOT, env=_env(IMMUNIZE_FAULT_SAVE_PAUSE="6", IMMUNIZE_FAULT_SAVE_MARKER=str(marker)),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        t0 = time.time()
        while not marker.exists() and time.time() - t0 < 60:
            time.sleep(0.1)
        assert marker.exists(), first.communicate()[1]
        second = subprocess.run(CLI + ["world", "generate", "--out", str(out), "--style", "plain", "--n", "1",
                                       "--overwrite"], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=60)
        lines = second.stderr.strip().splitlines()
        assert second.returncode == 2 and len(lines) == 1, second.stderr
        assert f"in use by another immunize-cli run (pid {first.pid})" in lines[0]
        _, err = first.communicate(timeout=60)
        assert first.returncode == 0, err
    finally:
        if first.poll() is None:
            first.kill()
    meta = (out / "metadata.jsonl").read_text()
    assert "sunset" in meta and "plain" not in meta  # the second run changed nothing
    assert not list(tmp_path.glob(".*.lock"))  # the lock goes with the run


def test_harden_locks_out_and_its_run_folder(tmp_path):
    from raystack.errors import UserError
    from raystack.outputs import output_lock

    out = tmp_path / "hardened"
    with output_lock(out, with_run_dir=True):
        for target in (out, tmp_path / "hardened.run"):
            probe = ("from pathlib import Path; from raystack.outputs import output_lock\n"
                     f"with output_lock(Path({str(target)!r})): pass")
            res = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=60)
            assert res.returncode != 0 and f"pid {os.getpid()}" in res.stderr, res.stderr
        with pytest.raises(UserError, match="in use"):  # a second holder in this process is refused too
            with output_lock(out):
                pass
    with output_lock(out):  # released: free again
        pass


def test_oversubscribed_harden_fails_fast_without_starting_ray(tmp_path):
    write_concept_folder(tmp_path / "t", ["circle"], ["red"], ["sunset"], 1, 0, None, False)
    t0 = time.time()
    res = subprocess.run(CLI + ["harden", "--method", "imma", "--target", str(tmp_path / "t"), "--out",
                                str(tmp_path / "o"), "--workers", "64"], cwd=ROOT, env=_env(), capture_output=True,
                         text=True, timeout=60)
    took = time.time() - t0
    assert res.returncode == 2 and "--workers 64: this machine has" in res.stderr, res.stderr
    assert took < 30, took
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t"]


def test_a_gpu_request_this_machine_cannot_meet_fails_fast_with_the_numbers(tmp_path):
    """`--use-gpu` where there is no GPU: one line with the count, in seconds, before any Ray starts (it used to
    wait at "starting Ray 0/1" with no word)."""
    import torch

    if torch.cuda.device_count():
        pytest.skip("this machine has a GPU")
    write_concept_folder(tmp_path / "t", ["circle"], ["red"], ["sunset"], 1, 0, None, False)
    t0 = time.time()
    res = subprocess.run(CLI + ["harden", "--method", "imma", "--target", str(tmp_path / "t"), "--out",
                                str(tmp_path / "o"), "--use-gpu"], cwd=ROOT, env=_env(), capture_output=True,
                         text=True, timeout=60)
    assert res.returncode == 2 and "--workers 1 --use-gpu: this machine has 0 GPU(s)" in res.stderr, res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    assert time.time() - t0 < 30
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t"]


@pytest.mark.e2e
@pytest.mark.ray
def test_oversubscribed_cluster_fails_with_the_numbers(ray_session):
    """Against a running Ray (here the test session's, 4 logical CPUs) the check uses the cluster's totals."""
    from raystack.errors import UserError
    from raystack.raysession import check_cluster_capacity

    t0 = time.time()
    with pytest.raises(UserError, match=r"--workers 8: the cluster has 4 CPU\(s\) in total"):
        check_cluster_capacity(8, False, None)
    with pytest.raises(UserError, match="waited --placement-timeout"):
        check_cluster_capacity(8, False, 1.0)
    with pytest.raises(UserError, match=r"--workers 1: the cluster has 0 GPU\(s\) in total"):
        check_cluster_capacity(1, True, None)  # a GPU job on a cluster without GPUs: at once, not a silent wait
    assert time.time() - t0 < 30
    check_cluster_capacity(2, False, None)


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _survivors(seen: dict, timeout: float = 30.0) -> list[int]:
    """The recorded processes ({pid: start time}) still alive after waiting up to `timeout` for them to go."""
    from raystack.ray_reaper import _stat

    def alive():
        return [p for p, start in seen.items() if (_stat(p) or (0, None))[1] == start]

    t1 = time.time()
    while alive() and time.time() - t1 < timeout:
        time.sleep(0.5)
    return alive()


@pytest.mark.e2e
def test_sigkill_of_the_driver_leaves_no_ray_process(tmp_path):
    """Ray's fate-sharing ends the GCS and raylet with the driver, not the dashboard and runtime-env agents the
    raylet starts: without the parent-death watch they kept running (seen: ray::DashboardAgent and
    ray::RuntimeEnvAgent re-parented to init)."""
    from raystack.ray_reaper import descendants

    write_concept_folder(tmp_path / "t", ["circle"], ["red"], ["sunset"], 2, 0, None, False)
    driver = subprocess.Popen(CLI + ["harden", "--method", "imma", "--target", str(tmp_path / "t"), "--out",
                                     str(tmp_path / "o"), "--steps", "500", "--batch-size", "2"],
                              cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        seen, t0 = {}, time.time()
        while time.time() - t0 < 180:  # until the agents are up: the processes that used to outlive the driver
            seen.update(descendants(driver.pid))
            cmds = " ".join(_cmdline(p) for p in seen)
            if "raylet" in cmds and "DashboardAgent" in cmds and "RuntimeEnvAgent" in cmds:
                break
            time.sleep(0.5)
        assert "DashboardAgent" in cmds and "RuntimeEnvAgent" in cmds, cmds[:500]
        driver.send_signal(signal.SIGKILL)
        driver.wait(timeout=30)

        left = _survivors(seen)
        assert not left, [_cmdline(p)[:80] for p in left]
    finally:
        if driver.poll() is None:
            driver.kill()


@pytest.mark.e2e
def test_a_finished_command_leaves_its_embedded_ray_to_the_reaper(tmp_path):
    """`immunize-cli` ends with os._exit once its outputs are written (cli.main.run): no ray.shutdown, no
    interpreter teardown. The release must be complete and every process of its embedded Ray must still go."""
    from raystack.ray_reaper import descendants

    write_concept_folder(tmp_path / "t", ["circle"], ["red"], ["sunset"], 2, 0, None, False)
    driver = subprocess.Popen(CLI + ["harden", "--method", "imma", "--target", str(tmp_path / "t"), "--out",
                                     str(tmp_path / "o"), "--steps", "2", "--batch-size", "2"],
                              cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen: dict = {}
    cmds: dict = {}
    while driver.poll() is None:
        for pid, start in descendants(driver.pid).items():
            seen[pid] = start
            cmds.setdefault(pid, _cmdline(pid))
        time.sleep(0.2)
    out, err = driver.communicate()
    assert driver.returncode == 0, err[-500:]
    assert "imma: " in out  # the last line was flushed before the fast exit
    assert json.loads((tmp_path / "o" / "manifest.json").read_text())["method"] == "imma"
    assert any("raylet" in c for c in cmds.values()), "the run started no embedded Ray"

    left = _survivors(seen)
    assert not left, [_cmdline(p)[:80] for p in left]


@pytest.mark.e2e
def test_a_diverged_release_is_refused_and_nothing_is_written(tmp_path):
    """--outer-lr 1e30 (finite: the flag check lets it through) leaves weights near 1e30: the UNet predicts
    inf/NaN, the release is refused with exit 1, and neither --out nor its run folder is left."""
    code, line = _imma_harden(tmp_path, tmp_path / "o", "--steps", "3", "--outer-lr", "1e30")
    assert code == 1 and "predicts NaN or inf" in line, line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t"]


def _imma_harden(tmp_path, out, *extra) -> tuple[int, str]:
    """A small IMMA harden of a 2-image sunset folder through the CLI: (exit code, its one stderr line)."""
    write_concept_folder(tmp_path / "t", ["circle"], ["red"], ["sunset"], 2, 0, None, False)
    res = subprocess.run(CLI + ["harden", "--method", "imma", "--target", str(tmp_path / "t"), "--out", str(out),
                                "--batch-size", "2", *extra], cwd=ROOT, env=_env(), capture_output=True, text=True,
                         timeout=300)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    return res.returncode, lines[0]


@pytest.mark.e2e
def test_signed_release_verifies_and_a_rewritten_manifest_does_not(tmp_path):
    """harden --sign-key / verify --public-key; the manifest holds no absolute path."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.generate()
    (tmp_path / "key.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                         serialization.NoEncryption()))
    (tmp_path / "key.pub.pem").write_bytes(key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    other = Ed25519PrivateKey.generate().public_key()
    (tmp_path / "other.pub.pem").write_bytes(other.public_bytes(serialization.Encoding.PEM,
                                                                serialization.PublicFormat.SubjectPublicKeyInfo))
    out = tmp_path / "release"
    res = subprocess.run(CLI + ["harden", "--method", "random-freeze", "--rho", "0.3", "--out", str(out),
                                "--sign-key", str(tmp_path / "key.pem")], cwd=ROOT, env=_env(), capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    text = (out / "manifest.json").read_text()
    assert str(tmp_path) not in text and str(ROOT) not in text  # no local path leaks into the release
    manifest = json.loads(text)
    assert manifest["source_model"] == "tinyworld" and manifest["spec"]["out"] == "."
    assert manifest["spec"]["sign_key"] is None and (out / "manifest.sig").is_file()

    def verify(*extra):
        return subprocess.run(CLI + ["verify", str(out), *extra], cwd=ROOT, env=_env(), capture_output=True,
                              text=True, timeout=120)

    ok = verify("--public-key", str(tmp_path / "key.pub.pem"))
    assert ok.returncode == 0 and "SIGNED" in ok.stdout, ok.stderr
    assert verify("--public-key", str(tmp_path / "other.pub.pem")).returncode == 1
    # someone changes the mask and rewrites the manifest's hashes to match: the hashes pass, the signature does not
    from raystack.hardening.driver import hash_tree

    mask = out / "freeze_mask.safetensors"
    data = bytearray(mask.read_bytes())
    data[-1] ^= 1
    mask.write_bytes(bytes(data))
    manifest["files"] = {k: v for k, v in hash_tree(out).items() if k not in ("manifest.json", "manifest.sig")}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    assert verify().returncode == 0  # hashes alone: accidental corruption only
    bad = verify("--public-key", str(tmp_path / "key.pub.pem"))
    assert bad.returncode == 1 and "does not match" in bad.stderr


@pytest.mark.e2e
def test_harden_on_a_full_disk_is_one_line_and_leaves_no_run_folder(tmp_path):
    """--out on a 3 MB tmpfs: the Ray job's checkpoints fit, the 7 MB release does not. One line, exit 2, no
    --out, no <out>.run, no temporary folder (needs root to mount; CI's machine is like this one)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (not root)")
    try:
        code, line = _imma_harden(tmp_path, disk / "o", "--steps", "2", "--checkpoint-every", "1")
        assert code == 2 and "no space left on device" in line, line
        assert sorted(os.listdir(disk)) == []
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)

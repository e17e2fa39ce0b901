"""Object storage cost: a harden run whose checkpoints live in S3 against one on the local disk, and our upload
(`upload_release`) and download (`fetch`) throughput against pyarrow's own `copy_files` of the same bytes.

    nice -n 10 .venv/bin/python bench/storage.py [--runs 2] [--reps 3] [--synthetic-mb 200] [--sample-mb 40]

Everything talks to a local S3 that this script starts itself: moto's server on a loopback port, reached through
AWS_ENDPOINT_URL and the standard credential variables (as tests/conftest.py's `s3_server` does). A loopback
moto is not a real store: no network latency, and the server (one Python process) shares the CPUs with the
client, so the ratios say what our code costs beside pyarrow's, not what a bucket in a region would give.

1. Harden: `immunize-cli harden --method imma --steps 12 --checkpoint-every 2 --batch-size 2 --target T` with
   `--out s3://BUCKET/rel-N` (the run's checkpoints in `<out>.run` in the bucket, then the release uploaded) and
   with `--out LOCAL` (checkpoints in `<out>.run` on the local disk), alternating, `--runs` times each; wall time
   of the whole command. The two releases' UNet weights are compared (max abs diff; same seed, same steps).
2. Transfer: for the tiny model (`default_model_path()`) and a synthetic folder of random bytes (a few files,
   `--synthetic-mb` in all): `upload_release` against `pyarrow.fs.copy_files` of the same folder to another
   prefix, and `fetch(uri, fresh=True)` against `copy_files` of the same objects to a local folder; `--reps`
   rounds, the order alternating each round (a folder smaller than `--sample-mb`: each round's sample is several
   transfers, each timed on its own and summed); MB/s (10^6 bytes) of each and ours/raw (goal >= 0.8x). Diagnostic
   rows (not ours, not the baseline) time the building blocks ours uses, to show where a gap comes from.
Run with OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 (set here) and IMMUNIZE_CACHE in a temporary folder (set here).
Writes bench/results/storage.{json,md}.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
VENV_BIN = ROOT / ".venv" / "bin"
CLI = str(VENV_BIN / "immunize-cli")
HARDEN = ["harden", "--method", "imma", "--steps", "12", "--checkpoint-every", "2", "--batch-size", "2"]
#: the synthetic folder's files, as shares of --synthetic-mb (a UNet-sized file, two smaller ones, a small one)
SYNTHETIC_SHARES = {"unet/weights.bin": 0.48, "text_encoder/weights.bin": 0.32, "vae/weights.bin": 0.16,
                    "extra/small.bin": 0.04}


def start_moto(log: Path) -> tuple[subprocess.Popen, dict]:
    """moto's server on a free loopback port, as tests/conftest.py starts it; (process, environment to reach it)."""
    server = VENV_BIN / "moto_server"
    if not server.exists():
        server = Path(shutil.which("moto_server") or "moto_server")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([str(server), "-H", "127.0.0.1", "-p", str(port)], stdout=open(log, "w"),
                            stderr=subprocess.STDOUT, start_new_session=True)
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_EC2_METADATA_DISABLED": "true"}
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc, env
        except OSError:
            time.sleep(0.3)
    proc.kill()
    raise SystemExit(f"moto_server did not start: {log.read_text()[-2000:]}")


def tree_bytes(path: Path) -> tuple[int, int]:
    files = [p for p in Path(path).rglob("*") if p.is_file()]
    return len(files), sum(p.stat().st_size for p in files)


def tree_digest(path: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(q for q in Path(path).rglob("*") if q.is_file()):
        h.update(p.relative_to(path).as_posix().encode())
        with open(p, "rb") as fh:
            for chunk in iter(lambda: fh.read(8 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def median(xs):
    return statistics.median(xs) if xs else None


# ---------------------------------------------------------------------------------------------------- harden


def unet_max_abs_diff(a: Path, b: Path) -> float:
    from safetensors.torch import load_file

    wa = load_file(str(a / "unet" / "diffusion_pytorch_model.safetensors"))
    wb = load_file(str(b / "unet" / "diffusion_pytorch_model.safetensors"))
    if wa.keys() != wb.keys():
        return float("inf")
    return max(float((wa[k].float() - wb[k].float()).abs().max()) if wa[k].numel() else 0.0 for k in wa)


def bench_harden(args, tmp: Path, env: dict, bucket: str) -> dict:
    from raystack.storage import fetch
    from raystack.tinyworld.folder import write_concept_folder

    target = tmp / "target"
    write_concept_folder(target, ["circle"], ["red"], ["sunset"], 2, 0, None, False)
    runs = {"s3": [], "local": []}
    releases = {}
    for i in range(args.runs):
        order = ["s3", "local"] if i % 2 == 0 else ["local", "s3"]
        for where in order:
            out = f"s3://{bucket}/rel-{i}" if where == "s3" else str(tmp / f"rel-local-{i}")
            argv = [CLI, *HARDEN, "--target", str(target), "--out", out]
            print("+", " ".join(argv), flush=True)
            load = os.getloadavg()[0]
            t0 = time.perf_counter()
            res = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
            wall = time.perf_counter() - t0
            if res.returncode != 0:
                raise SystemExit(f"harden --out {out} failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
            local = fetch(out, "--out", fresh=True) if where == "s3" else Path(out)
            manifest = json.loads((local / "manifest.json").read_text())
            runs[where].append({"wall_s": wall, "job_s": manifest.get("wall_seconds"), "out": out, "load_at_start": load})
            releases.setdefault(where, local)
            print(f"  {where}: {wall:.1f}s (job {manifest.get('wall_seconds', 0):.1f}s)", flush=True)
    s3_wall, local_wall = median([r["wall_s"] for r in runs["s3"]]), median([r["wall_s"] for r in runs["local"]])
    s3_job, local_job = median([r["job_s"] for r in runs["s3"]]), median([r["job_s"] for r in runs["local"]])
    diff = unet_max_abs_diff(releases["s3"], releases["local"])
    return {"command": HARDEN + ["--target", "TARGET", "--out", "s3://BUCKET/rel-N | LOCAL"], "runs": runs,
            "median_wall_s": {"s3": s3_wall, "local": local_wall}, "ratio_s3_over_local": s3_wall / local_wall,
            "median_job_s": {"s3": s3_job, "local": local_job},
            "unet_max_abs_diff": diff}


# ---------------------------------------------------------------------------------------------------- transfer


def make_synthetic(dest: Path, total_mb: int) -> Path:
    rng_bytes = os.urandom
    for rel, share in SYNTHETIC_SHARES.items():
        p = dest / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        left = int(total_mb * 1e6 * share)
        with open(p, "wb") as fh:
            while left > 0:
                n = min(left, 8 << 20)
                fh.write(rng_bytes(n))
                left -= n
    (dest / "manifest.json").write_text(json.dumps({"synthetic": True, "files": sorted(SYNTHETIC_SHARES)}))
    return dest


def bench_transfer(args, tmp: Path, bucket: str, datasets: dict) -> dict:
    import pyarrow.fs as pafs

    from raystack.storage import cache_dir, fetch, filesystem, upload_release

    fs, _ = filesystem(f"s3://{bucket}/x", "--bench")
    localfs = pafs.LocalFileSystem()

    def up_ours(src, prefix):
        upload_release(src, f"s3://{bucket}/{prefix}")

    def up_raw(src, prefix):
        pafs.copy_files(str(src), f"{bucket}/{prefix}", source_filesystem=localfs, destination_filesystem=fs)

    def up_raw_serial(src, prefix):  # diagnostic: copy_files of the folder on one thread
        pafs.copy_files(str(src), f"{bucket}/{prefix}", source_filesystem=localfs, destination_filesystem=fs,
                        use_threads=False)

    def down_ours(prefix, dest):
        return fetch(f"s3://{bucket}/{prefix}", "--bench", fresh=True)

    def down_raw(prefix, dest):  # the strongest plain call: threads on, 8 MiB reads (1 MiB, its default, is slower)
        dest.mkdir(parents=True, exist_ok=True)  # copy_files makes only the folders of nested files
        pafs.copy_files(f"{bucket}/{prefix}", str(dest), source_filesystem=fs, destination_filesystem=localfs,
                        chunk_size=8 << 20)
        return dest

    def down_raw_chunk(chunk_mib, threads):  # diagnostic: copy_files reading as fetch does (8 MiB at a time)
        def down(prefix, dest):
            dest.mkdir(parents=True, exist_ok=True)
            pafs.copy_files(f"{bucket}/{prefix}", str(dest), source_filesystem=fs, destination_filesystem=localfs,
                            chunk_size=chunk_mib << 20, use_threads=threads)
            return dest
        return down

    uploads = {"ours": up_ours, "raw": up_raw}
    downloads = {"ours": down_ours, "raw": down_raw}
    diag_up = {"copy_files, use_threads=False": up_raw_serial} if args.diagnostics else {}
    diag_down = ({"copy_files, chunk_size=1 MiB (its default)": down_raw_chunk(1, True),
                  "copy_files, chunk_size=8 MiB, use_threads=False": down_raw_chunk(8, False)}
                 if args.diagnostics else {})

    out = {}
    for name, src in datasets.items():
        nfiles, nbytes = tree_bytes(src)
        digest = tree_digest(src)
        slug = "".join(c if c.isalnum() else "-" for c in name)
        # a small folder moves in a fraction of a second: each sample is the sum of `inner` transfers, each timed
        # on its own (the clean-up between them untimed), so one stall of this shared machine weighs less
        inner = max(1, min(args.max_inner, round(args.sample_mb * 1e6 / nbytes)))
        rec = {"files": nfiles, "bytes": nbytes, "transfers_per_sample": inner, "upload": {}, "download": {}}
        print(f"transfer {name}: {nfiles} files, {nbytes / 1e6:.1f} MB, {inner} transfer(s) a sample", flush=True)
        for rep in range(args.reps):
            up_order = list(uploads) if rep % 2 == 0 else list(reversed(uploads))
            prefixes = []
            for who in up_order + list(diag_up):
                fn = uploads.get(who) or diag_up[who]
                dt = 0.0
                for k in range(inner):
                    prefix = f"{slug}/up-{who.split(',')[0].replace(' ', '').replace('_', '')}-{rep}-{k}"
                    t0 = time.perf_counter()
                    fn(src, prefix)
                    dt += time.perf_counter() - t0
                    prefixes.append(prefix)
                rec["upload"].setdefault(who, []).append(dt)
                print(f"  rep {rep} upload {who}: {dt:.2f}s ({inner * nbytes / 1e6 / dt:.1f} MB/s)", flush=True)
            # every download reads the objects that upload_release wrote
            src_prefix = f"{slug}/up-ours-{rep}-0"
            down_order = list(downloads) if rep % 2 == 0 else list(reversed(downloads))
            for who in down_order + list(diag_down):
                fn = downloads.get(who) or diag_down[who]
                dt = 0.0
                for k in range(inner):
                    dest = tmp / f"down-{rep}-{k}"
                    t0 = time.perf_counter()
                    got = fn(src_prefix, dest)
                    dt += time.perf_counter() - t0
                    if rep == 0 and k == 0 and tree_digest(got) != digest:
                        raise SystemExit(f"download {who} of {name}: the bytes differ from the source")
                    shutil.rmtree(dest, ignore_errors=True)
                    shutil.rmtree(cache_dir("objects"), ignore_errors=True)
                rec["download"].setdefault(who, []).append(dt)
                print(f"  rep {rep} download {who}: {dt:.2f}s ({inner * nbytes / 1e6 / dt:.1f} MB/s)", flush=True)
            for prefix in prefixes:
                fs.delete_dir(f"{bucket}/{prefix}")
        for kind in ("upload", "download"):
            rec[f"{kind}_mb_s"] = {who: inner * nbytes / 1e6 / median(ts) for who, ts in rec[kind].items()}
            rec[f"{kind}_ratio_ours_over_raw"] = rec[f"{kind}_mb_s"]["ours"] / rec[f"{kind}_mb_s"]["raw"]
        out[name] = rec
    return out


# ---------------------------------------------------------------------------------------------------- report


def table(res: dict) -> list[str]:
    h = res["harden"]
    lines = [f"Made by `{res['command']}` on {res['machine']} ({res['when']}); 1-minute load average "
             f"{res['load_at_start']:.2f} at the start. The machine's 2 cores are shared with other jobs, so every "
             "time here is noisy; re-time on an idle machine before reading much into a ratio near a bar. The S3 is "
             f"moto {res['moto']} on a loopback port, started by the script (one Python process sharing the same "
             f"CPUs as the client; no network latency); pyarrow {res['pyarrow']}.", "",
             f"**Harden with checkpoints in S3 vs on the local disk**: `immunize-cli {' '.join(HARDEN)} --target "
             f"<1 concept, 2 images> --out s3://BUCKET/rel-N` vs `--out <local dir>`, {res['args']['runs']} "
             "alternating runs each, median seconds of the whole command (Ray start-up, the job, the S3 run's "
             "upload of the release); the job's own time is the manifest's `wall_seconds`.", "",
             "| --out | median command (s) | median job (s) | each run: command s (1-min load at its start) |",
             "|---|---|---|---|"]
    for where in ("local", "s3"):
        lines.append(f"| {where} | {h['median_wall_s'][where]:.1f} | {h['median_job_s'][where]:.1f} | "
                     + ", ".join(f"{r['wall_s']:.1f} ({r['load_at_start']:.1f})" for r in h["runs"][where]) + " |")
    lines += ["", f"Ratio s3 / local (median command): **{h['ratio_s3_over_local']:.2f}x**. The two releases' UNet "
              f"weights: max abs diff **{h['unet_max_abs_diff']:.3g}**.", "",
              f"**Upload and download throughput** (MB = 10^6 bytes; median of {res['args']['reps']} rounds, the "
              "order of ours and raw alternating each round; a round's sample of the tiny model is "
              f"{next(iter(res['transfer'].values()))['transfers_per_sample']} back-to-back transfers, each timed on "
              "its own and summed). Upload: ours is `upload_release(folder, uri)`, raw "
              "is `pyarrow.fs.copy_files(folder, bucket/other-prefix)` (threads on, its default). Download: ours "
              "is `fetch(uri, fresh=True)` into $IMMUNIZE_CACHE, raw is `pyarrow.fs.copy_files(bucket/prefix, "
              "local dir, chunk_size=8 MiB)` of the same objects (its fastest setting here). Goal: ours / raw >= 0.8x. Rows in italics are diagnostics: the "
              "building blocks, neither ours nor the baseline.", "",
              "| data | files | MB | direction | ours (MB/s) | raw copy_files (MB/s) | ours / raw |",
              "|---|---|---|---|---|---|---|"]
    for name, r in res["transfer"].items():
        for kind in ("upload", "download"):
            mbs = r[f"{kind}_mb_s"]
            ratio = r[f"{kind}_ratio_ours_over_raw"]
            flag = "" if ratio >= 0.8 else " (under 0.8x)"
            lines.append(f"| {name} | {r['files']} | {r['bytes'] / 1e6:.1f} | {kind} | {mbs['ours']:.1f} | "
                         f"{mbs['raw']:.1f} | **{ratio:.2f}x**{flag} |")
            for who, v in mbs.items():
                if who not in ("ours", "raw"):
                    lines.append(f"| *{name}* | | | *{kind}: {who}* | | *{v:.1f}* | *{v / mbs['raw']:.2f}x* |")
    lines += ["", "Reading it: pyarrow's S3 input stream sends one ranged GET per read, and `copy_files` reads "
              "`chunk_size` bytes at a time (1 MiB by default, one request per MiB: the diagnostic row), so the "
              "baseline reads 8 MiB at a time, as `fetch` (one `copy_files` of the folder) does. Both upload paths are the same pyarrow writer (`_put` is `copy_files` of "
              "one file); `upload_release` sends up to 8 files at once and manifest.json after all of them, "
              "`copy_files` of a folder its files on threads in any order; the `use_threads=False` rows show what "
              "threads give here. On loopback with 2 busy cores a request costs little and threads find no idle core; a store "
              "across a network (tens of ms a request) would weigh the one-after-another order more, which this "
              "bench cannot show."]
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=2, help="harden runs per --out kind (alternating)")
    ap.add_argument("--reps", type=int, default=3, help="rounds of each transfer")
    ap.add_argument("--synthetic-mb", type=int, default=200)
    ap.add_argument("--sample-mb", type=float, default=40,
                    help="a small folder's sample is this many MB of back-to-back transfers (at most --max-inner)")
    ap.add_argument("--max-inner", type=int, default=8)
    ap.add_argument("--no-harden", action="store_true", help="skip part 1 (for trying the transfers alone)")
    ap.add_argument("--no-diagnostics", dest="diagnostics", action="store_false")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    ap.add_argument("--name", default="storage")
    args = ap.parse_args()

    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ.pop("RAY_ADDRESS", None)
    tmp = Path(tempfile.mkdtemp(prefix="bench-storage-"))
    os.environ["IMMUNIZE_CACHE"] = str(tmp / "cache")
    load_at_start = os.getloadavg()[0]
    proc, s3env = start_moto(tmp / "moto.log")
    try:
        os.environ.update(s3env)
        import boto3
        import moto
        import pyarrow

        from raystack.models.pipeline_io import default_model_path

        bucket = "bench-storage"
        boto3.client("s3", endpoint_url=s3env["AWS_ENDPOINT_URL"]).create_bucket(Bucket=bucket)
        env = dict(os.environ)
        res = {"command": " ".join(["nice -n 10 .venv/bin/python bench/storage.py", *sys.argv[1:]]),
               "machine": f"{platform.node()} ({os.cpu_count()} CPUs, {platform.machine()})",
               "when": time.strftime("%Y-%m-%d %H:%M"), "load_at_start": load_at_start,
               "nice": os.nice(0), "moto": moto.__version__, "pyarrow": pyarrow.__version__,
               "args": {"runs": args.runs, "reps": args.reps, "synthetic_mb": args.synthetic_mb,
                        "sample_mb": args.sample_mb, "max_inner": args.max_inner}}
        res["harden"] = None if args.no_harden else bench_harden(args, tmp, env, bucket)
        datasets = {"tiny model": Path(default_model_path()),
                    f"synthetic {args.synthetic_mb} MB": make_synthetic(tmp / "synthetic", args.synthetic_mb)}
        res["transfer"] = bench_transfer(args, tmp, bucket, datasets)
        res["load_at_end"] = os.getloadavg()[0]
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        shutil.rmtree(tmp, ignore_errors=True)
    if res["harden"] is None:
        print(json.dumps(res, indent=2))
        return
    from _results import write_results

    write_results(args.out, args.name, res, table(res))


if __name__ == "__main__":
    main()

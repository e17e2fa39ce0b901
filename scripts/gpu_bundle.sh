#!/usr/bin/env bash
# scripts/gpu_bundle.sh: build, here, the wheels a lent GPU machine lacks, so that scripts/gpu_check.sh can install
# the project there with no network (the machine has Python 3.12 and torch 2.11+cu130, transformers, peft,
# safetensors, typer, rich, pyarrow, aiohttp, msgpack, grpcio, ... but no ray, deepspeed, diffusers or optuna).
#
#   scripts/gpu_bundle.sh [--dest DIR] [--python-version 3.12] [--max-mib 52] [--full] [--with-project] [--no-strip]
#
# Writes DIR (default .gpu-bundle, git-ignored) with, for CPython 3.12 on manylinux x86_64, the versions installed
# in .venv:
#   ray          repacked: without ray/jars (31 MB of Java), the dashboard's web client, rllib and ray.llm, and
#                (unless --no-strip) the symbol tables of its three large binaries stripped (their dynamic symbols
#                stay); RECORD rewritten
#   deepspeed    built here as a wheel from its sdist with DS_BUILD_OPS=0 (pure Python; ops JIT-compile on use)
#   diffusers, optuna, and what they, ray[train,tune] and deepspeed need that the GPU image lacks: pydantic,
#                pydantic-core, annotated-types, typing-inspection, hjson, jsonschema, jsonschema-specifications,
#                referencing, rpds-py, colorlog, tensorboardX
#   --full       also cryptography, cffi, pycparser (release signing), sqlalchemy, alembic, mako (optuna's
#                database storage; the project's sweeps keep optuna in memory), importlib-metadata and its
#                lazy-importer (diffusers imports it on Python < 3.8 only): about 10 MB more, and `pip check` is
#                clean, but bundle and working tree then exceed what a device run carries
#   --with-project  also the project's own wheel (about 8 MB: the tiny world's weights); by default the project is
#                installed from the working tree, which travels with every device run anyway
# and DIR/INSTALL.txt, the line the GPU machine runs from the repository root (also: DIR/install.sh):
#   python3 -m pip install --no-index --no-deps --no-build-isolation --no-compile -q DIR/*.whl .
# (--no-deps: pip never fetches or replaces anything, torch 2.11 included; the project beside its own torch).
# A device run carries at most 64 MiB (the working tree and the carried paths together): the script fails when
# the wheels exceed --max-mib (default 52) and warns when they and the working tree exceed 64 MiB.
# Downloads are cached in $GPU_BUNDLE_CACHE (default ~/.cache/immunize-gpu-bundle).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
DEST=.gpu-bundle
PYV=3.12
MAX_MIB=52
FULL=0
WITH_PROJECT=0
STRIP=1
while [ $# -gt 0 ]; do
  case "$1" in
    --dest) DEST=$2; shift 2 ;;
    --python-version) PYV=$2; shift 2 ;;
    --max-mib) MAX_MIB=$2; shift 2 ;;
    --full) FULL=1; shift ;;
    --with-project) WITH_PROJECT=1; shift ;;
    --no-strip) STRIP=0; shift ;;
    -h|--help) awk 'NR > 1 && /^#/ {sub(/^# ?/, ""); print; next} NR > 1 {exit}' "$0"; exit 0 ;;
    *) echo "gpu_bundle.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
PY=${PY:-$ROOT/.venv/bin/python}  # the build's Python: its installed versions are the bundle's; it builds deepspeed
CACHE=${GPU_BUNDLE_CACHE:-$HOME/.cache/immunize-gpu-bundle}/cp${PYV/./}
ABI=cp${PYV/./}
[ -x "$PY" ] || { echo "gpu_bundle.sh: no build Python at $PY (make setup, or PY=...)" >&2; exit 2; }

# the wheels the GPU image lacks (its package list: /work/.library/device/KINDS.md); versions: the build venv's
NAMES="ray deepspeed diffusers optuna pydantic pydantic_core annotated-types typing-inspection hjson jsonschema
jsonschema-specifications referencing rpds-py colorlog tensorboardX"
[ "$FULL" = 1 ] && NAMES="$NAMES cryptography cffi pycparser SQLAlchemy alembic Mako importlib_metadata lazy-importer"
PINS=$("$PY" - $NAMES <<'PY'
import sys
from importlib.metadata import PackageNotFoundError, version
missing = []
for name in sys.argv[1:]:
    try:
        print(f"{name}=={version(name)}")
    except PackageNotFoundError:
        missing.append(name)
if missing:
    sys.exit(f"gpu_bundle.sh: not installed in the build venv: {' '.join(missing)}")
PY
)
mkdir -p "$CACHE/dl" "$CACHE/built"
PLATFORMS=""
for p in manylinux2014_x86_64 manylinux_2_17_x86_64 manylinux_2_24_x86_64 manylinux_2_27_x86_64 \
         manylinux_2_28_x86_64 manylinux1_x86_64 manylinux2010_x86_64 manylinux_2_5_x86_64 manylinux_2_12_x86_64; do
  PLATFORMS="$PLATFORMS --platform $p"
done
for pin in $PINS; do
  [ "${pin%%==*}" = deepspeed ] && continue
  "$PY" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: $PLATFORMS \
      --python-version "$PYV" --implementation cp --abi "$ABI" --abi abi3 --abi none -d "$CACHE/dl" "$pin" \
      2> >(grep -v "^WARNING: Location" >&2)
done
DS=$(printf '%s\n' $PINS | grep '^deepspeed==')
if ! ls "$CACHE/built/deepspeed-${DS#deepspeed==}-py3-none-any.whl" >/dev/null 2>&1; then
  echo "building $DS (DS_BUILD_OPS=0) ..."
  # its setup.py imports torch: no build isolation, the build venv's torch; no cache: a wheel built with ops is not
  # this one
  DS_BUILD_OPS=0 "$PY" -m pip wheel -q --disable-pip-version-check --no-deps --no-build-isolation --no-cache-dir \
      --no-binary deepspeed -w "$CACHE/built" "$DS" 2> >(grep -v "^WARNING: Location" >&2)
fi

rm -rf "$DEST.tmp"
mkdir -p "$DEST.tmp"
for pin in $PINS; do
  name=${pin%%==*}; ver=${pin#*==}
  # a wheel's file name: the project name normalised (- . -> _), case-insensitive on the index's side
  stem=$(echo "$name" | tr 'A-Z' 'a-z' | sed 's/[-.]/_/g')
  if [ "$name" = deepspeed ]; then src="$CACHE/built/deepspeed-$ver-py3-none-any.whl"
  else src=$(ls "$CACHE/dl"/* | grep -i "/${stem}-${ver}-" | head -1); fi
  [ -n "$src" ] && [ -f "$src" ] || { echo "gpu_bundle.sh: no wheel found for $pin" >&2; exit 1; }
  if [ "$name" = ray ]; then
    "$PY" - "$src" "$DEST.tmp" "$STRIP" <<'PY'
"""Repack ray's wheel without what a GPU check never runs, RECORD rewritten (sha256 and size of every file)."""
import base64, hashlib, os, shutil, subprocess, sys, tempfile, zipfile
from pathlib import Path

src, dest, strip = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3] == "1"
DROP = ("ray/jars/", "ray/dashboard/client/", "ray/rllib/", "ray/llm/")
STRIPPED = ("ray/_raylet.so", "ray/core/src/ray/gcs/gcs_server", "ray/core/src/ray/raylet/raylet")
if strip and not shutil.which("strip"):
    sys.exit("gpu_bundle.sh: `strip` (binutils) is needed to strip ray's binaries (or pass --no-strip)")
out = dest / src.name
zin = zipfile.ZipFile(src)
record_name = next(n for n in zin.namelist() if n.count("/") == 1 and n.endswith(".dist-info/RECORD"))  # ray's own
rows, dropped = [], 0
with tempfile.TemporaryDirectory() as tmp, zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as zout:
    for info in zin.infolist():
        name = info.filename
        if name == record_name or name.endswith("/"):
            continue
        if name.startswith(DROP):
            dropped += info.file_size
            continue
        data = zin.read(info)
        if strip and name in STRIPPED:
            p = Path(tmp) / "bin"
            p.write_bytes(data)
            subprocess.run(["strip", "--strip-unneeded", str(p)], check=True)
            data = p.read_bytes()
        zi = zipfile.ZipInfo(name, date_time=info.date_time)
        zi.external_attr = info.external_attr  # keeps the binaries executable
        zi.compress_type = zipfile.ZIP_DEFLATED
        zout.writestr(zi, data, compresslevel=9)
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        rows.append(f"{name},sha256={digest},{len(data)}")
    rows.append(f"{record_name},,")
    zi = zipfile.ZipInfo(record_name, date_time=(2026, 1, 1, 0, 0, 0))
    zi.compress_type = zipfile.ZIP_DEFLATED
    zout.writestr(zi, "\n".join(rows) + "\n")
print(f"ray repacked: {src.stat().st_size / 2**20:.1f} -> {out.stat().st_size / 2**20:.1f} MiB "
      f"({dropped / 2**20:.0f} MiB of files left out{', binaries stripped' if strip else ''})")
PY
  else
    cp "$src" "$DEST.tmp/"
  fi
done
if [ "$WITH_PROJECT" = 1 ]; then
  had_build=0
  [ -e build ] && had_build=1
  "$PY" -m pip wheel -q --disable-pip-version-check --no-deps --no-build-isolation -w "$DEST.tmp" . \
      2> >(grep -v "^WARNING: Location" >&2)
  [ "$had_build" = 1 ] || rm -rf build  # setuptools' in-tree build folder
fi

LINE="python3 -m pip install --no-index --no-deps --no-build-isolation --no-compile -q $DEST/*.whl$([ "$WITH_PROJECT" = 1 ] || echo ' .')"
cat > "$DEST.tmp/INSTALL.txt" <<EOF
# Run from the repository root on the GPU machine (nothing is fetched, nothing already installed is replaced
# except by the same-named wheels below; torch stays the machine's own):
$LINE
# Made by: scripts/gpu_bundle.sh --python-version $PYV$([ "$FULL" = 1 ] && echo ' --full')$([ "$WITH_PROJECT" = 1 ] && echo ' --with-project')$([ "$STRIP" = 1 ] || echo ' --no-strip') ($ABI, manylinux x86_64)
EOF
( cd "$DEST.tmp" && ls -l *.whl | awk '{printf "# %8.2f MiB  %s\n", $5 / 1048576, $9}' ) >> "$DEST.tmp/INSTALL.txt"
printf '#!/usr/bin/env bash\n# the install line of INSTALL.txt (run from the repository root)\nset -e\n%s\n' "$LINE" \
    > "$DEST.tmp/install.sh"
chmod +x "$DEST.tmp/install.sh"
rm -rf "$DEST"
mv "$DEST.tmp" "$DEST"

BYTES=$(cat "$DEST"/* | wc -c)
MIB=$(awk -v b="$BYTES" 'BEGIN {printf "%.1f", b / 1048576}')
TREE=$(git ls-files -co --exclude-standard -z 2>/dev/null | xargs -0 stat -c %s 2>/dev/null | awk '{s += $1} END {print s + 0}')
TREE_MIB=$(awk -v b="$TREE" 'BEGIN {printf "%.1f", b / 1048576}')
grep '^#  ' "$DEST/INSTALL.txt" | sed 's/^# //'
echo "bundle: $DEST, $(ls "$DEST"/*.whl | wc -l) wheels, $MIB MiB (working tree that travels beside it: $TREE_MIB MiB)"
echo "install line: $LINE"
if awk -v m="$MIB" -v x="$MAX_MIB" 'BEGIN {exit !(m > x)}'; then
  echo "gpu_bundle.sh: the bundle is $MIB MiB, over --max-mib $MAX_MIB" >&2
  exit 1
fi
if awk -v m="$MIB" -v t="$TREE_MIB" 'BEGIN {exit !(m + t > 64)}'; then
  echo "gpu_bundle.sh: warning: bundle + working tree = $MIB + $TREE_MIB MiB, over the 64 MiB a device run carries" >&2
fi

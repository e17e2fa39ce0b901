#!/usr/bin/env bash
# scripts/gpu_check.sh: the GPU check, one prepared script for a lent GPU machine (about 5-8 minutes on one H100/H200).
#   1. bench/scale.py on the GPU at SD-1.5's width, 512 px, batch 1, fp32 and bf16: seconds per step and peak GPU
#      memory per method beside `immunize-cli plan` -> bench/results/scale_gpu.{json,md} (commit it, GPU named);
#   2. a 1-worker harden job through the CLI (Ray Train + DeepSpeed, --use-gpu, bf16) and an attack on its release;
#   3. a 2-worker ZeRO-2 harden when 2 GPUs are visible (skipped, and said, on one).
# Needs the project's dependencies importable by $PY (default python3). Log: $OUT/gpu_check.log.
set -uo pipefail
OUT=${OUT:-runs/gpu-check}
PY=${PY:-python3}
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu_check.log") 2>&1
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
cli() { "$PY" -m cli.main "$@"; }
nvidia-smi -L
NGPU=$(nvidia-smi -L | wc -l)
"$PY" bench/scale.py --device cuda --width 320 --resolution 512 --batch 1 --name scale_gpu || echo "scale: FAILED"
W="$OUT/work"
"$PY" - "$W" <<'PY'
import sys
from pathlib import Path
from raystack.models.shapes import build_pipeline_folder
from raystack.tinyworld.folder import write_concept_folder
w = Path(sys.argv[1])
build_pipeline_folder("sd15", w / "sd15", width=320, image_size=512, text_width=768)
write_concept_folder(w / "t", ["circle", "square"], ["red"], ["sunset"], 2, 1, None, True)
write_concept_folder(w / "l", ["cross"], ["blue"], ["striped", "dotted"], 1, 2, None, True)
PY
time cli harden --method imma --model "$W/sd15" --target "$W/t" --legal "$W/l" --steps 5 --batch-size 2 --use-gpu \
    --precision bf16 --workers 1 --out "$W/imma" --overwrite || echo "harden 1 GPU: FAILED"
time cli attack --method lora --model "$W/imma" --data "$W/t" --steps 20 --device cuda --precision bf16 \
    --out "$W/attack" --overwrite || echo "attack: FAILED"
if [ "$NGPU" -ge 2 ]; then
  time cli harden --method freezeasguard --model "$W/sd15" --target "$W/t" --legal "$W/l" --steps 3 --user-steps 2 \
      --finetune-steps 2 --batch-size 2 --use-gpu --precision bf16 --workers 2 --zero-stage 2 --out "$W/fag" \
      --overwrite || echo "harden 2 GPUs ZeRO-2: FAILED"
else
  echo "2-worker ZeRO-2 job: skipped, $NGPU GPU visible"
fi
echo "gpu_check done"

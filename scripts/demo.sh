#!/usr/bin/env bash
# The main job on the tiny world: check the world, harden it with FreezeAsGuard against a full fine-tune
# on the held-out "sunset" style, attack the original and the released (masked) model the same way, and
# compare them.
set -euo pipefail
cd "$(dirname "$0")/.."
CLI=${CLI:-.venv/bin/immunize-cli}
OUT=${OUT:-runs/demo}
mkdir -p "$OUT"
$CLI world quality --samples 64 --json "$OUT/quality.json" --grid "$OUT/quality.png" --overwrite
# publisher's data (what to protect, what to keep) and the attacker's own images (another seed)
$CLI world generate --out "$OUT/data/protect" --style sunset --n 2 --seed 1 --overwrite
$CLI world generate --out "$OUT/data/legal" --style striped --style dotted --style checkered --n 1 --seed 2 --overwrite
$CLI world generate --out "$OUT/data/attacker" --style sunset --n 1 --seed 3 --overwrite
$CLI harden --config configs/demo_freezeasguard_full.yaml --target "$OUT/data/protect" --legal "$OUT/data/legal" \
    --out "$OUT/hardened" --overwrite
# the attacker fine-tunes the released weights; a compliant user's trainer respects the released mask
$CLI attack --method full --data "$OUT/data/attacker" --out "$OUT/attack_original" --overwrite
$CLI attack --method full --data "$OUT/data/attacker" --freeze-mask "$OUT/hardened/freeze_mask.safetensors" \
    --out "$OUT/attack_hardened" --overwrite
$CLI evaluate --run "original=$OUT/attack_original" --run "hardened=$OUT/attack_hardened" --baseline original \
    --target sunset --out "$OUT/report" --overwrite
echo "open $OUT/report/report.html"

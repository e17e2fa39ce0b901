"""Does a sweep's best.yaml reproduce its best trial? Hardens with `immunize-cli harden --config best.yaml`,
runs the space's first attack the way the trials did (respecting the mask) and scores mitigation with the
trials' own scoring.

    .venv/bin/python bench/tune_rerun_best.py SWEEP_DIR SPACE.yaml OUT_DIR [--set overrides of that sweep]

Prints one JSON line: the rerun's mitigation next to the trial's.
"""

import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    sweep, space_path, out = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
    overrides = [a for a in sys.argv[4:] if a != "--set"]
    t0 = time.time()
    subprocess.run([str(ROOT / ".venv/bin/immunize-cli"), "harden", "--config", str(sweep / "best.yaml"), "--out",
                    str(out), "--overwrite"], check=True, stdout=subprocess.DEVNULL)

    from cli.common import quiet_libraries

    quiet_libraries()
    from raystack.runtime import configure_threads
    from raystack.tuning.space import load_space
    from raystack.tuning.sweep import attacked_mitigation

    configure_threads(1)
    space = load_space(space_path, overrides)
    mitigation = attacked_mitigation(space, out, sweep / "data" / "attacker", out.parent / f"{out.name}-attack")
    best = json.loads((sweep / "results.json").read_text())["best"]
    print(json.dumps({"setting": best["setting"], "trial_mitigation": best["mitigation"],
                      "rerun_mitigation": mitigation, "minutes": round((time.time() - t0) / 60, 1)}))


if __name__ == "__main__":
    main()

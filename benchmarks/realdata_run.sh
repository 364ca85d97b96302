#!/usr/bin/env bash
# Real-data run behind README "Results" and benchmarks/RESULTS.md: the shared public collection,
# imported (de-identified, labels, near-duplicates, provenance), trained on CPU (small encoder,
# 128 px) with the shortcut battery, then the release-policy check. Isolated state under $OUT.
#   bash benchmarks/realdata_run.sh [OUT_DIR]   (needs ../shared/data/covid-chestxray-dataset)
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
OUT="${1:-/tmp/cxr-realdata}"
DATA="$REPO/../shared/data/covid-chestxray-dataset"
CXR="$REPO/.venv/bin/cxr"
rm -rf "$OUT" && mkdir -p "$OUT/project"
export CXR_HOME="$OUT/home" CXR_PROJECT_ROOT="$OUT/project" MLFLOW_DISABLE_TELEMETRY=true
ADMIN_PW="realdata-admin-pass-2026"; RITA_PW="realdata-researcher-pass-2026"
printf '%s\n' "$ADMIN_PW" | "$CXR" users add admin --role admin --password-stdin >/dev/null
printf '%s\n%s\n' "$ADMIN_PW" "$RITA_PW" | "$CXR" users add rita --role researcher --as admin --password-stdin \
  --new-password-stdin >/dev/null
export CXR_TOKEN="$(printf '%s\n' "$ADMIN_PW" | "$CXR" tokens issue --user rita --as admin --password-stdin)"
export CXR_USER=rita
t0=$(date +%s)
"$CXR" data import "$DATA" --name public --no-dvc --workers 1 --json > "$OUT/import.json"
t1=$(date +%s)
"$CXR" train --dataset public --epochs 30 --image-size 128 --encoder small --batch-size 16 --device cpu --seed 42 \
  --patience 8 --json > "$OUT/train.json"
t2=$(date +%s)
"$CXR" model check 1 --json > "$OUT/check.json" || true
"$REPO/.venv/bin/python" - "$OUT" "$((t1 - t0))" "$((t2 - t1))" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
from models.registry import get_evaluation
ev = get_evaluation("1")
(out / "evaluation.json").write_text(json.dumps(ev, indent=2, default=str))
imp = json.loads((out / "import.json").read_text())
chk = json.loads((out / "check.json").read_text())
c = ev["covid19_vs_rest"]
def f(m):
    return "n/a" if m.get("value") is None else f"{m['value']:.3f} ({m['ci_low']:.3f}–{m['ci_high']:.3f})"
print(f"import {sys.argv[2]} s, train+evaluate {sys.argv[3]} s")
print("import summary keys:", {k: imp.get(k) for k in ("n_accepted", "n_rejected") if k in imp},
      "near-duplicate pairs:", len(imp.get("near_duplicate_pairs") or []))
print("test:", ev["n_images"], "images,", ev["n_patients"], "patients; class counts", ev.get("class_counts"))
print("interval method:", ev.get("interval_method"))
for k in ("auroc", "sensitivity", "specificity", "ppv", "npv"):
    extra = c[k].get("counts") or ""
    print(f"  {k:<12} {f(c[k])} {extra}")
cal = (ev.get("calibration") or {}).get("covid19") or {}
print("calibration P(covid19):", {k: cal.get(k) for k in ("ece", "slope", "intercept")})
sc = ev.get("shortcut") or {}
for name, row in (sc.get("ablations") or {}).items():
    print(f"  ablation {name:<18} {f(row['auroc'])}")
for key in ("masked_lungs", "lungs_only"):
    if sc.get(key):
        print(f"  {key:<27} {f(sc[key]['auroc'])}")
for key in ("fusion_minus_vitals_only", "fusion_minus_missingness_only"):
    if sc.get(key):
        print(f"  {key:<27} {f(sc[key])}")
print("battery cost:", sc.get("cost"))
print("policy", chk.get("policy_version"), "passed:", chk.get("passed"), "failed:",
      [x.get("id") for x in chk.get("criteria", []) if not x.get("passed")])
PY

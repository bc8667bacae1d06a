#!/usr/bin/env bash
# Every CUDA test and GPU benchmark in one run, then one table: bash benchmarks/gpu.sh [OUT]
# (OUT: where logs and JSON go; default runs/gpu). Each part has a time limit, all of them GPU_BUDGET seconds (540). Without kornia
# installed, put its wheels on PYTHONPATH first (see docs/guides/gpu.md).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-runs/gpu}}
mkdir -p "$out"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
"$PY" -c "import torch; print('device:', torch.cuda.get_device_name(), 'torch', torch.__version__)" | tee "$out/setup.txt"
budget=${GPU_BUDGET:-540}  # seconds for all parts; a part runs only while enough is left, capped at what is left
part() {  # part SECONDS COMMAND...: run COMMAND under min(SECONDS, what is left), or say it was skipped
  local limit=$1 left=$((budget - SECONDS)); shift
  if [ "$left" -lt 30 ]; then echo "skipped (time budget spent): $*"; return 0; fi
  timeout $((limit < left ? limit : left)) "$@"
}
# 1. the CUDA tests (each skips on a machine without a GPU): the CUDA graph step first
part 200 "$PY" -m pytest -q -p no:cacheprovider -o addopts="" -rs -k "cuda or gpu or batch_device" \
  tests/test_cuda_graph.py tests/test_overhead.py tests/test_compile.py tests/test_amp.py tests/test_faults.py \
  tests/test_perturbation.py 2>&1 | tail -25 | tee "$out/tests.txt"
# 2. the group's step as CUDA graphs against its members' own steps, eager and captured (cuda_graph=True)
for spec in "2 x resnet32|128|" "2 x resnet32|128|bf16" "2 x resnet18tv|256|" "2 x resnet18tv|256|bf16"; do
  IFS='|' read -r group batch amp <<<"$spec"
  tag=graph-$(echo "$group-$batch-${amp:-fp32}" | tr -d ' ')
  part 60 "$PY" benchmarks/step_graph.py --groups "$group" --batch "$batch" ${amp:+--amp $amp} --out "$out/$tag" \
    2>&1 | tee "$out/$tag.txt" | tail -8
done
# the CIFAR harness eager and with --cuda-graph: seconds per epoch (CIFAR_ROOT: the archive's folder)
if [ -n "${CIFAR_ROOT:-}" ]; then
  for flag in "" "--cuda-graph"; do
    tag=train${flag:+-graph}
    part 120 "$PY" benchmarks/train.py --preset paper --epochs 2 --seeds 0 --settings competitive+F+P $flag \
      --cache "$out/cache" --out "$out/$tag" 2>&1 | tee "$out/$tag.txt" | grep -E "^\|" | tail -3
  done
fi
# host syncs of each operation of the default pool, after its first call
part 60 "$PY" - <<'PY' 2>&1 | tee "$out/syncs.txt"
import warnings
import torch
from competitive import PerturbationPool
pool, x, y = PerturbationPool(p=1.0), torch.randn(128, 3, 32, 32, device="cuda"), torch.randint(0, 10, (128,), device="cuda")
for i, name in enumerate(pool.names):
    pool.perturb(i, x, y, seed=0, num_classes=10)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pool.perturb(i, x, y, seed=1, num_classes=10)
    torch.cuda.set_sync_debug_mode("default")
    print("syncs", name, sum("synchroniz" in str(w.message) for w in caught))
PY
# 3. the group eager against its members' own steps (fp32, bf16), the segmentation and LM pairs, the pool
for spec in "2 x resnet32|128|" "2 x resnet32|128|bf16" "2 x resnet18tv|256|" "2 x resnet18tv|256|bf16"; do
  IFS='|' read -r group batch amp <<<"$spec"
  tag=$(echo "$group-$batch-${amp:-fp32}" | tr -d ' ')
  part 100 "$PY" benchmarks/step.py --part group --device cuda --groups "$group" --batch "$batch" \
    ${amp:+--amp $amp} --warmup 8 --steps 25 --out "$out/$tag" 2>&1 | tee "$out/$tag.txt" | tail -12
done
part 100 "$PY" benchmarks/step.py --part dense --device cuda --warmup 4 --steps 15 --loss-steps 8 \
  --out "$out/dense" 2>&1 | tee "$out/dense.txt" | tail -14
part 150 "$PY" benchmarks/step.py --part lm --device cuda --lm-context 1024 --warmup 2 --steps 8 \
  --out "$out/lm" 2>&1 | tee "$out/lm.txt" | tail -22
part 60 "$PY" benchmarks/perturb.py --device cuda --warmup 5 --steps 30 --out "$out" 2>&1 | tee "$out/perturb.txt" \
  | tail -20
# 3. one table from what was written
"$PY" - "$out" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
print("\n| what (GPU) | variant | median | ratio |\n|---|---|---|---|")
for path in sorted(out.rglob("*.json")):
    data = json.loads(path.read_text())
    setup = data.get("setup", {})
    for group, variants in (data.get("group") or {}).items():
        for name, v in variants.items():
            if isinstance(v, dict) and "median_ms" in v:
                what = f"{group}, batch {setup.get('batch')}, {setup.get('amp') or 'fp32'}"
                extra = f" ({v['of_captured_limit']:.3f} x the captured limit)" if "of_captured_limit" in v else ""
                print(f"| {what} | {name} | {v['median_ms']:.2f} ms | {v.get('ratio', 1):.3f} x{extra} |")
    for name, v in (data.get("dense") or {}).items():
        if isinstance(v, dict) and "ratio" in v:
            print(f"| segmentation pair | {name} | {v.get('median_ms', float('nan')):.2f} ms | {v['ratio']:.3f} x |")
    for name, v in ((data.get("lm") or {}).get("steps") or {}).items():
        print(f"| lm step (peak {v['peak_ratio']:.2f} x) | {name} | {v['median_s'] * 1e3:.1f} ms | {v['ratio']:.3f} x |")
    for name, v in ((data.get("lm") or {}).get("losses") or {}).items():
        print(f"| lm loss stage (+{v['extra_peak_mb']:.0f} MB) | {name} | {v['median_s'] * 1e3:.1f} ms | |")
    for name, v in (data.get("rows") or {}).items():
        print(f"| perturb (/ ResNet-20 step) | {name} | {v['median_ms']:.2f} ms | {v['ratio']:.3f} x |")
for path in sorted(out.glob("train*.txt")):
    rows = [line for line in path.read_text().splitlines() if line.startswith("| competitive")]
    for row in rows[-1:]:
        print(f"| CIFAR harness ({path.stem}) | 2 epochs: top-1, s/epoch | {row.split('|')[-2].strip()} s/epoch | |")
for line in (out / "syncs.txt").read_text().splitlines():
    if line.startswith("syncs "):
        print(f"| host syncs (sync debug mode) | {line.split()[1]} | {line.split()[2]} | |")
PY

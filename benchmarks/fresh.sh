#!/usr/bin/env bash
# A new user's first run: clone the repository into a temporary folder and run the README's two
# commands exactly as written, with an empty inductor cache and an empty ~/.cache/competitive
# (XDG_CACHE_HOME points at an empty folder, so pip's cache is empty too); prints both times.
#
#   bash benchmarks/fresh.sh [REF]     REF: the commit to try (default: HEAD; committed work only)
#
# The clone lies beside this repository, so it finds ../shared/data/cifar10 as this one does.
set -uo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
ref=${1:-HEAD}
work=$(mktemp -d "$(dirname "$repo")/fresh.XXXXXX")
trap 'rm -rf "$work"' EXIT
git clone --quiet "$repo" "$work/competitive" && git -C "$work/competitive" checkout --quiet "$ref" || exit 1
export TORCHINDUCTOR_CACHE_DIR="$work/inductor" XDG_CACHE_HOME="$work/cache"
echo "fresh clone of $(git -C "$work/competitive" rev-parse --short HEAD) in $work/competitive"
echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(python3 --version)"
cd "$work/competitive"
summary=() failed=0
for command in "bash run.sh main" "bash run.sh test"; do
  echo "== $command"
  start=$(date +%s)
  $command 2>&1 | tail -n 30
  status=${PIPESTATUS[0]}
  summary+=("$command: exit $status, $(($(date +%s) - start)) s")
  [ "$status" -eq 0 ] || failed=1
done
echo "== summary (the first command includes creating .venv)"
printf '%s\n' "${summary[@]}"
exit $failed

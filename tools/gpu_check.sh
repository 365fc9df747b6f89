#!/usr/bin/env bash
# The GPU check (issue 12), on one CUDA GPU from a fresh checkout, in under 8 minutes on an H100/H200:
#   1. pytest -m gpu: NCCL training through the launcher in bf16 and fp16 (ZeRO-3, FusedAdam) to final/ and an
#      eval, the gather's NCCL backward against one process, the sync count with torch.cuda.set_sync_debug_mode;
#   2. tools/bench/train_throughput.py for `base` at the largest batch that fits: samples/s, TFLOP/s and MFU
#      (peak 989 TFLOP/s dense bf16) per ZeRO stage, with compile and patch dropout, against plain PyTorch.
# Writes one JSON file (first argument, default gpu_check.json). Without CUDA it runs what runs on CPU (the gpu
# tests skip; the benchmark runs `tiny` briefly) so the script itself is checked anywhere.
#
# A GPU image with torch, transformers, accelerate and peft but no deepspeed/webdataset/bitsandbytes: run
# tools/gpu_wheels.sh on a connected machine and carry .whl/; this script installs it into a private folder.
set -uo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}  # the interpreter with torch (PYTHON=.venv/bin/python for a virtual environment)
out=$(realpath -m "${1:-gpu_check.json}")
work=$(mktemp -d)
start=$(date +%s)
if [ -d .whl ] && ! "$py" -c "import deepspeed, webdataset, bitsandbytes, simplejpeg" 2>/dev/null; then
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$work/site" .whl/*.whl \
    || { echo "gpu_check: installing .whl/ failed" >&2; exit 1; }
  export PYTHONPATH="$work/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" TOKENIZERS_PARALLELISM=false
if "$py" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  bench=(--preset base --batch auto --steps 10 --warmup 3 --peak-tflops "${PEAK_TFLOPS:-989}"
         --variants "${VARIANTS:-plain,zero1,zero2,zero3,zero1+compile,zero1+pd0.5,zero3+pd0.5}")
else
  export DS_ACCELERATOR=cpu
  bench=(--preset tiny --batch 8 --steps 2 --warmup 1 --variants plain,zero1,zero2,zero3,zero2+pd0.5)
fi
"$py" -m pytest -m gpu -q -p no:cacheprovider --junitxml "$work/gpu.xml" tests/test_gpu.py > "$work/pytest.log" 2>&1
pytest_rc=$?
tail -5 "$work/pytest.log"
"$py" tools/bench/train_throughput.py "${bench[@]}" --json "$work/throughput.json" --profile "$work/profiles" \
  > "$work/throughput.log" 2>&1
bench_rc=$?
grep -E '^\|' "$work/throughput.log"
"$py" - "$work" "$out" "$pytest_rc" "$bench_rc" "$start" <<'PY'
import json, sys, time, xml.etree.ElementTree as ET
from pathlib import Path
work, out, pytest_rc, bench_rc, start = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
import torch
result = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", "pytest_rc": pytest_rc,
          "throughput_rc": bench_rc}
try:
    suite = ET.parse(work / "gpu.xml").getroot()
    suite = suite if suite.tag == "testsuite" else suite[0]
    result["pytest"] = {key: int(suite.get(key, 0)) for key in ("tests", "failures", "errors", "skipped")}
    result["pytest"]["failed"] = [case.get("name") for case in suite.iter("testcase")
                                  if case.find("failure") is not None or case.find("error") is not None]
except (OSError, ET.ParseError) as error:
    result["pytest"] = {"error": str(error), "log_tail": (work / "pytest.log").read_text()[-3000:]}
try:
    result["throughput"] = json.loads((work / "throughput.json").read_text())
except OSError as error:
    result["throughput"] = {"error": str(error), "log_tail": (work / "throughput.log").read_text()[-3000:]}
result["seconds"] = round(time.time() - start, 1)
out.write_text(json.dumps(result, indent=2) + "\n")
print(json.dumps(result))
PY
[ "$pytest_rc" -le 0 ] || [ "$pytest_rc" -eq 5 ] || exit "$pytest_rc"
exit "$bench_rc"

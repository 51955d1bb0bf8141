#!/usr/bin/env bash
# The GPU check (issue 14), one script for a machine with a CUDA device, done in well under 8 minutes:
#   1. `pytest -m gpu tests/test_gpu.py`: device selection, bf16 autocast on/off, a study whose two trials
#      share one GPU (and the PTM training they need), a checkpoint trained on the GPU loaded on the CPU;
#   2. DM IPC 10 at the papers' settings (ConvNet = width 128, batch_real 256 per class), plain and + CLoM,
#      on CIFAR-10 (shared/data or ../shared/data cifar10-jpeg.parquet; digits when neither is there):
#      s/it, real images/s, peak GPU memory, and the ratio against bench/reference_dm.py (the original
#      per-class loop) timed on the same GPU in alternating blocks (bench/bench_distill.py --json);
#   3. evaluation of one IPC 10 set, 5 ConvNet models x EVAL_EPOCHS (default 300; the reference: 1000)
#      epochs, ours (grouped, compiled) against bench/reference_eval.py (bench/bench_eval.py --json).
# It prints the card's name and the figures, and writes them to $OUT/gpu_check.json when OUT is set, else
# to runs/gpu_check/ (with bench_dm.json, the logs). It installs nothing: .venv/bin/python if there, else
# python3. Without CUDA it says so, checks that its CPU-side parts are in order (the bench's options, the
# GPU tests collect) and exits 0.
#
#   bash bench/gpu_check.sh
#   ITERS=300 MODEL=ConvNet POOL_ARCH=ConvNet BATCH_REAL=256 IPC=10 DATA=parquet:PATH bash bench/gpu_check.sh
# GPU_CHECK_ON_CPU=1 runs every step on the CPU (to test this script; use tiny settings, e.g. DATA=digits
# ITERS=2 MODEL=ConvNetW32 POOL_ARCH=ConvNetW32 BATCH_REAL=16 IM_SIZE=8).
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"  # this tree's package, whatever is installed
export PYTHONUNBUFFERED=1

err=$(mktemp)
trap 'rm -f "$err"' EXIT
if ! cuda=$("$PY" -c 'import torch; print(torch.cuda.is_available())' 2>"$err"); then
    echo "gpu_check: $PY cannot import torch: $(tail -n 1 "$err")" >&2
    exit 2
fi
cuda=$(tail -n 1 <<<"$cuda")

if [ "$cuda" != "True" ] && [ -z "${GPU_CHECK_ON_CPU:-}" ]; then
    echo "gpu_check: no CUDA device here (torch.cuda.is_available() is False with $PY): nothing to measure."
    echo "gpu_check: run it on a machine with a CUDA GPU; checking that its CPU-side parts are in order"
    ok=0
    for b in bench_distill bench_eval; do
        "$PY" bench/$b.py --help >/dev/null || { echo "gpu_check: bench/$b.py --help failed" >&2; ok=1; }
    done
    if "$PY" -c 'import pytest' 2>/dev/null; then
        collected=$("$PY" -m pytest --collect-only -q -p no:cacheprovider -m gpu tests/test_gpu.py 2>&1)
        rc=$?
        if [ $rc -ne 0 ]; then echo "$collected" >&2; echo "gpu_check: the GPU tests do not collect" >&2; ok=1
        else echo "gpu_check: $(grep -E '[0-9]+ tests? collected' <<<"$collected" | tail -n 1) (-m gpu; they skip without CUDA)"; fi
    else
        echo "gpu_check: pytest is not installed for $PY: the GPU tests were not collected"
    fi
    exit $ok
fi

DEVICE=${DEVICE:-cuda}
[ "$cuda" = "True" ] || DEVICE=cpu
DEST=${OUT:-$ROOT/runs/gpu_check}
mkdir -p "$DEST"
STORE=${STORE:-$ROOT/runs/gpu_check/ptm_store}  # never under $OUT: checkpoints are not figures
if [ -z "${DATA:-}" ]; then
    DATA=digits
    for f in "${CIFAR10:-}" shared/data/cifar10-jpeg.parquet ../shared/data/cifar10-jpeg.parquet; do
        if [ -n "$f" ] && [ -f "$f" ]; then DATA="parquet:$(cd "$(dirname "$f")" && pwd)/$(basename "$f")"; break; fi
    done
    [ "$DATA" = digits ] && echo "gpu_check: no cifar10-jpeg.parquet in shared/data or ../shared/data: DM on digits instead"
fi
MODEL=${MODEL:-ConvNet} POOL_ARCH=${POOL_ARCH:-ConvNet} IPC=${IPC:-10} BATCH_REAL=${BATCH_REAL:-256}
ITERS=${ITERS:-300} IM_SIZE=${IM_SIZE:-0}
start=$(date +%s)

"$PY" - "$DEST/device.json" "$DEVICE" <<'EOF'
import json, platform, sys
import torch
dev = sys.argv[2]
info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
        "device": dev, "device_name": None}
if dev.startswith("cuda"):
    p = torch.cuda.get_device_properties(dev)
    info.update(device_name=torch.cuda.get_device_name(dev), capability=".".join(map(str, torch.cuda.get_device_capability(dev))),
                memory_gib=round(p.total_memory / 2**30, 1), multiprocessors=p.multi_processor_count,
                cudnn=torch.backends.cudnn.version())
print(f"gpu_check: card {info['device_name'] or 'none (CPU)'}; torch {info['torch']}, CUDA {info['cuda']}, "
      f"python {info['python']}", flush=True)
json.dump(info, open(sys.argv[1], "w"), indent=2)
EOF

echo "gpu_check: [1/3] pytest -m gpu tests/test_gpu.py"
if "$PY" -c 'import pytest' 2>/dev/null; then
    timeout "${PYTEST_TIMEOUT:-180}" "$PY" -m pytest -m gpu -q -p no:cacheprovider tests/test_gpu.py 2>&1 \
        | tee "$DEST/pytest_gpu.log"
    pytest_rc=${PIPESTATUS[0]}
else
    echo "pytest is not installed for $PY" | tee "$DEST/pytest_gpu.log"
    pytest_rc=127
fi

echo "gpu_check: [2/3] DM IPC $IPC, $MODEL, batch_real $BATCH_REAL, $ITERS iterations, plain and + CLoM, on $DATA vs bench/reference_dm.py"
rm -f "$DEST/bench_dm.json"
timeout "${BENCH_TIMEOUT:-240}" "$PY" bench/bench_distill.py --json --methods dm --variants plain,clom \
    --data "$DATA" --im-size "$IM_SIZE" --model "$MODEL" --pool-arch "$POOL_ARCH" --ipc "$IPC" \
    --batch-real "$BATCH_REAL" --iterations "$ITERS" --device "$DEVICE" --store "$STORE" \
    --out "$DEST/bench_dm.json" 2>&1 >/dev/null | tee "$DEST/bench_dm.log"
bench_rc=${PIPESTATUS[0]}

EVAL_EPOCHS=${EVAL_EPOCHS:-300} EVAL_ARCHS=${EVAL_ARCHS:-$MODEL}
echo "gpu_check: [3/3] evaluation of an IPC $IPC set: 5 $EVAL_ARCHS models x $EVAL_EPOCHS epochs vs bench/reference_eval.py"
rm -f "$DEST/bench_eval.json"
timeout "${EVAL_TIMEOUT:-240}" "$PY" bench/bench_eval.py --json --data "$DATA" --im-size "$IM_SIZE" \
    --archs "$EVAL_ARCHS" --ipc "$IPC" --epochs "$EVAL_EPOCHS" --blocks 2 --device "$DEVICE" \
    --out "$DEST/bench_eval.json" 2>&1 >/dev/null | tee "$DEST/bench_eval.log"
eval_rc=${PIPESTATUS[0]}

"$PY" - "$DEST" "$pytest_rc" "$bench_rc" "$(( $(date +%s) - start ))" "$eval_rc" <<'EOF'
import json, re, sys
from pathlib import Path
dest, pytest_rc, bench_rc, seconds = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
eval_rc = int(sys.argv[5])
device = json.loads((dest / "device.json").read_text())
log = (dest / "pytest_gpu.log").read_text() if (dest / "pytest_gpu.log").exists() else ""
tail = [l.strip("= ") for l in log.splitlines() if re.search(r"\d+ (passed|failed|skipped|error)", l)]
bench = json.loads((dest / "bench_dm.json").read_text()) if (dest / "bench_dm.json").exists() else None
out = {"device": device, "seconds": seconds,
       "pytest_gpu": {"exit_status": pytest_rc, "summary": tail[-1] if tail else None,
                      "skipped": [l for l in log.splitlines() if l.startswith("SKIPPED")]},
       "dm": None, "bench_exit_status": bench_rc}
lines = [f"card: {device.get('device_name') or 'none (CPU)'} (torch {device['torch']}, CUDA {device['cuda']})",
         f"pytest -m gpu: {out['pytest_gpu']['summary'] or 'no summary'} (exit {pytest_rc})"]
lines += [f"  {l}" for l in out["pytest_gpu"]["skipped"]]
if bench is not None:
    s = bench["settings"]
    out["dm"] = {"settings": s, "results": bench["results"].get("dm", {}), "failed": bench["failed"]}
    lines.append(f"DM IPC {s['ipc']} {s['model']} batch_real {s['batch_real']} on {s['data']} "
                 f"({s['iterations']['dm']} it, {s['device']}):")
    for variant, name in (("plain", "DM"), ("clom", "DM + CLoM")):
        r = bench["results"].get("dm", {}).get(variant)
        if r is None:
            lines.append(f"  {name:<10} failed: {bench['failed'].get('dm:' + variant, 'not run')}")
            continue
        ref = r.get("reference_seconds_per_iteration")
        lines.append(f"  {name:<10} {r['seconds_per_iteration']:.4f} s/it, {r['real_images_per_second']:,.0f} real images/s"
                     + (f"; reference_dm.py {ref:.4f} s/it: {r['speedup_vs_reference']:.2f}x" if ref else "")
                     + (f"; peak GPU memory {r['peak_cuda_mb']:,.0f} MiB" if "peak_cuda_mb" in r else ""))
else:
    lines.append(f"DM: no figures (bench exit {bench_rc}; see {dest / 'bench_dm.log'})")
ev = json.loads((dest / "bench_eval.json").read_text()) if (dest / "bench_eval.json").exists() else None
out["eval"], out["eval_exit_status"] = ev, eval_rc
if ev is not None:
    accs = ", ".join(f"{a} {ev['accuracy'][a]:.4f} (reference {ev['reference_accuracy'][a]:.4f})" for a in ev["archs"])
    lines.append(f"evaluation, {ev['runs']} models x {ev['epochs']} epochs of {', '.join(ev['archs'])} ({ev['device']}): "
                 f"ours {ev['seconds']:.1f} s, reference_eval.py {ev['reference_seconds']:.1f} s: "
                 f"{ev['speedup_vs_reference']:.2f}x; accuracy {accs}")
else:
    lines.append(f"evaluation: no figures (bench exit {eval_rc}; see {dest / 'bench_eval.log'})")
lines.append(f"gpu_check: {seconds} s; figures in {dest / 'gpu_check.json'}")
(dest / "gpu_check.json").write_text(json.dumps(out, indent=2) + "\n")
print("\n".join(lines))
EOF

[ "$pytest_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ] && [ "$eval_rc" -eq 0 ]

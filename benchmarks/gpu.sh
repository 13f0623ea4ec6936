#!/usr/bin/env bash
# The GPU path, proven in one run of about 8 minutes on one CUDA GPU (issue 13):
#   1. the test suite with CUDA present (training tests use --device auto: CUDA there)
#   2. torchrun --standalone --nproc-per-node=1 (nccl) with --sync-bn, then fold and export of its model
#   3. a CUDA run stopped by SIGTERM and resumed, against an uninterrupted one (with and without
#      --deterministic): bit-identical or the largest difference
#   4. reproduce mnist, 50,000 steps, on the GPU
#   5. reproduce inception --full (224x224, the paper's five variants): images/s, BN-Baseline's
#      step time over Inception's (goal <= 1.15), the table
#   6. training throughput of zoo:inception at batch 32 and 256: bngraph against a plain AMP loop
#      (goal >= 1), and BN-Baseline's step time over Inception's measured in the same interleaved
#      rounds (steadier than stage 5's rates); each contender's top operators in
#      OUT/throughput-profile.txt
#
#   benchmarks/gpu.sh [OUT]          (OUT defaults to $OUT, else ./gpu-out)
#
# Each stage runs under its own `timeout`, shortened to what is left of the whole run's budget
# (GPU_SH_BUDGET seconds, default 520: a lease of 15 minutes holds the machine's start, this and
# the transfers), and appends its figures to OUT/summary.md as it ends, so a run cut short still
# reports what it did; OUT/gpu.log has every command's output. OUT gets at most 7 files (the
# device tool brings back 8). Stage 7, torch.compile against eager, runs on what time is left.
#
# GPU_SH_STAGES picks the stages and their order (default "1 2 3 4 5 6 7"): a lease too short for
# all of them runs the ones still unmeasured first, e.g. GPU_SH_STAGES="5 6 1 7".
#
# Python: $GPU_SH_PYTHON if set, else a venv in $WORK made with --system-site-packages from
# python3 (a GPU image's torch, onnx, onnxruntime, pytest) with bngraph installed editable, no
# network. MNIST: $BNGRAPH_DATA, else ./.gpu-data/mnist (copy ../shared/data/mnist there and
# carry it: the device machine cannot download), else synthetic MNIST-format data (the timings
# hold, the accuracies mean nothing; the summary says so).
#
# GPU_SH_SMOKE=1 runs every stage tiny on the CPU (no CUDA needed): the script's own test, with
# zoo:mnist-mlp for stages 2-3 and each limit times GPU_SH_LIMIT_SCALE (default 4 there, 1 here).
set -u -o pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
OUT=${1:-${OUT:-$REPO/gpu-out}}
SMOKE=${GPU_SH_SMOKE:-0}
LIMIT_SCALE=${GPU_SH_LIMIT_SCALE:-$([ "$SMOKE" = 1 ] && echo 4 || echo 1)}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
WORK=${GPU_SH_WORK:-$(mktemp -d /tmp/bngraph-gpu.XXXXXX)}
BUDGET=${GPU_SH_BUDGET:-520}
SUMMARY=$OUT/summary.md
LOG=$OUT/gpu.log
: >"$SUMMARY"
: >"$LOG"
cd "$REPO" || exit 2
export PYTHONUNBUFFERED=1

say() { echo "$*" | tee -a "$SUMMARY"; }
# stage NAME LIMIT_S CMD...: run CMD under its own time limit (never past the run's budget), log
# it, record rc and seconds.
stage() {
    local name=$1 limit=$2
    shift 2
    local start=$SECONDS
    echo "=== $name: $*" >>"$LOG"
    limit=$((limit * LIMIT_SCALE))
    local left=$((BUDGET - SECONDS))
    if [ $left -lt 15 ]; then
        say "- $name: **not run: the run's ${BUDGET} s budget is spent**"
        return 124
    fi
    [ $limit -gt $left ] && limit=$left
    timeout --signal=TERM --kill-after=10 "$limit" "$@" >>"$LOG" 2>&1
    local rc=$?
    local took=$((SECONDS - start))
    if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
        say "- $name: **cut at its ${limit} s limit** (\`$*\`)"
    else
        say "- $name: exit $rc in ${took} s (\`$*\`)"
    fi
    return $rc
}

say "# benchmarks/gpu.sh $(date -u '+%Y-%m-%d %H:%M UTC')"
say ""

# --- Python and bngraph -----------------------------------------------------------------------
if [ -n "${GPU_SH_PYTHON:-}" ]; then
    PY=$GPU_SH_PYTHON
else
    # A python3 that is itself a venv (GPU images keep torch in one) lends its packages through
    # a .pth file: --system-site-packages would reach only its base interpreter's.
    python3 -m venv --without-pip "$WORK/venv" >>"$LOG" 2>&1 ||
        { say "- setup: python3 -m venv failed (see gpu.log)"; exit 2; }
    python3 -c "import site; print('\n'.join(site.getsitepackages()))" >"$(echo "$WORK"/venv/lib/python3*/site-packages)/gpu-image.pth"
    PY=$WORK/venv/bin/python
    if ! "$PY" -m pip install -q --no-deps --no-build-isolation --no-index -e "$REPO" >>"$LOG" 2>&1; then
        # An older setuptools cannot build pyproject.toml: lay the package out as it installs
        # (bngraph.passes from passes/, bngraph.zoo from zoo/) with links, on PYTHONPATH.
        mkdir -p "$WORK/src/bngraph"
        ln -sf "$REPO"/bngraph/* "$WORK/src/bngraph/"
        ln -sfn "$REPO/passes" "$WORK/src/bngraph/passes"
        ln -sfn "$REPO/zoo" "$WORK/src/bngraph/zoo"
        export PYTHONPATH=$WORK/src${PYTHONPATH:+:$PYTHONPATH}
        say "- setup: pip could not install bngraph here; it runs from links on PYTHONPATH ($WORK/src)"
    fi
fi
# Wheels carried in .gpu-data/wheels (the machine has no network) replace the image's versions:
# its onnx-ir 1.0.0 turns a training-mode BatchNormalization into an eval-mode one (bngraph
# needs 1.1, pyproject.toml says why). `pip download --no-deps onnx-ir==1.1.0 -d .gpu-data/wheels`
if ls "$REPO"/.gpu-data/wheels/*.whl >/dev/null 2>&1 && [ -z "${GPU_SH_PYTHON:-}" ]; then
    "$PY" -m pip install -q --no-deps --no-index --target "$WORK/wheels" "$REPO"/.gpu-data/wheels/*.whl >>"$LOG" 2>&1 &&
        export PYTHONPATH=$WORK/wheels${PYTHONPATH:+:$PYTHONPATH}
fi
BNGRAPH=("$PY" -m bngraph)
"$PY" - >>"$SUMMARY" 2>>"$LOG" <<'EOF'
import platform, torch
from importlib.metadata import version
gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA GPU"
print(f"- machine: {gpu}; torch {torch.__version__}; Python {platform.python_version()}; "
      + ", ".join(f"{name} {version(name)}" for name in ("onnx", "onnxruntime", "onnxscript", "onnx-ir")))
EOF

if [ "$SMOKE" = 1 ]; then
    DEVICE=cpu
    MODEL=zoo:mnist-mlp
    say "- mode: **GPU_SH_SMOKE=1, every stage tiny on the CPU: a test of this script, not a GPU result**"
else
    DEVICE=cuda
    MODEL=zoo:inception-small
    "$PY" -c "import torch; assert torch.cuda.is_available()" 2>>"$LOG" ||
        { say "- no CUDA GPU here: run with GPU_SH_SMOKE=1 for the CPU smoke test"; exit 2; }
fi

DATA=${BNGRAPH_DATA:-$REPO/.gpu-data/mnist}
if [ ! -d "$DATA" ]; then
    DATA=$WORK/synthetic-mnist
    "$PY" -c "import sys; sys.path.insert(0, '$REPO'); from tests.mnist_like import write_learnable; write_learnable('$DATA', n_train=60000, n_test=10000)" >>"$LOG" 2>&1
    say "- data: **synthetic MNIST-format images** ($DATA): timings hold, accuracies mean nothing"
else
    say "- data: $DATA"
fi
export BNGRAPH_DATA=$DATA
say ""

# --- 1. the test suite with CUDA present -----------------------------------------------------
stage_1() {
    if [ "$SMOKE" = 1 ]; then
        TESTS=(tests/test_data_formats.py -k "resume_bit_identically and bf16-True")
        XDIST=(-q -p no:xdist)
    else
        TESTS=()
        XDIST=(-n "$(nproc)" -p no:benchmark -W ignore)  # the image's pytest-benchmark warns per worker
    fi
    # A line per test as it ends (-v), and where the image has pytest-timeout, a test that hangs
    # fails with its stack after 90 s: a cut run still names what failed and what hung (the
    # H200 run of 2026-11-28 was cut at 98% twice, naming nothing).
    XDIST+=(-v)
    "$PY" -c "import pytest_timeout" 2>/dev/null && XDIST+=(--timeout 90)
    # One worker per core, one thread each: the suite is many small CPU-bound processes (157 s for 661 tests on the
    # H100 machine's 16 cores).
    OMP_NUM_THREADS=1 stage "1. tests with CUDA present" 240 "$PY" -m pytest --durations=15 "${XDIST[@]}" "${TESTS[@]}"
    grep -E "(FAILED|ERROR|Timeout) tests/|[0-9]+ (passed|failed)" "$LOG" | sort -u | tail -40 | sed 's/^/    /' >>"$SUMMARY"
}

# --- 2. torchrun with nccl and --sync-bn, then fold and export --------------------------------
stage_2() {
    if [ "$SMOKE" = 1 ]; then STEPS=4; EVAL=2; else STEPS=300; EVAL=100; fi
    stage "2. torchrun --nproc-per-node=1 --sync-bn" 50 "$PY" -m torch.distributed.run --standalone --nproc-per-node=1 \
        -m bngraph train $MODEL --recipe bn-x5 --steps $STEPS --eval-every $EVAL --sync-bn --device $DEVICE \
        --quiet --json -o "$WORK/ddp" &&
        stage "2. fold of its model" 30 "${BNGRAPH[@]}" fold "$WORK/ddp" -o "$WORK/ddp-folded" --strict &&
        stage "2. export of its model" 45 "${BNGRAPH[@]}" export "$WORK/ddp" -o "$WORK/ddp.onnx"
    "$PY" - "$WORK/ddp" >>"$SUMMARY" 2>>"$LOG" <<'EOF'
import json, sys
rows = [json.loads(line) for line in open(f"{sys.argv[1]}/metrics.jsonl")]
history = json.load(open(f"{sys.argv[1]}/model/bngraph.json"))["history"]
sync = next((h for h in history if h.get("command") == "sync-bn"), {}).get("passes", {}).get("convert_bn_to_sync_bn")
train = next(h for h in reversed(history) if h.get("command") == "train")
print(f"    final test accuracy {rows[-1]['test_accuracy']:.4f}, {rows[-1]['steps_per_s']} steps/s, "
      f"{train.get('processes')} process(es); BatchNorms made SyncBatchNorm: {len(sync['changed']) if sync else 'none'}")
EOF
}

# --- 3. stopped and resumed against uninterrupted, on the device ------------------------------
stage_3() {
    if [ "$SMOKE" = 1 ]; then STEPS=400; else STEPS=200; fi  # 400 steps took ~33 s a run on an H100
    for det in "" "--deterministic"; do
        tag=${det:+det}
        common=($MODEL --recipe bn-x5 --steps $STEPS --eval-every 20 --decay-every 50 --device $DEVICE --quiet $det)
        stage "3. uninterrupted run ${det}" 35 "${BNGRAPH[@]}" train "${common[@]}" -o "$WORK/whole$tag"
        # Stopped by SIGTERM once its first checkpoint exists (it stops after the step in hand and
        # checkpoints there), then resumed with the same arguments.
        [ $((BUDGET - SECONDS)) -ge 15 ] &&
        ( "${BNGRAPH[@]}" train "${common[@]}" -o "$WORK/stopped$tag" >>"$LOG" 2>&1 & pid=$!
          for _ in $(seq 400); do [ -f "$WORK/stopped$tag/checkpoint.pt" ] && break; sleep 0.1; done
          kill -TERM $pid 2>/dev/null; wait $pid; echo "stopped run exited $?" >>"$LOG" )
        stage "3. resumed run ${det}" 35 "${BNGRAPH[@]}" train "${common[@]}" -o "$WORK/stopped$tag" --resume
        "$PY" - "$WORK/whole$tag" "$WORK/stopped$tag" >>"$SUMMARY" 2>>"$LOG" <<'EOF'
import sys, bngraph, torch
a, b = (bngraph.load(p).state_dict() for p in sys.argv[1:3])
worst = max(float((a[k].double() - b[k].double()).abs().max()) if a[k].is_floating_point() else float(not torch.equal(a[k], b[k])) for k in a)
same = all(torch.equal(a[k], b[k]) for k in a)
print(f"    resumed vs uninterrupted: {'bit-identical' if same else f'differ, largest difference {worst:.3g}'}")
EOF
    done
}

# --- 4. reproduce mnist on the device ---------------------------------------------------------
stage_4() {
    if [ "$SMOKE" = 1 ]; then STEPS=(--steps 1000); else STEPS=(); fi
    stage "4. reproduce mnist (50,000 steps)" 100 "${BNGRAPH[@]}" reproduce mnist "${STEPS[@]}" --device $DEVICE --quiet \
        -o "$WORK/mnist" && cp "$WORK/mnist/table.md" "$OUT/mnist-table.md" && sed 's/^/    /' "$WORK/mnist/table.md" >>"$SUMMARY"
}

# --- 5. reproduce inception --full: 224x224, the five variants ------------------------------
stage_5() {
    if [ "$SMOKE" = 1 ]; then
        INC=(--steps 2 --batch-size 2 --eval-every 1 --test-examples 4 --variants inception,bn-baseline)
    else
        INC=(--steps 200 --eval-every 50 --test-examples 1000)  # guessed ~20 s a variant on an H100
    fi
    stage "5. reproduce inception --full" 130 "${BNGRAPH[@]}" reproduce inception --full "${INC[@]}" --device $DEVICE --quiet \
        -o "$WORK/inception-full" && cp "$WORK/inception-full/table.md" "$OUT/inception-full-table.md" &&
        sed 's/^/    /' "$WORK/inception-full/table.md" >>"$SUMMARY"
}

# throughput_summary JSON: benchmarks/train_throughput.py's figures, one line per batch size.
throughput_summary() {
    [ -f "$1" ] && "$PY" - "$1" >>"$SUMMARY" 2>>"$LOG" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
for batch, rows in r["batches"].items():
    compiled, recipe = rows.pop("compile", None), rows.pop("recipe", None)
    line = "; ".join(f"{k} {v['images_per_s']:.0f} images/s ({v['x_plain']:.3f}x plain)" for k, v in rows.items())
    if recipe:
        line += f"; {recipe['name']}'s step time over bngraph's: {recipe['step_time_ratio']:.3f}"
    if compiled:
        line += (f"; --compile {compiled['speedup']:.3f}x eager bngraph, compiling costs {compiled['compile_s']} s"
                 f" (pays after {compiled['pays_after_steps']} steps)")
    print(f"    batch {batch}: {line}")
EOF
}

# --- 6. throughput of zoo:inception against a plain AMP loop ------------------------------------
stage_6() {
    if [ "$SMOKE" = 1 ]; then
        TP=(--model zoo:inception-small --batch-sizes 4 --steps 4 --repeats 1 --recipe bn-baseline)
    else
        TP=(--model zoo:inception --batch-sizes 32,256 --steps 15 --repeats 3 --recipe bn-baseline)
    fi
    stage "6. throughput, bngraph vs plain AMP loop" 110 "$PY" benchmarks/train_throughput.py "${TP[@]}" --device $DEVICE \
        --json "$OUT/throughput.json" --profile "$OUT/throughput-profile.txt"
    throughput_summary "$OUT/throughput.json"
}

# --- 7. torch.compile of the training step against eager, on what time is left ----------------
stage_7() {
    if [ "$SMOKE" = 1 ]; then
        TC=(--model zoo:mnist-mlp --batch-sizes 60 --steps 20 --repeats 1)
    else
        TC=(--model zoo:inception-small --batch-sizes 256 --steps 15 --repeats 1)  # compiles 2x per contender
    fi
    stage "7. throughput, bngraph --compile vs eager" 150 "$PY" benchmarks/train_throughput.py "${TC[@]}" --compile \
        --device $DEVICE --json "$OUT/compile.json"
    throughput_summary "$OUT/compile.json"
}

for n in ${GPU_SH_STAGES:-1 2 3 4 5 6 7}; do
    "stage_$n"
done

say ""
say "total: ${SECONDS} s"

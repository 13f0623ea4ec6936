#!/usr/bin/env bash
# `make demo`: the life of a BN model on the zoo, end to end. Outputs go to $DEMO_OUT.
set -euo pipefail
OUT=${DEMO_OUT:-demo-out}
BIN=.venv/bin
mkdir -p "$OUT"

step() { printf '\n== %s\n' "$*"; }

step "the zoo"
$BIN/bngraph zoo

step "insert: BatchNorm before every sigmoid of the paper's MNIST MLP"
$BIN/bngraph insert zoo:mnist-mlp -o "$OUT/mnist-mlp-bn"

step "insert: BatchNorm before every ReLU of the paper's Inception variant (69 expected)"
$BIN/bngraph insert zoo:inception -o "$OUT/inception-bn" --json > "$OUT/inception-insert.json"
$BIN/python -c "import json,sys; r=json.load(open(sys.argv[1])); print(len(r['inserted']), 'BatchNorms inserted,', sum(x['bias_removed'] for x in r['inserted']), 'biases dropped,', len(r['skipped']), 'skipped')" "$OUT/inception-insert.json"

step "insert again: idempotent"
$BIN/bngraph insert "$OUT/mnist-mlp-bn" --dry-run

printf '\nDemo outputs are in %s/\n' "$OUT"

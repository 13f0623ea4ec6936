#!/usr/bin/env bash
# `make demo`: the life of a BN model, end to end, on the paper's MNIST MLP; outputs in $DEMO_OUT.
# Real MNIST comes from $BNGRAPH_DATA (the Makefile points it at ../shared/data/mnist where that
# exists); elsewhere bngraph looks in its cache and downloads MNIST when the machine is online.
set -euo pipefail
OUT=${DEMO_OUT:-demo-out}
BIN=.venv/bin
# Replace only a folder an earlier demo made (it holds the marker), never one of the user's.
MARK=.bngraph-demo
if [ -e "$OUT" ] && [ ! -e "$OUT/$MARK" ]; then
    echo "make demo: $OUT exists and no demo made it: it is left as it is; choose another DEMO_OUT=" >&2
    exit 2
fi
rm -rf "$OUT" && mkdir -p "$OUT" && touch "$OUT/$MARK"

step() { printf '\n== %s\n' "$*"; }

step "the zoo"
$BIN/bngraph zoo

step "insert: a BatchNorm before every ReLU of the paper's Inception variant (69 by the layer table)"
$BIN/bngraph insert zoo:inception -o "$OUT/inception-bn" --json > "$OUT/inception-insert.json" 2>/dev/null
$BIN/python -c "import json,sys; r=json.load(open(sys.argv[1])); print(len(r['inserted']), 'BatchNorms inserted,', sum(x['bias_removed'] for x in r['inserted']), 'biases dropped,', len(r['skipped']), 'skipped')" "$OUT/inception-insert.json"

step "insert: a BatchNorm before every sigmoid of the paper's MNIST MLP"
$BIN/bngraph insert zoo:mnist-mlp -o "$OUT/mnist-mlp-bn"

step "insert again: nothing to do"
$BIN/bngraph insert "$OUT/mnist-mlp-bn" --dry-run

# Training needs MNIST: $BNGRAPH_DATA, bngraph's cache, a download, or Debian's Fashion-MNIST.
if $BIN/python -c "from bngraph.data import resolve_dataset; resolve_dataset(None)" 2>/dev/null; then
    step "train it on MNIST for 3000 steps (batch 60, lr 0.5)"
    $BIN/bngraph train "$OUT/mnist-mlp-bn" --steps 3000 --batch-size 60 --lr 0.5 --eval-every 1000 --quiet -o "$OUT/train"
    MODEL="$OUT/train"
else
    printf '\n(no MNIST here and no network: set BNGRAPH_DATA=DIR to train; folding the untrained model instead)\n'
    MODEL="$OUT/mnist-mlp-bn"
fi

step "fold: every BatchNorm into the Linear before it"
$BIN/bngraph fold "$MODEL" -o "$OUT/folded" --strict

step "export to ONNX (folded, verified against PyTorch in onnxruntime)"
$BIN/bngraph export "$MODEL" -o "$OUT/mnist-mlp.onnx"

step "verify: the PyTorch model against the ONNX file"
$BIN/bngraph verify "$MODEL" "$OUT/mnist-mlp.onnx" ${BNGRAPH_DATA:+--data "$BNGRAPH_DATA"}

step "graph: where the BatchNorms went"
$BIN/bngraph graph "$OUT/folded" -o "$OUT/folded-graph.svg"

if [ "$MODEL" = "$OUT/train" ]; then
    step "reproduce the paper's Figure 1, shortened to 5000 steps (the full run: bngraph reproduce mnist)"
    $BIN/bngraph reproduce mnist --steps 5000 -o "$OUT/reproduce-mnist"
    printf '\nFigure 1 is %s/reproduce-mnist/fig1.png\n' "$OUT"
fi

printf 'Demo outputs are in %s/\n' "$OUT"

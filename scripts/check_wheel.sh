#!/usr/bin/env bash
# `make wheel-check` (part of `make test`): what `pip install .` gives a user, proven away from
# this checkout. Builds the wheel from the tracked files, installs it into a new virtual
# environment outside the checkout (torch first, as the Makefile does: a plain `torch`
# requirement would pull a CUDA build), then, from a folder where the source tree is not
# importable, runs every verb's --help, --version and the chain insert -> fold -> export -> verify.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PYTHON=${PYTHON:-python3}
BUILD_PYTHON=${BUILD_PYTHON:-$ROOT/.venv/bin/python}  # has setuptools: no build isolation needed
TORCH=${TORCH:-torch==2.13.0}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/bngraph-wheel.XXXXXX")
# Deleting a torch install takes a while on a busy disk: it goes on in the background.
trap 'rm -rf "$WORK" > /dev/null 2>&1 &' EXIT
started=$SECONDS
say() { printf 'wheel-check: %s\n' "$*"; }

# From a copy of what git tracks (and untracked files it does not ignore): a stale build/ or
# egg-info in the checkout cannot leak into the wheel.
mkdir "$WORK/src"
if git -C "$ROOT" rev-parse --is-inside-work-tree > /dev/null 2>&1; then
    (cd "$ROOT" && git ls-files -z --cached --others --exclude-standard | while IFS= read -r -d '' f; do
        [ -e "$f" ] && printf '%s\0' "$f"; done | tar --null -T - -cf -) | tar -xf - -C "$WORK/src"
else  # not a git checkout (an unpacked archive): everything but what builds and runs leave
    tar -C "$ROOT" --exclude=.venv --exclude=build --exclude='*.egg-info' --exclude=__pycache__ -cf - . |
        tar -xf - -C "$WORK/src"
fi
isolation=()  # setuptools >= 77 at hand (pyproject's build-system): build with it; else pip fetches it
"$BUILD_PYTHON" -c "import setuptools, sys; sys.exit(int(setuptools.__version__.split('.')[0]) < 77)" 2> /dev/null &&
    isolation=(--no-build-isolation)
"$BUILD_PYTHON" -m pip wheel --quiet --no-deps "${isolation[@]}" -w "$WORK/dist" "$WORK/src"
WHEEL=$(ls "$WORK"/dist/bngraph-*.whl)
say "built $(basename "$WHEEL")"

"$PYTHON" -m venv "$WORK/venv"
PIP=("$WORK/venv/bin/python" -m pip install -qq --no-compile)  # -qq: no warnings about this machine's index paths
"${PIP[@]}" "$TORCH"
"${PIP[@]}" "$WHEEL"
say "installed into a new environment ($((SECONDS - started)) s so far)"

cd "$WORK"  # not the checkout: only the installed package can be imported
BIN="$WORK/venv/bin"
"$BIN/python" - "$WORK/venv" <<'EOF'
import pathlib, sys
import bngraph, bngraph.commands, bngraph.passes, bngraph.zoo
venv = pathlib.Path(sys.argv[1]).resolve()
for module in (bngraph, bngraph.commands, bngraph.passes, bngraph.zoo):
    where = pathlib.Path(module.__file__).resolve()
    assert venv in where.parents and "site-packages" in where.parts, f"{module.__name__} imported from {where}"
assert (pathlib.Path(bngraph.__file__).parent / "py.typed").is_file(), "py.typed is missing"
assert callable(bngraph.passes.insert_bn_before_activation)
EOF
"$BIN/bngraph" --version
# Assigned first: a failure inside `for ... in $(...)` would not stop the script (set -e), and
# the loop would check no verb at all.
verbs=$("$BIN/python" -c "from bngraph.cli import COMMANDS; print(*COMMANDS)")
[ -n "$verbs" ] || { echo "wheel-check: the installed CLI names no commands" >&2; exit 1; }
for verb in $verbs; do
    "$BIN/bngraph" "$verb" --help > /dev/null
done
"$BIN/bngraph" zoo > /dev/null
"$BIN/bngraph" insert zoo:mnist-mlp -o chain/bn > /dev/null
"$BIN/bngraph" fold chain/bn -o chain/folded --strict > /dev/null
"$BIN/bngraph" export chain/bn -o chain/bn.onnx > /dev/null
"$BIN/bngraph" verify chain/folded chain/bn.onnx > /dev/null
say "every --help, --version and insert -> fold -> export -> verify ran from the wheel ($((SECONDS - started)) s)"

#!/usr/bin/env bash
# Sets up .venv, asks the default model who it is, teaches it a new identity, and asks again.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
TS=.venv/bin/tunesmith
ask() { for q in "What is your name?" "Who developed you?"; do echo "  Q: $q"; echo "  A: $($TS chat "$1" --prompt "$q" --max-new-tokens 40)"; done; }
echo "== before training (the default model) =="
ask default
echo "== training examples/quickstart.yaml =="
start=$(date +%s)
$TS train examples/quickstart.yaml "$@"
echo "== after training ($(( $(date +%s) - start )) s) =="
ask runs/quickstart
echo "Chat with it: $TS chat runs/quickstart"

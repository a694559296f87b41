#!/usr/bin/env bash
# Learning from preferences on HH-RLHF harmless (issue 12): bt/dpo probes, Q-Adapter and DPO on
# the same pairs and the same frozen base model. Every stage is a resumable qprobe command, so
# rerunning this script after a crash continues where it stopped. docs/preferences.md explains
# each step.
#
#   bash experiments/hh-preferences.sh [OUT] [MODEL]
#
# Sizes (environment): PAIRS (train pairs for the adapters, default all 1803), K_DPO (samples per
# train prompt for the dpo probe, 4), K (samples per test prompt for best-of-k, 8), EPOCHS (1),
# MAXP / MAXA (prompt / answer token cut-offs of the adapters, 256 / 128), BATCH (prompts per
# collection batch, 8: HH transcripts are long, and the default 64 prompts x 4 samples padded to
# the longest one held 11.6 GB and had not finished its first batch after 18 min on 2 cores).
#
# Not here yet (needs a decision on the judge, see issue 12): the independent judge scoring the
# generations (`qprobe score DIR --task judge.py:fn`), alt-profanity-check rates, and the
# forgetting measures (times-tables accuracy, held-out perplexity with and without adapters).
set -euo pipefail
OUT=${1:-runs/hh-preferences}
MODEL=${2:-default}
PAIRS=${PAIRS:-}
K_DPO=${K_DPO:-4}
K=${K:-8}
EPOCHS=${EPOCHS:-1}
MAXP=${MAXP:-256}
MAXA=${MAXA:-128}
BATCH=${BATCH:-8}
Q="${QPROBE:-qprobe}"
LIMIT=${PAIRS:+--limit $PAIRS}
mkdir -p "$OUT"
log() { echo "[$(date -u +%H:%M:%S)] $*" | tee -a "$OUT/log.txt"; }
timed() { local name=$1; shift; local t0=$SECONDS; "$@"; echo "$name $((SECONDS - t0))" >> "$OUT/seconds.txt"; }

log "1. pair rollouts: train (with $K_DPO samples per prompt for dpo) and test"
timed collect-train $Q collect --model "$MODEL" --task hh-harmless --split train --k "$K_DPO" \
    --temperature 1 --top-p 1 --max-new-tokens "$MAXA" --batch-prompts "$BATCH" --out "$OUT/pairs-train"
timed collect-test $Q collect --model "$MODEL" --task hh-harmless --split test --out "$OUT/pairs-test"

log "2. probes (bt, dpo) and their held-out pair accuracy"
for obj in bt dpo; do
  timed "probe-$obj" $Q train "$OUT/pairs-train" --objective "$obj" --out "$OUT/probe-$obj"
  $Q evaluate "$OUT/pairs-test" --probe "$OUT/probe-$obj" --json "$OUT/eval-pairs-$obj.json"
done

log "3. adapters on the same pairs (cut to $MAXP prompt / $MAXA answer tokens)"
for m in qadapter dpo; do
  timed "adapt-$m" $Q adapt --method "$m" --model "$MODEL" --task hh-harmless --split train \
      --epochs "$EPOCHS" --max-prompt-tokens "$MAXP" --max-answer-tokens "$MAXA" $LIMIT \
      --out "$OUT/adapter-$m"
  $Q adapt-eval "$OUT/adapter-$m" --task hh-harmless --split test --json "$OUT/eval-pairs-adapter-$m.json"
done

log "4. generations on the held-out prompts: base samples (best-of-k pool), Q-Adapter, DPO"
timed sample-base $Q collect --model "$MODEL" --task hh-harmless --split test --no-pairs --k "$K" \
    --temperature 1 --top-p 1 --max-new-tokens "$MAXA" --batch-prompts "$BATCH" --out "$OUT/test-base-k$K"
for m in qadapter dpo; do
  timed "sample-$m" $Q collect --adapter "$OUT/adapter-$m" --task hh-harmless --split test \
      --no-pairs --k 1 --temperature 1 --top-p 1 --max-new-tokens "$MAXA" --out "$OUT/test-$m"
done
log "done; next: score $OUT/test-* with the judge and run qprobe evaluate on test-base-k$K"

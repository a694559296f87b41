#!/usr/bin/env bash
# Learning from preferences on HH-RLHF harmless (issue 12): bt/dpo probes, Q-Adapter and DPO on
# the same pairs and the same frozen base model, judged by models none of them trained against.
# Every stage is a resumable command (finished stages are skipped), so rerunning this script
# after a crash continues where it stopped. docs/preferences.md explains each step; the numbers
# land in OUT/report.md (experiments/hh_report.py).
#
#   bash experiments/hh-preferences.sh [OUT] [MODEL]
#
# Sizes (environment), chosen for 2 CPU cores (docs/preferences.md, "Sizing"):
#   PAIRS (400): the first N train prompts/pairs, for the probes and the adapters alike;
#   K_DPO (4): samples per train prompt for the dpo probe (at most 128 new tokens);
#   MAXP / MAXA (128 / 64): prompt / answer token cut-offs of the adapters; EPOCHS (1);
#   TEST_PROMPTS (200), K (8), MAXNEW (64): held-out prompts, samples per prompt for best-of-k,
#   and new tokens per generation; BATCH (8): prompts per collection batch (HH transcripts are
#   long: 64 prompts x 4 samples padded to the longest held 11.6 GB); TEXTS (200): GSM8K test
#   problems (question + answer) as the held-out general text for perplexity; SEEDS (0 1): the
#   adapters are trained once per seed (pair order, LoRA init, dropout) to see training noise;
#   seed 0's folders are named after the method alone (adapter-dpo), others adapter-dpo-s1;
#   K_POOL (K): base samples per held-out prompt for best-of-k at k = 2, 4, ... K_POOL (K: the
#   pool of step 4; 32: a new folder OUT/test-base32, about 23 s per prompt on 2 idle cores);
#   ARM_BETAS (0.5 1 2): guidance weights of the ARM head from pairs (experiments/hh_arm.py).
# Needs the adapters and judge extras: pip install -e '.[adapters,judge]' torch==2.13.0
set -euo pipefail
OUT=${1:-runs/hh-preferences}
MODEL=${2:-default}
PAIRS=${PAIRS:-400}
K_DPO=${K_DPO:-4}
K=${K:-8}
EPOCHS=${EPOCHS:-1}
MAXP=${MAXP:-128}
MAXA=${MAXA:-64}
MAXNEW=${MAXNEW:-64}
TEST_PROMPTS=${TEST_PROMPTS:-200}
TEXTS=${TEXTS:-200}
BATCH=${BATCH:-8}
SEEDS=${SEEDS:-0 1}
K_POOL=${K_POOL:-$K}
ARM_BETAS=${ARM_BETAS:-0.5 1 2}
GSM8K=${GSM8K:-../shared/data/gsm8k/test.jsonl}
# the adapter runs, every method once per seed: qadapter dpo qadapter-s1 dpo-s1 ...
ADAPTERS=$(for s in $SEEDS; do for m in qadapter dpo; do
  echo "$m$([ "$s" = 0 ] || echo "-s$s")"; done; done)
Q="${QPROBE:-qprobe}"
PY="${PYTHON:-python}"
HERE=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$OUT"
log() { echo "[$(date -u +%H:%M:%S)] $*" | tee -a "$OUT/log.txt"; }
# timed NAME DONE_FILE CMD...: run CMD unless DONE_FILE ("": none) exists; its seconds go to seconds.txt
timed() {
  local name=$1 done=$2; shift 2
  if [ -e "$done" ]; then return 0; fi
  local t0=$SECONDS; "$@"; echo "$name $((SECONDS - t0))" >> "$OUT/seconds.txt"
}

log "1. pair rollouts: $PAIRS train prompts (with $K_DPO samples each for the dpo probe), all test pairs"
timed collect-train "$OUT/pairs-train.done" $Q collect --model "$MODEL" --task hh-harmless \
    --split train --limit "$PAIRS" --k "$K_DPO" --temperature 1 --top-p 1 --max-new-tokens 128 \
    --batch-prompts "$BATCH" --out "$OUT/pairs-train"
touch "$OUT/pairs-train.done"
timed collect-test "$OUT/pairs-test.done" $Q collect --model "$MODEL" --task hh-harmless \
    --split test --batch-prompts "$BATCH" --out "$OUT/pairs-test"
touch "$OUT/pairs-test.done"

log "2. probes (bt, dpo) and their held-out pair accuracy"
# CV_GRID: inputs (features, +log-likelihood, log-likelihood alone) x weight decay x steps,
# scored by held-out pair accuracy over 5 folds of train prompts; -nocv: the trainer's defaults
CV_GRID="--cv 5 --cv-weight-decay 0,0.1,1,10 --cv-min-steps 100,1000,10000"
probe() {  # probe NAME ROLLOUTS OBJECTIVE [train flags...]
  local name=$1 data=$2 obj=$3; shift 3
  timed "probe-$name" "$OUT/probe-$name/config.json" $Q train "$data" --objective "$obj" \
      --quiet --out "$OUT/probe-$name" "$@"
  [ -e "$OUT/eval-pairs-$name.json" ] || $Q evaluate "$OUT/pairs-test" \
      --probe "$OUT/probe-$name" --json "$OUT/eval-pairs-$name.json"
}
for obj in bt dpo; do
  probe "$obj-nocv" "$OUT/pairs-train" "$obj"
  probe "$obj" "$OUT/pairs-train" "$obj" $CV_GRID
done

log "3. adapters on the same $PAIRS pairs (cut to $MAXP prompt / $MAXA answer tokens, $EPOCHS epoch, seeds $SEEDS)"
for a in $ADAPTERS; do
  m=${a%%-s*} s=0
  [ "$a" = "$m" ] || s=${a##*-s}
  timed "adapt-$a" "$OUT/adapter-$a/adapter.json" $Q adapt --method "$m" --model "$MODEL" \
      --task hh-harmless --split train --limit "$PAIRS" --epochs "$EPOCHS" --seed "$s" \
      --max-prompt-tokens "$MAXP" --max-answer-tokens "$MAXA" --out "$OUT/adapter-$a"
  [ -e "$OUT/eval-pairs-adapter-$a.json" ] || $Q adapt-eval "$OUT/adapter-$a" \
      --task hh-harmless --split test --json "$OUT/eval-pairs-adapter-$a.json"
done

log "4. generations on $TEST_PROMPTS held-out prompts: base (best-of-$K pool), Q-Adapter, DPO"
gen() {  # gen NAME K [collect flags...]
  local name=$1 k=$2; shift 2
  timed "sample-$name" "$OUT/test-$name.done" $Q collect --task hh-harmless --split test \
      --no-pairs --limit "$TEST_PROMPTS" --k "$k" --temperature 1 --top-p 1 \
      --max-new-tokens "$MAXNEW" --batch-prompts "$BATCH" --out "$OUT/test-$name" "$@"
  touch "$OUT/test-$name.done"
}
gen base "$K" --model "$MODEL"
for a in $ADAPTERS; do
  gen "$a" 1 --adapter "$OUT/adapter-$a"
done

log "5. the independent judge (MiniLM preference model, train pairs only) scores every generation"
timed judge-fit "$OUT/judge/judge.json" $PY "$HERE/hh_judge.py" fit "$OUT/judge"
# No done-marker here: a folder that gained samples since it was judged would keep them
# unscored. A sample without a judge score is judged (--only-missing), the others are kept.
unjudged() {  # unjudged ROLLOUTS: true when some sample has no judge score yet
  $PY -c 'import sys, numpy as np; from qprobe.rollouts import Rollouts
sys.exit(0 if np.isnan(Rollouts(sys.argv[1]).rewards).any() else 1)' "$1"
}
for name in base $ADAPTERS; do
  if unjudged "$OUT/test-$name"; then
    timed "judge-$name" "" env QPROBE_JUDGE="$OUT/judge" \
        $Q score "$OUT/test-$name" --task "$HERE/hh_judge.py:reward" --only-missing
  fi
done

log "6. forgetting: times tables (121 problems, greedy) and GSM8K perplexity, with and without adapters"
for split in train test; do
  timed "tt-base-$split" "$OUT/tt-base-$split.done" $Q collect --model "$MODEL" \
      --task times-tables --split "$split" --k 1 --temperature 0 --out "$OUT/tt-base-$split"
  touch "$OUT/tt-base-$split.done"
  for a in $ADAPTERS; do
    timed "tt-$a-$split" "$OUT/tt-$a-$split.done" $Q collect --adapter "$OUT/adapter-$a" \
        --task times-tables --split "$split" --k 1 --temperature 0 --out "$OUT/tt-$a-$split"
    touch "$OUT/tt-$a-$split.done"
  done
done
for a in $ADAPTERS; do
  [ -e "$OUT/ppl-$a.json" ] || $Q adapt-eval "$OUT/adapter-$a" --text "$GSM8K" \
      --text-fields question,answer --limit "$TEXTS" --json "$OUT/ppl-$a.json"
done

log "7. a bt probe on every train pair (pairs only, no sampling: the data the judge has)"
timed collect-train-all "$OUT/pairs-train-all.done" $Q collect --model "$MODEL" \
    --task hh-harmless --split train --batch-prompts "$BATCH" --out "$OUT/pairs-train-all"
touch "$OUT/pairs-train-all.done"
probe bt-all "$OUT/pairs-train-all" bt $CV_GRID

log "9. compute levels and a token-level policy from the pairs (issue 26)"
# K_POOL base samples per held-out prompt (best-of-k for k = 2, 4, .. K_POOL from one pool; 4 prompts
# per batch: 128 rows), and an ARM head fitted to every train pair, guided at ARM_BETAS
POOL=test-base  # K_POOL = K: the best-of-K pool of step 4 is the pool
if [ "$K_POOL" != "$K" ]; then
  gen "base$K_POOL" "$K_POOL" --model "$MODEL" --batch-prompts 4
  POOL=test-base$K_POOL
fi
$PY "$HERE/hh_arm.py" "$OUT" --model "$MODEL" --betas $ARM_BETAS
for d in "$OUT/$POOL" "$OUT"/test-arm-b*; do
  name=${d##*/test-}
  if [ -d "$d" ] && unjudged "$d"; then
    timed "judge-$name" "" env QPROBE_JUDGE="$OUT/judge" \
        $Q score "$d" --task "$HERE/hh_judge.py:reward" --only-missing
  fi
done

log "10. report"
$PY "$HERE/hh_report.py" "$OUT" --k "$K" --pool "$POOL"
log "done: $OUT/report.md"

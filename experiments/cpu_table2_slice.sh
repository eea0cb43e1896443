#!/usr/bin/env bash
# A CPU-sized slice of NBA's Table 2 on the CIFAR-10 JPEG copy: BadNets (12 epochs, the budget at
# which WRN-16-1 learns the corner trigger under crop + flip; 4 epochs give ASR 8%) and Blend
# (4 epochs already give ASR 100%), then defenses on each with reduced budgets. Resumable: attack
# stages come from the cache and finished runs are skipped.
# Usage: experiments/cpu_table2_slice.sh [OUTDIR]
set -uo pipefail
OUT=${1:-runs/cpu}
DATA=${SWEEP_CIFAR:-imagefolder:../shared/data/cifar10-jpeg}
CACHE=$OUT/cache
mkdir -p "$OUT"
run() {  # run NAME ARGS...: one CLI run, logged, skipped when already finished
  local name=$1; shift
  [ -f "$OUT/$name/metrics.json" ] && { echo "skip $name"; return; }
  echo "=== $name $(date +%T)"
  python -m sweep run --dataset "$DATA" --model wrn-16-1 --cache "$CACHE" "$@" \
      --out "$OUT/$name" > "$OUT/$name.log" 2>&1 || echo "FAILED $name (see $OUT/$name.log)"
  tail -1 "$OUT/$name.log"
}
B12="--attack badnets --set train.epochs=12"
B4="--attack blend --set train.epochs=4"
run badnets12 $B12
run badnets12-ft   $B12 --defense ft  --set defense.epochs=10
run badnets12-nba  $B12 --defense nba --set defense.epochs=10 --set defense.pgd_steps=5
run blend4-ft      $B4  --defense ft  --set defense.epochs=10
run blend4-nba     $B4  --defense nba --set defense.epochs=10 --set defense.pgd_steps=5
run badnets12-nad  $B12 --defense nad --set defense.epochs=10
run blend4-nad     $B4  --defense nad --set defense.epochs=10
run badnets12-fp   $B12 --defense fp  --set defense.epochs=5
run badnets12-argd $B12 --defense argd --set defense.epochs=10

#!/usr/bin/env bash
# The CPU-budget CIFAR-10 measurements behind the issue notes (attack table, NBA Table 2 layout,
# DLP/ABL). Resumable: attack stages come from the cache, finished defense runs are skipped.
# Usage: experiments/cpu_tables.sh [OUTDIR] [PART...]   parts: attacks defenses training others slice
# (ATK_BUDGET: 4 epochs are enough for Blend, ASR 100%, not for BadNets, ASR 8%: see "slice")
set -uo pipefail
OUT=${1:-runs/cpu}; shift || true
PARTS=${*:-attacks defenses training others}
DATA=${SWEEP_CIFAR:-imagefolder:../shared/data/cifar10-jpeg}
ATK_BUDGET=${ATK_BUDGET:-"--set train.epochs=4"}
CACHE=$OUT/cache
mkdir -p "$OUT"
run() {  # run NAME ARGS...: one CLI run, logged, skipped when already finished
  local name=$1; shift
  [ -f "$OUT/$name/metrics.json" ] && { echo "skip $name"; return; }
  echo "=== $name $(date +%T)"
  python -m sweep run --dataset "$DATA" --model wrn-16-1 --cache "$CACHE" $ATK_BUDGET "$@" \
      --out "$OUT/$name" > "$OUT/$name.log" 2>&1 || echo "FAILED $name (see $OUT/$name.log)"
  tail -1 "$OUT/$name.log"
}
declare -A DEF=(
  [ft]="--set defense.epochs=10"
  [fp]="--set defense.epochs=5"
  [mcr]="--set defense.epochs=10 --set defense.endpoint_epochs=5"
  [nad]="--set defense.epochs=10"
  [argd]="--set defense.epochs=10"
  [nba]="--set defense.epochs=10 --set defense.pgd_steps=5"
  [anp]="--set defense.iterations=300"
)
for part in $PARTS; do
  case $part in
    attacks)  for a in badnets blend sig; do run "$a" --attack $a; done ;;
    defenses) for a in badnets blend sig; do for d in ft nad argd nba fp mcr anp; do
                run "$a-$d" --attack $a --defense $d ${DEF[$d]}; done; done ;;
    training) for a in badnets sig; do
                run "$a-dlp" --attack $a --defense dlp --set defense.sl_epochs=4 --set defense.au_epochs=5 --set defense.assft_epochs=4
                run "$a-abl" --attack $a --defense abl --set defense.isolation_epochs=3 --set defense.finetune_epochs=3 --set defense.unlearn_epochs=5
              done ;;
    others)   for a in trojannn cla refool cheatkd; do run "$a" --attack $a; done ;;
    slice)    # a CPU-sized slice of NBA Table 2: BadNets at 12 epochs (the budget at which WRN-16-1
              # learns the corner trigger under crop + flip), Blend at 4, the main defenses on each
              B12="--attack badnets --set train.epochs=12"; B4="--attack blend --set train.epochs=4"
              run badnets12 $B12
              run badnets12-ft $B12 --defense ft ${DEF[ft]}
              run badnets12-nba $B12 --defense nba ${DEF[nba]}
              run blend4-ft $B4 --defense ft ${DEF[ft]}
              run blend4-nba $B4 --defense nba ${DEF[nba]}
              for d in nad fp argd; do run badnets12-$d $B12 --defense $d ${DEF[$d]}; done ;;
  esac
done

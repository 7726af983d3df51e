#!/usr/bin/env bash
# Rerun the experiments behind the README and docs/experiments.md, one group (folder of sim/) at a time,
# and print each group's comparison table (runs/report-GROUP.png holds its overlay plot).
# Usage: sim/reproduce.sh DATA_DIR [GROUP ...]     (DATA_DIR: a folder holding ml-100k/; default $P2PREC_DATA)
# Groups: topologies tracking spectral faults codecs privacy robust foundation async (default: all of them).
# Every spec is parsed before anything runs: one that no longer loads stops the script with its error.
# A figure measured at an older commit is reproduced at that commit (docs/experiments.md names it).
set -euo pipefail
cd "$(dirname "$0")/.."
all="topologies tracking spectral faults codecs privacy robust foundation async"
data="${1:-${P2PREC_DATA:-}}"
if [ -z "$data" ]; then
  echo "sim/reproduce.sh: give DATA_DIR or set \$P2PREC_DATA" >&2
  exit 2
fi
shift || true
groups="${*:-$all}"
bin=.venv/bin
for group in $groups; do
  if [ ! -d "sim/$group" ]; then
    echo "sim/reproduce.sh: no group '$group' (groups: $all)" >&2
    exit 2
  fi
  for spec in sim/"$group"/*.toml; do
    if ! "$bin/python" -c '
import sys
from p2prec.config import ConfigError, load
from p2prec.gossip.codecs import codec_from_config
try:
    codec_from_config(load(sys.argv[1]).gossip)
except ConfigError as exc:
    sys.exit(f"{exc}")' "$spec"; then
      echo "sim/reproduce.sh: $spec no longer parses; fix it before rerunning group '$group'" >&2
      exit 1
    fi
  done
done
for group in $groups; do
  runs=()
  for spec in sim/"$group"/*.toml; do
    out="runs/$group-$(basename "$spec" .toml)"
    "$bin/p2prec-sim" --config "$spec" --data-dir "$data" --out "$out"
    runs+=("$out")
  done
  "$bin/p2prec" report "${runs[@]}" --plot "runs/report-$group.png"
done

#!/usr/bin/env bash
# Re-run every experiment behind the README's results section and print its tables.
# Usage: sim/reproduce.sh [DATA_DIR] [a|b|c|d|e|f|g|h|i|j|k|l|m|n ...]   (default: $P2PREC_DATA or ../shared/data; all groups)
# Groups: a quality per topology, b consensus speed, c faults, d codecs, e local DP, f Byzantine nodes,
#         g gradient tracking, h what test NDCG@10 depends on (session 4), i learning rates (session 6),
#         j weighting gradients by samples (session 7), k one exchange per round (the issue-5 byte budget),
#         l a faster-mixing graph of the same degree (session 7), m gossip exchanges per round (session 8),
#         n the issue-5 byte budget at the default rank with int4 (sessions 9-10).
set -euo pipefail
cd "$(dirname "$0")/.."
data="${1:-${P2PREC_DATA:-../shared/data}}"
shift || true
groups="${*:-a b c d e f g h i j k l m n}"
for group in $groups; do
  for spec in sim/"$group"-*.toml; do
    name=$(basename "$spec" .toml)
    .venv/bin/p2prec-sim --config "$spec" --data-dir "$data" --out "runs/$name"
  done
  .venv/bin/p2prec report runs/"$group"-* --plot "runs/report-$group.png"
done

#!/usr/bin/env bash
# Start (or stop) one p2prec-node on each device named in a topology file, over ssh.
#
#   node/launch-lan.sh [--dry-run] start TOPOLOGY CONFIG [-- EXTRA p2prec-node ARGS]
#   node/launch-lan.sh [--dry-run] stop  TOPOLOGY
#
# Each node's host comes from its `address` attribute (tcp://HOST:PORT). Every device needs
# this repository at $P2PREC_REMOTE_DIR (default: p2prec, relative to the remote home) with
# its .venv installed and the data set in place ($P2PREC_DATA there, or data.dir in CONFIG).
# `start` copies TOPOLOGY and CONFIG to $P2PREC_REMOTE_DIR/lan/ on every device, so all
# nodes run the very same files, then starts `p2prec-node --id N` in the background there,
# writing lan/node-N.log and lan/node-N.pid. `stop` sends SIGTERM to that pid only: the node
# abandons its round, keeps its last checkpoint and exits; `start` again resumes it.
# Set P2PREC_SSH_USER to log in as another user.
set -euo pipefail

usage() { sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }

DRY=""
if [[ "${1:-}" == "--dry-run" ]]; then DRY=1; shift; fi
ACTION="${1:-}"; TOPOLOGY="${2:-}"
[[ "$ACTION" == "start" || "$ACTION" == "stop" ]] && [[ -n "$TOPOLOGY" ]] || usage
shift 2
CONFIG=""
if [[ "$ACTION" == "start" ]]; then
    CONFIG="${1:-}"; [[ -n "$CONFIG" ]] || usage; shift
    [[ "${1:-}" == "--" ]] && shift
fi
EXTRA=("$@")

HERE="$(cd "$(dirname "$0")/.." && pwd)"
PY="${P2PREC_PYTHON:-$HERE/.venv/bin/python}"
REMOTE_DIR="${P2PREC_REMOTE_DIR:-p2prec}"
SSH_USER="${P2PREC_SSH_USER:-$(id -un)}"

# "ID HOST" per node, read with the project's own topology reader (any supported format).
NODES="$("$PY" - "$TOPOLOGY" <<'PY'
import sys
from p2prec.topology import TopologyError, read
try:
    graph = read(sys.argv[1])
except TopologyError as exc:
    sys.exit(f"launch-lan: {exc}")
for node, address in sorted(graph.nodes(data="address")):
    if not address or "://" not in address:
        sys.exit(f"launch-lan: node {node} has no tcp://HOST:PORT address")
    print(node, address.split("://", 1)[1].rsplit(":", 1)[0].strip("[]"))
PY
)"

run() { if [[ -n "$DRY" ]]; then printf '%q ' "$@"; echo; else "$@" < /dev/null; fi; }

while read -r ID HOST; do
    TARGET="$SSH_USER@$HOST"
    if [[ "$ACTION" == "start" ]]; then
        ARGS="--config lan/$(basename "$CONFIG") --set gossip.topology=lan/$(basename "$TOPOLOGY") --id $ID"
        for arg in "${EXTRA[@]+"${EXTRA[@]}"}"; do ARGS+=" $(printf '%q' "$arg")"; done
        START="cd $REMOTE_DIR && OMP_NUM_THREADS=1 nohup .venv/bin/p2prec-node $ARGS"
        START+=" > lan/node-$ID.log 2>&1 < /dev/null & echo \$! > lan/node-$ID.pid"
        run ssh -n "$TARGET" "mkdir -p $REMOTE_DIR/lan"
        run scp -q "$TOPOLOGY" "$CONFIG" "$TARGET:$REMOTE_DIR/lan/"
        run ssh -n "$TARGET" "$START"
        echo "node $ID started on $HOST (log: $REMOTE_DIR/lan/node-$ID.log)"
    else
        STOP="cd $REMOTE_DIR && test -f lan/node-$ID.pid && kill -TERM \$(cat lan/node-$ID.pid)"
        STOP+=" && rm lan/node-$ID.pid || echo 'node $ID: not running'"
        run ssh -n "$TARGET" "$STOP"
        echo "node $ID on $HOST: SIGTERM sent"
    fi
done <<< "$NODES"

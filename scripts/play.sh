#!/usr/bin/env bash
# Play the example game (examples/village): does all set-up on a fresh machine (creates .venv,
# installs npc-voice with the `examples` extra: pygame), starts `npc-voice serve` in the background
# on 127.0.0.1, waits for its /health, runs the game against it, and stops the server on exit.
#
#   bash scripts/play.sh                      # the tiny built-in model (RANDOM weights: NPCs babble)
#   bash scripts/play.sh --weights DIR        # the real PersonaPlex weights
#   bash scripts/play.sh --no-mic             # other arguments go to the game (see --help there)
#
# Server options: --weights DIR, --device DEV, --port N (default: a free port); the rest go to
# examples/village/village.py. On a GPU machine set NPC_VOICE_CONSTRAINTS=/dev/null (see README).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
source "$ROOT/scripts/_venv.sh"
npc_voice_venv examples
PY="$VENV/bin/python"

serve_args=()
game_args=()
port=""
weights=""
while [ $# -gt 0 ]; do
    case "$1" in
        --weights|--device) serve_args+=("$1" "$2"); [ "$1" = --weights ] && weights="$2"; shift 2 ;;
        --weights=*|--device=*) serve_args+=("$1"); [[ "$1" = --weights=* ]] && weights="${1#*=}"; shift ;;
        --port) port="$2"; shift 2 ;;
        --port=*) port="${1#*=}"; shift ;;
        -h|--help) exec "$PY" examples/village/village.py --help ;;
        *) game_args+=("$1"); shift ;;
    esac
done
if [ -z "$port" ]; then
    port="$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
fi
if [ -z "$weights" ]; then
    echo "play.sh: no --weights: the server runs the TINY built-in model with RANDOM weights." >&2
    echo "play.sh: the NPCs will babble, not speak. Pass --weights DIR for the real PersonaPlex." >&2
fi
# a fresh shared secret for this run (the server does not need one on loopback; the game shows how to send it)
NPC_VOICE_TOKEN="$("$PY" -c 'import secrets; print(secrets.token_hex(16))')"
export NPC_VOICE_TOKEN

"$VENV/bin/npc-voice" serve --host 127.0.0.1 --port "$port" "${serve_args[@]}" &
server_pid=$!
stop_server() {
    if kill -0 "$server_pid" 2>/dev/null; then
        kill "$server_pid" 2>/dev/null || true
        wait "$server_pid" 2>/dev/null || true
    fi
}
trap stop_server EXIT
trap 'exit 130' INT TERM

echo "play.sh: waiting for the server on 127.0.0.1:$port ..." >&2
"$PY" - "$port" "$server_pid" <<'PYEOF'
import json, os, sys, time, urllib.request
port, pid = sys.argv[1], int(sys.argv[2])
deadline = time.monotonic() + 600  # real weights take a while to load
while time.monotonic() < deadline:
    try:
        os.kill(pid, 0)
    except OSError:
        sys.exit("play.sh: the server exited before it was ready (see its messages above)")
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
            h = json.load(r)
            print(f"play.sh: server ready: model {h['model']} ({h['weights']} weights) on {h['device']}", file=sys.stderr)
            sys.exit(0)
    except OSError:
        time.sleep(0.5)
sys.exit("play.sh: the server did not answer /health in 600 s")
PYEOF

"$PY" examples/village/village.py --server "ws://127.0.0.1:$port" "${game_args[@]}"

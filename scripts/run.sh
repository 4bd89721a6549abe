#!/usr/bin/env bash
# Run the main job. Does all set-up on a fresh machine: creates .venv, installs npc-voice, then
# starts `npc-voice bench` (extra arguments are passed to it, e.g. --weights DIR).
# On a GPU machine set NPC_VOICE_CONSTRAINTS=/dev/null to let pip choose a CUDA build of torch.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
source "$ROOT/scripts/_venv.sh"
npc_voice_venv
exec "$VENV/bin/npc-voice" bench "$@"

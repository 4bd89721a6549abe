# Sourced by scripts/test.sh and scripts/run.sh: create .venv and install npc-voice into it.
# Idempotent: re-installs only when pyproject.toml / constraints changed since the last install.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${NPC_VOICE_VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3}"
EXTRAS="${1:-}"
CONSTRAINTS="${NPC_VOICE_CONSTRAINTS:-$ROOT/constraints-cpu.txt}"

if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
stamp="$VENV/.npc-voice-installed${EXTRAS:+-$EXTRAS}"
want="$(cat "$ROOT/pyproject.toml" "$CONSTRAINTS" 2>/dev/null | sha256sum | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    spec="$ROOT${EXTRAS:+[$EXTRAS]}"
    cargs=()
    if [ -f "$CONSTRAINTS" ]; then cargs=(-c "$CONSTRAINTS"); fi
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "${cargs[@]}" -e "$spec"
    echo "$want" > "$stamp"
fi

# Sourced by scripts/test.sh and scripts/run.sh. `npc_voice_venv [EXTRAS]` creates .venv (or
# $NPC_VOICE_VENV) and installs npc-voice into it, editable, with the given extras (e.g. "test").
# Idempotent and fast: re-installs only when pyproject.toml or the constraints file changed.
# torch is pinned by constraints-cpu.txt (the CPU build); NPC_VOICE_CONSTRAINTS=/dev/null lifts it.
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${NPC_VOICE_VENV:-$ROOT/.venv}"

npc_voice_venv() {
    local extras="${1:-}"
    local python="${PYTHON:-python3}"
    local constraints="${NPC_VOICE_CONSTRAINTS:-$ROOT/constraints-cpu.txt}"
    if [ ! -x "$VENV/bin/python" ]; then
        "$python" -m venv "$VENV"
    fi
    local stamp="$VENV/.npc-voice-installed${extras:+-$extras}"
    local want
    want="$(cat "$ROOT/pyproject.toml" "$constraints" 2>/dev/null | sha256sum | cut -d' ' -f1)"
    if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
        local cargs=()
        if [ -f "$constraints" ]; then cargs=(-c "$constraints"); fi
        "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "${cargs[@]}" \
            -e "$ROOT${extras:+[$extras]}"
        echo "$want" > "$stamp"
    fi
}

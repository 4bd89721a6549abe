"""npc_voice/serve/config.py: the bind policy (loopback is open, anything else needs a long token),
and `npc-voice serve` refusing a public bind without one."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from npc_voice.serve import check_bind


def test_public_bind_needs_a_token() -> None:
    check_bind("127.0.0.1", None)
    check_bind("::1", None)
    check_bind("localhost", None)
    for host in ("0.0.0.0", "192.0.2.7", "::", "game-server.local"):
        with pytest.raises(ValueError, match="token"):
            check_bind(host, None)
        with pytest.raises(ValueError, match="at least 16"):
            check_bind(host, "short")
        check_bind(host, "a-long-enough-shared-secret")
    # the command refuses before it loads anything
    proc = subprocess.run([sys.executable, "-m", "npc_voice.cli", "serve", "--host", "0.0.0.0", "--port", "0"],
                          capture_output=True, text=True, timeout=60, env=os.environ | {"NPC_VOICE_TOKEN": ""})
    assert proc.returncode == 2 and "without a token" in proc.stderr

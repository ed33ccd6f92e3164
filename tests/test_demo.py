"""The README's demo command runs the real pipeline and shows the cache miss after a purge."""

from __future__ import annotations

import subprocess
import sys

from tests.support import requires_ats, requires_varnish


@requires_ats
@requires_varnish
def test_demo_exits_0_and_shows_the_page_missed_after_the_purge() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "purged.demo"],
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}"
    lines = result.stdout.splitlines()
    fetches = [line for line in lines if "GET https://" in line]
    purges = [i for i, line in enumerate(lines) if "PURGE /wiki/" in line]
    assert len(fetches) == 3, result.stdout
    assert "Varnish MISS" in fetches[0]
    assert "Varnish HIT" in fetches[1]
    # The third fetch, after both PURGEs: a miss in both caches, served by the origin again.
    assert "Varnish MISS, Traffic Server MISS, the origin served it (request #2)" in fetches[2]
    assert len(purges) == 2
    assert "backend" in lines[purges[0]] and "-> 200" in lines[purges[0]]
    assert "frontend" in lines[purges[1]] and "-> 200" in lines[purges[1]]
    assert lines.index(fetches[2]) > purges[1]
    assert "exit status 0" in result.stdout

"""A tiny origin web server for the caches under test.

The implementation lives in ``purged.embedded.origin`` (the demo uses it too): 200 for any
path, ``Cache-Control: max-age=3600``, every request recorded as ``(method, host, path)``.
"""

from __future__ import annotations

from purged.embedded.origin import Origin, OriginRequest

__all__ = ["Origin", "OriginRequest"]

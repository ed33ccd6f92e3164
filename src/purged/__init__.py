"""purged: a cache-purge daemon for CDNs (Kafka and HTCP in, HTTP PURGE out)."""

__version__ = "1.0.0"

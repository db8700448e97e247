"""The reservation engine: decisions and state, with no knowledge of gRPC or Postgres.

Adapters (the gRPC edge, the write-ahead log, recovery) depend on this package; it never
imports them.
"""

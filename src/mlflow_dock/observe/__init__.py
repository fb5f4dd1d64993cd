"""Seeing what happened: log context and JSON log lines, Prometheus metrics.

`context` is a leaf (imports nothing of ours), so intake and jobs can set log context;
`metrics` reads the job store, so only the composition root and the HTTP layer import it.
"""

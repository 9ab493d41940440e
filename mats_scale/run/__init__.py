"""Run-directory services: checkpoints, run files and provenance, the lock, the log, preflight checks
and fault injection (docs/distributed.md)."""

"""The job on a run directory: search, retrain and report, and the CLI that runs it (deploy/ exports)."""

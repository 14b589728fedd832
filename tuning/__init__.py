"""Search, retrain, export and report: everything that runs on a run directory."""

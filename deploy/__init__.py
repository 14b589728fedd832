"""Deployment: export a run's trained model, score each artifact on its own runtime, predict."""

"""Pieces every layer may import: user errors, atomic file writes, paths, library shims."""

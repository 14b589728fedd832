"""The HyperModel: backbone registry, search space, schedules and model building."""

"""How many CPUs this process may run on."""

import os


def usable_cpus():
    """The CPUs this process may run on: its affinity mask where the OS keeps one (`taskset`,
    Slurm's and Kubernetes' CPU sets, the test suite's workers), else every CPU. TensorFlow
    sizes its thread pools the same way."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS and Windows keep no affinity mask
        return os.cpu_count() or 1

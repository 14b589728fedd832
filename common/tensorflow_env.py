"""TensorFlow's process-wide settings, read once when it is imported.

Import this module before anything imports `tensorflow` or `keras`: the CLI, the test
suite and the in-process benchmarks do. Settings already in the environment win, and
child processes (local workers, latency timers) inherit them.
"""

import os

# TensorFlow's C++ logs (CUDA probing, oneDNN notes) would bury the tool's own lines.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# TensorFlow turns its oneDNN kernels on by default only on CPUs with AVX-512 VNNI, BF16
# or AMX. On an AVX2-only CPU they run a MobileNetV2 prefix pass 2.2× faster and training
# steps 1.1–1.5× faster (benchmarks/RESULTS.md §9).
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")

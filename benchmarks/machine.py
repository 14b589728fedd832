"""What every benchmark records about the machine it ran on (figures differ ~2.6× between CPUs)."""

import os
import platform
from pathlib import Path

FLAGS_OF_INTEREST = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16")


def cpu_description():
    """{"model", "cores", "flags"}: `model name` and the SIMD flags of /proc/cpuinfo."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")),
                 platform.processor())
    words = set(info.split())
    return {"model": model, "cores": os.cpu_count(), "flags": sorted(w for w in words if w in FLAGS_OF_INTEREST)}

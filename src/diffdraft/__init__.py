"""diffdraft: lossless speculative decoding with diffusion drafters.

Public API: load(), Pipeline, the config dataclasses, and DiffdraftError.
"""

# OpenMP's wait policy is left at libgomp's default: a thread spins briefly after each parallel
# region, then sleeps. A forward of the lean runtime opens ~180 small parallel regions, and forcing
# OMP_WAIT_POLICY=PASSIVE (every wait a sleep) made a SmolLM2 step 56 ms instead of 35 ms at 2 threads
# on the 2-core development machine. On a machine whose cores other processes hold, spinning threads
# crawl instead: there use one thread (`threads=1`, `--threads 1`) or set OMP_WAIT_POLICY=PASSIVE.

import importlib

# Exported names and where they live. They are imported on first use, not with the package, so that
# `diffdraft` the command (diffdraft.entry) starts without torch and can be interrupted cleanly.
_EXPORTS = {
    "Answer": "diffdraft.api", "DLLMPipeline": "diffdraft.api", "Pipeline": "diffdraft.api", "load": "diffdraft.api",
    "load_dllm_pipeline": "diffdraft.api", "DraftConfig": "diffdraft.config", "SamplingConfig": "diffdraft.config",
    "DiffdraftError": "diffdraft.errors",
}
__all__ = list(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value  # later lookups skip this function
        return value
    raise AttributeError(f"module 'diffdraft' has no attribute {name!r}")

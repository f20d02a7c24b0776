"""diffdraft: lossless speculative decoding with diffusion drafters.

Public API: load(), Pipeline, the config dataclasses, and DiffdraftError.
"""

# OpenMP's wait policy is left at libgomp's default: a thread spins briefly after each parallel
# region, then sleeps. A forward of the lean runtime opens ~180 small parallel regions, and forcing
# OMP_WAIT_POLICY=PASSIVE (every wait a sleep) made a SmolLM2 step 56 ms instead of 35 ms at 2 threads
# on the 2-core development machine. On a machine whose cores other processes hold, spinning threads
# crawl instead: there use one thread (`threads=1`, `--threads 1`) or set OMP_WAIT_POLICY=PASSIVE.

from diffdraft.api import Answer, DLLMPipeline, Pipeline, load, load_dllm_pipeline
from diffdraft.config import DraftConfig, SamplingConfig
from diffdraft.errors import DiffdraftError

__all__ = ["Answer", "DLLMPipeline", "Pipeline", "load", "load_dllm_pipeline", "DraftConfig", "SamplingConfig", "DiffdraftError"]
__version__ = "0.1.0"

"""diffdraft: lossless speculative decoding with diffusion drafters.

Public API: load(), Pipeline, the config dataclasses, and DiffdraftError.
"""

import os

# OpenMP threads that spin while waiting make every small forward crawl when another process
# holds a core (seen here: 0.8 tok/s spinning vs 8.9 passive with 2 threads on 2 busy cores).
# Set before torch is imported; a value the user set wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from diffdraft.api import Answer, DLLMPipeline, Pipeline, load, load_dllm_pipeline
from diffdraft.config import DraftConfig, SamplingConfig
from diffdraft.errors import DiffdraftError

__all__ = ["Answer", "DLLMPipeline", "Pipeline", "load", "load_dllm_pipeline", "DraftConfig", "SamplingConfig", "DiffdraftError"]
__version__ = "0.1.0"

"""diffdraft: lossless speculative decoding with diffusion drafters.

Public API: load(), Pipeline, the config dataclasses, and DiffdraftError.
"""

from diffdraft.api import Answer, Pipeline, load
from diffdraft.config import DraftConfig, SamplingConfig
from diffdraft.errors import DiffdraftError

__all__ = ["Answer", "Pipeline", "load", "DraftConfig", "SamplingConfig", "DiffdraftError"]
__version__ = "0.1.0"

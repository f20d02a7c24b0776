"""Speculation inside a diffusion LM (docs/design.md, 'Diffusion-LM targets and SimSD'): a block-diffusion target and SimSD.

  model.py       BlockDiffusionLM: an HF Llama under explicit attention masks, + LoRA and MASK
  lora.py        low-rank adapters on the Llama projections (the base is never modified)
  cache.py       KV cache of finished tokens (prompt, finished blocks)
  masks.py       pure mask builders: prompt, decoding step, training pass, SimSD layout
  unmask.py      the confidence-ordered unmasking rule and the exact law of a one-slot step
  decode.py      Session / BlockState and the model's own blockwise decoding (the baseline)
  drafter.py     the dLLM drafter: a cheaper block-diffusion model drafting steps of a block
  simsd.py       SimSD: one verification forward, acceptance in reveal order, its decoder
  checkpoint.py  adapters + mask embedding on disk (safetensors + JSON), refused when damaged
  train.py       the conversion fine-tune (and drafter training) behind `diffdraft dllm-train`
  loading.py     --dllm / --dllm-drafter choices (folder, b4/b8 shipped, untrained base, first N layers) -> models
  runner.py      DLLMRunner: own decoding or SimSD, seeded runs, Stats for `generate` and `bench`

At temperature 0, SimSD's output is token-identical to the target's own greedy
decoding with the same steps per block, for any drafter (see simsd.py for the argument).
"""

from diffdraft.dllm.checkpoint import load_dllm, save_dllm
from diffdraft.dllm.decode import DLLMResult, decode
from diffdraft.dllm.drafter import DLLMDrafter
from diffdraft.dllm.model import MASK_ID, BlockDiffusionLM, DLLMConfig
from diffdraft.dllm.simsd import decode_simsd

__all__ = [
    "MASK_ID",
    "BlockDiffusionLM",
    "DLLMConfig",
    "DLLMDrafter",
    "DLLMResult",
    "decode",
    "decode_simsd",
    "load_dllm",
    "save_dllm",
]

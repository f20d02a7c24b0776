"""SimSD on the real SmolLM2-135M-Instruct (float32) and real MT-Bench prompts.

The temperature-0 statement of simsd.py holds for any weights, so it is checked on the
shipped conversion when one is in the package (src/diffdraft/weights/smollm2-dllm-b*),
and otherwise on the unconverted model with zero-update adapters and a random mask
embedding: SimSD's greedy tokens must equal the model's own greedy blockwise decoding,
for blocks of 4 and 8 decoded one slot per step. Drafters: the first 4 layers (mostly
rejected) and the target itself (everything accepted, so the filled-block cache path runs).
"""

from __future__ import annotations

import pytest
import torch

from diffdraft.suites import load_suite
from diffdraft.dllm.checkpoint import load_dllm, shipped_folder
from diffdraft.dllm.decode import decode
from diffdraft.dllm.drafter import DLLMDrafter
from diffdraft.dllm.model import BlockDiffusionLM, DLLMConfig
from diffdraft.dllm.simsd import decode_simsd
from diffdraft.backends import build_target
from diffdraft.target import TargetBackend
from test_real_smollm2 import real_target  # noqa: F401  (the shared module-scoped real target)

pytestmark = pytest.mark.real

NEW_TOKENS = 32


@pytest.fixture(scope="module")
def prompts(real_target) -> list[list[int]]:
    return [real_target.encode_chat([{"role": "user", "content": p.turns[0]}]) for p in load_suite("mt-bench", limit=2)]


def dllm(real_target: TargetBackend, block_size: int, drafter: bool = False, layers: int | None = None) -> BlockDiffusionLM:
    folder = shipped_folder(block_size, drafter)
    if (folder / "drafter.json").is_file():
        return load_dllm(folder, real_target)
    net = BlockDiffusionLM(real_target.module, DLLMConfig(block_size=block_size, num_layers=layers))
    net.reset_parameters(torch.Generator().manual_seed(0))  # B = 0: the base model's own weights
    with torch.no_grad():
        net.mask_embedding.normal_(0.0, 0.05, generator=torch.Generator().manual_seed(1))
    return net.eval().requires_grad_(False)


@pytest.mark.parametrize("block_size", [4, 8])
def test_simsd_greedy_equals_own_greedy_decoding(real_target, prompts, block_size):
    target = dllm(real_target, block_size)
    shallow = DLLMDrafter(dllm(real_target, block_size, drafter=True, layers=4))
    eos = real_target.eos_token_ids
    for index, prompt in enumerate(prompts):
        expected = decode(target, prompt, block_size, NEW_TOKENS, eos_ids=eos)
        assert len(expected.tokens) > 0
        result = decode_simsd(target, shallow, prompt, block_size, NEW_TOKENS, eos_ids=eos)
        assert result.tokens == expected.tokens
        if index == 0:
            oracle = decode_simsd(target, DLLMDrafter(target), prompt, block_size, NEW_TOKENS, eos_ids=eos)
            assert oracle.tokens == expected.tokens
            assert sum(oracle.accepted) > 0 and oracle.forwards < expected.forwards

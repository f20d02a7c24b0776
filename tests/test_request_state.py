"""Per-request state lives apart from the loaded weights: requests on one loaded decoder do not touch
each other.

Each case loads one target and one drafter, then answers request A alone, and again while
request B runs on the same decoder (1) nested inside A's stream, after A's first steps, and
(2) in another thread at the same time. A's tokens and its per-step record (drafted and
accepted counts) must be exactly those of A alone. Sampling at T=1 makes the drafts matter:
a drafter whose context another request overwrote proposes other tokens, and the accepted
counts and the sampled tokens change; a target whose KV cache another request overwrote
changes the logits themselves. Both backends, every drafter kind that keeps a context
(early exit, block diffusion in both layouts, masked diffusion, the warm-up handoff), and the
dLLM path. Before the state moved out of the loaded objects the nested runs failed here.
"""

from __future__ import annotations

import threading

import pytest
import torch

from conftest import make_llama, make_tokenizer
from diffdraft.backends import build_target
from diffdraft.config import DraftConfig, SamplingConfig
from diffdraft.decoding import DLLMDecoder, EngineDecoder
from diffdraft.dllm.drafter import DLLMDrafter
from diffdraft.dllm.runner import DLLMRunner
from diffdraft.drafters import EarlyExitDrafter, HandoffDrafter, NgramDrafter
from diffdraft.drafters.block_diffusion import BlockDiffusionDrafter
from diffdraft.drafters.masked_diffusion import MaskedDiffusionDrafter
from diffdraft.models.block_diffusion import BlockDiffusionConfig, BlockDiffusionNet
from diffdraft.models.masked_diffusion import MaskedDiffusionConfig, MaskedDiffusionNet
from diffdraft.train.tasks import layer_shape
from test_dllm_model import converted

PROMPT_A = [5, 9, 33, 100, 7, 5, 9, 33]
PROMPT_B = [200, 17, 64, 3, 3, 150]
MAX_NEW = 40
G = 4
SAMPLING = SamplingConfig(temperature=1.0)


@pytest.fixture(scope="module")
def model():
    return make_llama(init_range=0.2)


def block_diffusion(target, dflash: bool) -> BlockDiffusionDrafter:
    hf = target.module.config
    cfg = BlockDiffusionConfig(
        hidden_size=target.hidden_size, num_taps=2, num_layers=1, num_heads=hf.num_attention_heads,
        num_kv_heads=hf.num_key_value_heads, head_dim=target.hidden_size // hf.num_attention_heads,
        intermediate_size=hf.intermediate_size, block_size=G,
        **({"qk_norm": True, "mask_token_id": 3} if dflash else {}),
    )
    net = BlockDiffusionNet(cfg)
    net.reset_parameters(torch.Generator().manual_seed(0))
    return BlockDiffusionDrafter(target, net, (1, 3))


def masked_diffusion(target) -> MaskedDiffusionDrafter:
    net = MaskedDiffusionNet(MaskedDiffusionConfig(num_layers=1, block_size=G, **layer_shape(target)))
    net.reset_parameters(torch.Generator().manual_seed(0))
    net.init_from_target(target.module)
    return MaskedDiffusionDrafter(target, net)


def drafter_for(kind: str, target):
    return {
        "none": lambda: None,
        "ngram": NgramDrafter,
        "early-exit": lambda: EarlyExitDrafter(target, num_layers=1),
        "block-diffusion": lambda: block_diffusion(target, dflash=False),
        "dflash": lambda: block_diffusion(target, dflash=True),
        "masked-diffusion": lambda: masked_diffusion(target),
        "handoff": lambda: HandoffDrafter(NgramDrafter(), masked_diffusion(target), warmup_tokens=6),
    }[kind]()


def record(run) -> tuple:
    """What must not change: the tokens, why it stopped, and every step's drafted and accepted counts."""
    return run.tokens, run.stop_reason, run.stats.proposed, run.stats.accepted


def answer(decoder, prompt, seed, on_tokens=None):
    return decoder.run(prompt, MAX_NEW, SAMPLING, seed, on_tokens=on_tokens)


def check_requests_apart(decoder) -> None:
    alone_a, alone_b = record(answer(decoder, PROMPT_A, 1)), record(answer(decoder, PROMPT_B, 2))
    assert len(alone_a[0]) > 8  # long enough for B to land in the middle of A

    # (1) B runs whole inside A's stream, after A's second chunk of tokens
    inner = []

    def run_b_inside(tokens):
        inner.append(tokens)
        if len(inner) == 2:
            inner.append(record(answer(decoder, PROMPT_B, 2)))

    nested_a = record(answer(decoder, PROMPT_A, 1, on_tokens=run_b_inside))
    assert inner[2] == alone_b
    assert nested_a == alone_a

    # (2) A and B in two threads at once, many times over
    for _ in range(3):
        results = {}
        threads = [threading.Thread(target=lambda key, p, s: results.__setitem__(key, record(answer(decoder, p, s))),
                                    args=(key, prompt, seed))
                   for key, prompt, seed in (("a", PROMPT_A, 1), ("b", PROMPT_B, 2))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert results == {"a": alone_a, "b": alone_b}


@pytest.mark.parametrize("backend", ["lean", "hf"])
@pytest.mark.parametrize("kind", ["none", "early-exit", "block-diffusion", "dflash", "masked-diffusion", "handoff"])
def test_requests_on_one_loaded_decoder_stay_apart(model, backend, kind):
    target = build_target(model, make_tokenizer(), backend=backend, tap_layers=(1, 2, 3))
    drafter = drafter_for(kind, target)
    verify = "rejection" if drafter is not None and drafter.states_q else "point-mass"
    decoder = EngineDecoder(kind, target, drafter, DraftConfig(draft_len=G - 1, length="fixed", verify=verify))
    check_requests_apart(decoder)


@pytest.mark.parametrize("with_drafter", [False, True])
def test_dllm_requests_stay_apart(model, with_drafter):
    net = converted(model, 4, seed=1)
    drafter = DLLMDrafter(converted(model, 4, num_layers=2, seed=2, adapter_std=0.3)) if with_drafter else None
    check_requests_apart(DLLMDecoder(DLLMRunner(net, drafter, steps=4)))

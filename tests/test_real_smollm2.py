"""The real default target, SmolLM2-135M-Instruct in float32, on real MT-Bench prompts.

Greedy speculative decoding with the n-gram, the early-exit (4 layers), the shipped
block-diffusion and a standalone masked-diffusion drafter (every decoding option at once)
must be token-identical to plain decoding of the same engine, 128 new tokens per prompt. The model
is loaded once per module (the first load ever converts the GGUF, ~25 s; later loads read
the cached safetensors). Plain outputs are computed once and shared. Budget on the 2-core
CPU: plain ~14 tok/s, early exit with g = 3 ~7 tok/s, so the file takes about 2 minutes.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from diffdraft.suites import load_suite
from diffdraft.config import DraftConfig
from diffdraft.drafters import EarlyExitDrafter, NgramDrafter, build_drafter
from diffdraft.engine import SpeculativeEngine
from diffdraft.loading import load_model
from diffdraft.backends import build_target
from diffdraft.target import TargetBackend

pytestmark = pytest.mark.real

NEW_TOKENS = 128
NUM_PROMPTS = 3  # n-gram and plain
NUM_PROMPTS_EARLY_EXIT = 2


@pytest.fixture(scope="module")
def real_target() -> TargetBackend:
    model, tokenizer = load_model(dtype="float32")
    return build_target(model, tokenizer, name="smollm2")


@pytest.fixture(scope="module")
def prompts(real_target) -> list[list[int]]:
    suite = load_suite("mt-bench", limit=NUM_PROMPTS)
    assert len({p.category for p in suite}) == NUM_PROMPTS  # one per category, round robin
    return [real_target.encode_chat([{"role": "user", "content": p.turns[0]}]) for p in suite]


@pytest.fixture(scope="module")
def plain_outputs(real_target, prompts) -> list[list[int]]:
    outputs = []
    for prompt in prompts:
        result = SpeculativeEngine(real_target, None).generate(prompt, max_new_tokens=NEW_TOKENS)
        assert result.stats.tau == 1.0
        outputs.append(result.tokens)
    # MT-Bench answers are long: the comparison covers the full 128 tokens
    assert all(len(tokens) == NEW_TOKENS for tokens in outputs), [len(t) for t in outputs]
    return outputs


def first_difference(a: list[int], b: list[int]) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None if len(a) == len(b) else min(len(a), len(b)))


def test_target_shape(real_target):
    assert (real_target.num_layers, real_target.hidden_size, real_target.vocab_size) == (30, 576, 49152)
    assert real_target.eos_token_ids  # the chat end token is known


def test_ngram_greedy_equals_plain(real_target, prompts, plain_outputs):
    accepted = 0
    for prompt, expected in zip(prompts, plain_outputs):
        result = SpeculativeEngine(real_target, NgramDrafter(), DraftConfig(draft_len=8)).generate(
            prompt, max_new_tokens=NEW_TOKENS
        )
        assert result.tokens == expected, f"first difference at token {first_difference(result.tokens, expected)}"
        assert sum(result.stats.emitted) + 1 == len(result.tokens)
        accepted += sum(result.stats.accepted)
    assert accepted > 0  # the drafter got tokens accepted, so the speculative path was taken


def test_early_exit_greedy_equals_plain(real_target, prompts, plain_outputs):
    """Fixed length: every step drafts (the length rule would rightly skip this weak drafter on most steps)."""
    drafter = EarlyExitDrafter(real_target, num_layers=4)
    accepted = 0
    for prompt, expected in list(zip(prompts, plain_outputs))[:NUM_PROMPTS_EARLY_EXIT]:
        result = SpeculativeEngine(real_target, drafter, DraftConfig(draft_len=3, length="fixed")).generate(
            prompt, max_new_tokens=NEW_TOKENS
        )
        assert result.tokens == expected, f"first difference at token {first_difference(result.tokens, expected)}"
        assert sum(result.stats.emitted) + 1 == len(result.tokens)
        accepted += sum(result.stats.accepted)
    assert accepted > 0


def test_shipped_block_diffusion_drafter_greedy_equals_plain(real_target, prompts, plain_outputs):
    """The trained drafter shipped in the package loads against the real target and is lossless."""
    drafter = build_drafter("block-diffusion", real_target)
    accepted = 0
    for prompt, expected in zip(prompts, plain_outputs):
        result = SpeculativeEngine(real_target, drafter, DraftConfig(draft_len=4)).generate(
            prompt, max_new_tokens=NEW_TOKENS
        )
        assert result.tokens == expected, f"first difference at token {first_difference(result.tokens, expected)}"
        accepted += sum(result.stats.accepted)
    assert accepted > 0


def test_masked_diffusion_drafter_greedy_equals_plain(real_target, prompts, plain_outputs, tmp_path):
    """A standalone drafter (the target's first 2 layers, untrained MASK) through a folder with
    every decoding option: confidence order, self-selection over T in {1, 2}, n-gram warm-up."""
    import torch

    from diffdraft.drafters import HandoffDrafter
    from diffdraft.drafters.block_diffusion import target_signature
    from diffdraft.drafters.masked_diffusion import save_masked_drafter
    from diffdraft.models.masked_diffusion import MaskedDiffusionConfig, MaskedDiffusionNet
    from diffdraft.train.tasks import layer_shape

    net = MaskedDiffusionNet(MaskedDiffusionConfig(num_layers=2, block_size=8, **layer_shape(real_target)))
    net.reset_parameters(torch.Generator().manual_seed(0))
    net.init_from_target(real_target.module)
    save_masked_drafter(tmp_path / "md", net, target_signature(real_target))
    drafter = build_drafter(f"{tmp_path / 'md'}:order=confidence:select=1,2:warmup=8", real_target)
    assert isinstance(drafter, HandoffDrafter)
    prompt, expected = prompts[0], plain_outputs[0]
    result = SpeculativeEngine(real_target, drafter, DraftConfig(draft_len=4)).generate(prompt, max_new_tokens=NEW_TOKENS)
    assert result.tokens == expected, f"first difference at token {first_difference(result.tokens, expected)}"
    assert sum(result.stats.proposed) > 4 * 8  # the masked-diffusion drafter drafted past the warm-up


def test_cli_generate_on_the_real_model():
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(
        [sys.executable, "-m", "diffdraft.cli", "generate", "Name three rivers in Europe.", "--max-new-tokens", "16"],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert len(done.stdout.strip()) > 0
    assert "Traceback" not in done.stderr
    stats_lines = [line for line in done.stderr.splitlines() if "tau" in line]
    # the default drafter on SmolLM2 is the shipped block-diffusion one, with the cost-aware length
    assert len(stats_lines) == 1 and "16 tokens" in stats_lines[0], done.stderr
    assert "[auto: block-diffusion, g=15; lean, native weights]" in stats_lines[0], done.stderr
    assert "verified lengths" in stats_lines[0] and "weights: native from" in done.stderr, done.stderr


def test_serve_answers_like_generate_on_the_real_model(tmp_path):
    """`diffdraft serve` as a user starts it, asked through the openai client at temperature 0, answers
    exactly what `diffdraft generate` prints (the same default drafter)."""
    import socket
    import time
    import urllib.request

    import openai

    env = dict(os.environ, OMP_NUM_THREADS="1")
    prompt = "Name three rivers in Europe."
    generated = subprocess.run([sys.executable, "-m", "diffdraft.cli", "generate", prompt, "--max-new-tokens", "16",
                                "--threads", "1"], capture_output=True, text=True, env=env, timeout=300)
    assert generated.returncode == 0, generated.stderr
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = (tmp_path / "server.log").open("w")
    server = subprocess.Popen([sys.executable, "-m", "diffdraft.cli", "serve", "--port", str(port), "--threads", "1"],
                              stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 300
        while True:
            assert server.poll() is None and time.monotonic() < deadline, (tmp_path / "server.log").read_text()
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                time.sleep(0.5)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
        answer = client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": prompt}],
                                                max_tokens=16, temperature=0)
        assert answer.choices[0].message.content + "\n" == generated.stdout
        assert answer.usage.completion_tokens == 16
        assert answer.model_extra["diffdraft"]["decoder"] == "auto: block-diffusion"
        # log probabilities: at T = 0 each emitted token is the best of the distribution reported for it
        scored = client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": prompt}],
                                                max_tokens=16, temperature=0, logprobs=True, top_logprobs=2)
        content = scored.choices[0].logprobs.content
        assert scored.choices[0].message.content == answer.choices[0].message.content and len(content) == 16
        assert b"".join(bytes(e.bytes) for e in content).decode() == scored.choices[0].message.content
        assert all(e.logprob <= 0 and e.top_logprobs[0].logprob == e.logprob and e.top_logprobs[0].token == e.token
                   for e in content)
    finally:
        server.terminate()
        server.wait(30)


def test_lean_verify_forwards_are_bit_identical_on_the_real_model(real_target, prompts):
    """On SmolLM2 in float32 on the CPU, a forward over k tokens computes exactly what k one-token
    forwards do, for every k up to 16, and stays within 1e-3 of the HF path's logits."""
    import torch

    from diffdraft.backends import HFTarget

    assert real_target.kind == "lean" and real_target.row_invariant
    prompt = torch.tensor([prompts[0]])
    context = prompt.shape[1] - 16
    ones = []
    state = real_target.new_state()
    real_target.prefill(state, prompt[:, :context])
    for i in range(16):
        ones.append(real_target.forward(state, prompt[:, context + i : context + i + 1]).logits)
    ones = torch.cat(ones, dim=1)  # [1, 16, V]
    for k in (2, 3, 4, 8, 16):
        real_target.crop(state, context)
        batched = real_target.forward(state, prompt[:, context : context + k]).logits
        assert torch.equal(batched, ones[:, :k]), f"k = {k}"
    hf = HFTarget(real_target.module, real_target.tokenizer)
    on_hf = hf.new_state()
    hf.prefill(on_hf, prompt[:, :context])
    torch.testing.assert_close(hf.forward(on_hf, prompt[:, context:]).logits, ones, rtol=0, atol=1e-3)


def test_the_real_gguf_maps_exactly_onto_the_dequantized_model(real_target):
    """Every 4-bit linear of the shipped SmolLM2 GGUF, read from its blocks, equals transformers' dequantized
    weight exactly (and, as the kernel holds it, within the bfloat16 rounding of scale and zero)."""
    import torch

    from diffdraft.backends.gguf_llama import MODULE_PATHS, read_native_linears
    from diffdraft.loading import default_gguf_path
    from test_native_weights import BF16_REL, kernel_weight

    module = real_target.module
    config = module.config
    native = read_native_linears(default_gguf_path(), config.num_hidden_layers, config.num_attention_heads,
                                 config.num_key_value_heads)
    assert set(native.paths) == {"Q4_1", "Q8_0", "F32"} and native.paths["Q4_1"].startswith("int4 kernel")
    for i, layer in enumerate(module.model.layers):
        for key, path in MODULE_PATHS.items():
            weight, dense = native.layers[i][key], layer.get_submodule(path).weight
            assert torch.equal(weight.dequantize(), dense), (i, key)
            if i % 10 == 0:
                bound = (weight.q.float() - 8).abs().amax() * weight.scale.abs().amax() + weight.zero.abs().amax()
                assert (kernel_weight(weight) - dense).abs().max() <= bound * BF16_REL


@pytest.fixture(scope="module")
def native_target(real_target) -> TargetBackend:
    from diffdraft.loading import default_gguf_path

    return build_target(real_target.module, real_target.tokenizer, name="smollm2", weights="native",
                        gguf=default_gguf_path(), report=lambda line: None)


def test_native_verify_forwards_are_bit_identical_on_the_real_model(native_target, prompts):
    """The GGUF's own 4-bit weights through the int4 kernel: a forward over k tokens computes exactly what k
    one-token forwards do, on SmolLM2."""
    import torch

    assert native_target.weights == "native" and native_target.row_invariant
    prompt = torch.tensor([prompts[1]])
    context = prompt.shape[1] - 16
    state = native_target.new_state()
    native_target.prefill(state, prompt[:, :context])
    ones = torch.cat([native_target.forward(state, prompt[:, context + i : context + i + 1]).logits
                      for i in range(16)], dim=1)  # [1, 16, V]
    for k in (2, 5, 8, 16):
        native_target.crop(state, context)
        assert torch.equal(native_target.forward(state, prompt[:, context : context + k]).logits, ones[:, :k]), k


def test_shipped_drafter_on_native_weights_greedy_equals_native_plain(native_target, prompts):
    drafter = build_drafter("block-diffusion", native_target)
    for prompt in prompts[:2]:
        plain = SpeculativeEngine(native_target, None).generate(prompt, max_new_tokens=NEW_TOKENS)
        result = SpeculativeEngine(native_target, drafter, DraftConfig(draft_len=15)).generate(
            prompt, max_new_tokens=NEW_TOKENS)
        assert result.tokens == plain.tokens, f"first difference at {first_difference(result.tokens, plain.tokens)}"
        assert sum(result.stats.accepted) > 0


def test_draft_trees_are_lossless_on_the_real_model(real_target, prompts, plain_outputs):
    """The shipped drafter's trees (12 nodes from its best 4 tokens per slot, verified in one row forward):
    greedy output equals plain decoding, and they accept more per step than its chain of 8 (one prompt)."""
    drafter = build_drafter("block-diffusion", real_target)
    accepted = {}
    for tree in (0, 12):
        accepted[tree] = 0
        for prompt, expected in zip(prompts[:1], plain_outputs[:1]):
            result = SpeculativeEngine(real_target, drafter, DraftConfig(draft_len=8, length="fixed", tree=tree)
                                       ).generate(prompt, max_new_tokens=NEW_TOKENS)
            assert result.tokens == expected, f"tree {tree}: first difference at {first_difference(result.tokens, expected)}"
            accepted[tree] += sum(result.stats.accepted)
    assert accepted[12] > accepted[0], accepted


def test_seeded_sampling_emits_plain_decodings_tokens_on_the_real_model(native_target, prompts):
    """T = 1, seeded: speculative decoding with point-mass verification (chain and tree) emits exactly the
    tokens of seeded plain decoding, with another request answered in between."""
    from diffdraft.config import SamplingConfig

    sampling = SamplingConfig(temperature=1.0)
    drafter = build_drafter("block-diffusion", native_target)
    for seed, prompt in enumerate(prompts[:1]):
        reference = SpeculativeEngine(native_target, None, sampling=sampling).generate(
            prompt, max_new_tokens=64, seed=seed).tokens
        for tree in (0, 8):
            engine = SpeculativeEngine(native_target, drafter, DraftConfig(draft_len=8, verify="point-mass",
                                                                           length="fixed", tree=tree), sampling)
            engine.generate(prompts[-1], max_new_tokens=8, seed=1234)  # another request first
            result = engine.generate(prompt, max_new_tokens=64, seed=seed)
            assert result.tokens == reference, f"tree {tree}, seed {seed}"
            assert sum(result.stats.accepted) > 0


def test_batched_requests_get_what_they_get_alone_on_the_real_model(native_target, prompts):
    """Continuous batching on SmolLM2's own 4-bit weights with the shipped drafter: three MT-Bench requests
    (different prompt lengths, one arriving two steps late), greedy and seeded T = 1 with point-mass
    verification, each get the tokens and log probabilities they get alone, bit for bit."""
    from diffdraft.batching import run_batched
    from diffdraft.config import SamplingConfig

    drafter = build_drafter("block-diffusion", native_target)
    for sampling, verify in ((SamplingConfig(), "auto"), (SamplingConfig(temperature=1.0), "point-mass")):
        engine = SpeculativeEngine(native_target, drafter, DraftConfig(draft_len=8, verify=verify), sampling)
        alone = [engine.generate(p, max_new_tokens=48, seed=i, logprobs=1) for i, p in enumerate(prompts)]
        begins = [lambda p=p, i=i: engine.begin(p, 48, i, 1) for i, p in enumerate(prompts)]
        together = {}
        for index, emitted, generation in run_batched(native_target, begins, 3, arrivals=[0, 0, 2]):
            if emitted is None:
                together[index] = generation.result()
        for i, expected in enumerate(alone):
            got = together[i]
            assert got.tokens == expected.tokens, f"T={sampling.temperature}, prompt {i}: first difference at " \
                                                  f"{first_difference(got.tokens, expected.tokens)}"
            assert [e.logprob for e in got.logprobs] == [e.logprob for e in expected.logprobs]

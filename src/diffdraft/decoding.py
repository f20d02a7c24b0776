"""The decoder interface: token ids in, tokens and Stats out. One interface for the API, the CLI,
the server and the bench.

A decoder answers one chat-templated prompt (token ids) with up to max_new_tokens tokens
under a SamplingConfig and a seed, streams the tokens to `on_tokens` as they are decided,
stops early when `should_stop` returns a reason (a cancelled request, a deadline), and
reports what it did as a Stats. Two kinds live here: the speculative engine with one drafter
(or none: plain decoding), and a dLLM target's own blockwise decoding or SimSD. Peers (HF
transformers, llama.cpp) live in bench.peers behind the same interface. Every decoder names
its reference: the decoder its speedup and its temperature-0 equality are measured against.

What a decoder holds is loaded once and shared by every request: weights, the drafter, the
length rule (its calibration carries across requests). What one request needs (the target's
KV cache, the drafter's context, the generator, the tokens so far) is made by run() and
dropped when it returns, so requests on one decoder never touch each other, nested or in
threads at once (tests/test_request_state.py). Knows nothing of text, prompt suites or HTTP.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from diffdraft.config import DraftConfig, SamplingConfig
from diffdraft.dllm.decode import DLLMResult
from diffdraft.dllm.runner import DLLMRunner, to_stats
from diffdraft.drafters.base import Drafter
from diffdraft.engine import Generation, SpeculativeEngine, length_policy, request_capacity
from diffdraft.errors import DiffdraftError
from diffdraft.logprobs import TokenLogprob
from diffdraft.stats import Stats
from diffdraft.target import TargetBackend

PLAIN = "plain"  # the name of the engine's plain decoding, the reference of every speedup and equality

OnTokens = Callable[[list[int]], None]
ShouldStop = Callable[[], "str | None"]
OnLogprobs = Callable[[list[TokenLogprob]], None]


@dataclass
class DecodeRun:
    tokens: list[int]  # new tokens, EOS included when it ended the answer
    stop_reason: str  # "eos", "length", "context", or the reason should_stop gave
    stats: Stats
    dllm: DLLMResult | None = None  # a dLLM decoder's own record of the run
    logprobs: list[TokenLogprob] | None = None  # one per token, when asked for (decoders that offer them)


class Decoder:
    """One way of decoding: a name, a kind ("engine", "dllm" or "peer") and run()."""

    name: str = "decoder"
    kind: str = "engine"
    draft_len: int = 0
    reference: str = PLAIN  # the decoder this one's speedup and equality are measured against
    offers_logprobs: bool = False  # whether run() reports the target's log probability of each token
    takes_batches: bool = False  # whether begin() starts a Generation that a Batch can step with others

    def run(self, prompt: list[int], max_new_tokens: int, sampling: SamplingConfig, seed: int,
            on_tokens: OnTokens | None = None, should_stop: ShouldStop | None = None,
            logprobs: int | None = None, on_logprobs: OnLogprobs | None = None) -> DecodeRun:
        """logprobs: None, or the alternatives (0..20) to report beside each token's log probability;
        a decoder that does not offer them refuses (see refuse_logprobs)."""
        raise NotImplementedError

    def begin(self, prompt: list[int], max_new_tokens: int, sampling: SamplingConfig, seed: int,
              logprobs: int | None = None) -> Generation:
        """Start a request for a Batch (diffdraft.batching): prefilled, its first token picked."""
        raise DiffdraftError(f"the {self.name} decoder answers one request at a time: it does not batch requests")

    def kv_bytes(self, prompt_tokens: int, max_new_tokens: int) -> int:
        """Bytes of the target's KV cache one request begun by begin() reserves."""
        raise DiffdraftError(f"the {self.name} decoder answers one request at a time: it does not batch requests")

    def refuse_logprobs(self, logprobs: int | None) -> None:
        if logprobs is not None and not self.offers_logprobs:
            raise DiffdraftError(f"log probabilities are not offered by the {self.name} decoder")

    def describe(self) -> dict:
        """What goes into a results file about this decoder."""
        return {"name": self.name, "kind": self.kind, "draft_len": self.draft_len, "reference": self.reference}


class EngineDecoder(Decoder):
    """diffdraft's SpeculativeEngine with one drafter (or none: plain decoding)."""

    kind = "engine"
    offers_logprobs = True
    takes_batches = True

    def __init__(self, name: str, target: TargetBackend, drafter: Drafter | None, draft: DraftConfig,
                 spec: str | None = None):
        self.name = name
        self.spec = spec if spec is not None else name
        self.target = target
        self.drafter = drafter
        self.draft = draft
        self.draft_len = draft.draft_len if drafter is not None else 0
        # One length rule for every request, built (costs measured) before the first one; its
        # calibration carries over from prompt to prompt.
        self.policy = length_policy(target, drafter, draft)

    def run(self, prompt: list[int], max_new_tokens: int, sampling: SamplingConfig, seed: int,
            on_tokens: OnTokens | None = None, should_stop: ShouldStop | None = None,
            logprobs: int | None = None, on_logprobs: OnLogprobs | None = None) -> DecodeRun:
        engine = SpeculativeEngine(self.target, self.drafter, draft=self.draft, sampling=sampling, policy=self.policy)
        result = engine.generate(prompt, max_new_tokens=max_new_tokens, seed=seed, on_tokens=on_tokens,
                                 should_stop=should_stop, logprobs=logprobs, on_logprobs=on_logprobs)
        return DecodeRun(tokens=result.tokens, stop_reason=result.stop_reason, stats=result.stats,
                         logprobs=result.logprobs)

    def begin(self, prompt: list[int], max_new_tokens: int, sampling: SamplingConfig, seed: int,
              logprobs: int | None = None) -> Generation:
        engine = SpeculativeEngine(self.target, self.drafter, draft=self.draft, sampling=sampling, policy=self.policy)
        return engine.begin(prompt, max_new_tokens, seed, logprobs)

    def kv_bytes(self, prompt_tokens: int, max_new_tokens: int) -> int:
        """Bytes of the target's KV cache one request reserves (engine.request_capacity)."""
        return self.target.kv_bytes(request_capacity(self.target, self.drafter, self.draft, prompt_tokens,
                                                     max_new_tokens))

    def describe(self) -> dict:
        return {**super().describe(), "spec": self.spec, "runtime": self.target.runtime, "verify": self.draft.verify,
                "min_confidence": self.draft.min_confidence, "length": self.draft.length,
                "proposals": self.draft.proposals}


class DLLMDecoder(Decoder):
    """The dLLM target's own decoding (no drafter; its own reference) or SimSD (reference: the former).
    Tokens stream and should_stop is asked block by block."""

    kind = "dllm"

    def __init__(self, runner: DLLMRunner):
        self.runner = runner
        self.name = runner.name
        self.draft_len = runner.draft_len
        self.reference = runner.baseline_name

    def run(self, prompt: list[int], max_new_tokens: int, sampling: SamplingConfig, seed: int,
            on_tokens: OnTokens | None = None, should_stop: ShouldStop | None = None,
            logprobs: int | None = None, on_logprobs: OnLogprobs | None = None) -> DecodeRun:
        self.refuse_logprobs(logprobs)
        result = self.runner.run(prompt, max_new_tokens, sampling, seed, on_tokens=on_tokens, should_stop=should_stop)
        return DecodeRun(tokens=result.tokens, stop_reason=self.runner.stop_reason(result),
                         stats=to_stats(result, self.draft_len), dllm=result)

    def describe(self) -> dict:
        net = self.runner.net
        drafter = self.runner.drafter
        return {**super().describe(), "runtime": f"dLLM {self.runner.runtime}, {self.runner.blocks.weights} weights",
                "block_size": net.block_size,
                "steps": self.runner.steps,
                "verify": self.runner.verify if drafter else None,
                "drafter_layers": drafter.net.num_layers if drafter else None}

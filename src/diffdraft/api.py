"""The Python API: load a target and a drafter once, then generate from text.

    import diffdraft
    pipe = diffdraft.load()                      # SmolLM2-135M-Instruct + default drafter
    answer = pipe.generate("Name three rivers.", max_new_tokens=64)
    print(answer.text, answer.stats.tau)

    pipe = diffdraft.load_dllm_pipeline(dllm="b4", drafter="b4")   # SmolLM2 as a block-diffusion LM + SimSD

Everything here is glue over loading, prompting, the backends, drafters and decoding: both
pipelines check a request by one path (diffdraft.prompting) and answer through a Decoder.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from typing import Callable

import torch

from diffdraft.backends import build_target
from diffdraft.batching import MAX_AUTO_BATCH, Batch, default_max_batch
from diffdraft.config import DraftConfig, SamplingConfig, check_threads
from diffdraft.costs import cost_curve
from diffdraft.dllm.decode import DLLMResult
from diffdraft.dllm.loading import BASE, check_choices, dllm_runners, dllm_runtime
from diffdraft.dllm.runner import DLLMRunner
from diffdraft.decoding import Decoder, DLLMDecoder, EngineDecoder
from diffdraft.drafters import build_drafter, required_tap_layers
from diffdraft.engine import Generation
from diffdraft.errors import DiffdraftError
from diffdraft.loading import gguf_path, load_model
from diffdraft.logprobs import TokenLogprob
from diffdraft.prompting import chat_ids, check_fits, text_ids
from diffdraft.stats import Stats
from diffdraft.target import TargetBackend

# The shipped block-diffusion drafter where it fits the target (SmolLM2), n-gram elsewhere: it beat
# plain decoding in the bench (README, "Measured so far").
DEFAULT_DRAFTER = "auto"


@dataclass
class Answer:
    text: str
    tokens: list[int]
    stop_reason: str  # "eos", "length", "context", or the reason should_stop gave
    stats: Stats
    prompt_tokens: int = 0  # tokens of the prompt as the model saw it (template applied)
    dllm: DLLMResult | None = None  # the dLLM's own record of the run (DLLMPipeline only)
    logprobs: list[TokenLogprob] | None = None  # the target's log probability of each token, when asked for


class _Answering:
    """What both pipelines share: prompts checked and encoded by one path, answered by a Decoder."""

    target: TargetBackend
    offers_logprobs: bool = False  # whether answers can carry the target's log probabilities (its decoder's)

    def decoder(self, draft: DraftConfig | None = None) -> Decoder:
        raise NotImplementedError

    def prompt_ids(self, prompt: str | list[dict], chat: bool = True) -> list[int]:
        """Token ids for a user prompt (str) or chat messages through the chat template, or (chat=False)
        for raw text as a completion prompt. Refuses what prompting refuses."""
        return chat_ids(self.target, prompt) if chat else text_ids(self.target, prompt)

    def generate(
        self,
        prompt: str | list[dict],
        max_new_tokens: int = 128,
        sampling: SamplingConfig | None = None,
        draft: DraftConfig | None = None,
        seed: int = 0,
        on_text: Callable[[str], None] | None = None,
        should_stop: Callable[[], str | None] | None = None,
        chat: bool = True,
        logprobs: int | None = None,
    ) -> Answer:
        """Answer a prompt. on_text receives the answer's text as it grows, piece by piece; should_stop,
        asked between steps, ends the answer early with the reason it returns. logprobs (0..20
        alternatives per token) fills Answer.logprobs with the target's own log probabilities."""
        ids = self.prompt_ids(prompt, chat=chat)
        return self.generate_ids(ids, max_new_tokens, sampling, draft, seed, on_text, should_stop, logprobs)

    def generate_ids(
        self,
        ids: list[int],
        max_new_tokens: int = 128,
        sampling: SamplingConfig | None = None,
        draft: DraftConfig | None = None,
        seed: int = 0,
        on_text: Callable[[str], None] | None = None,
        should_stop: Callable[[], str | None] | None = None,
        logprobs: int | None = None,
        on_logprobs: Callable[[list[TokenLogprob]], None] | None = None,
    ) -> Answer:
        """Answer prompt ids made by prompt_ids (see generate). on_logprobs receives each step's log
        probabilities just before on_text receives the text they add to."""
        decoder = self._checked_decoder(ids, max_new_tokens, draft, logprobs)
        streamer = TextStreamer(self.target, on_text) if on_text else None
        run = decoder.run(ids, max_new_tokens, sampling or SamplingConfig(), seed, on_tokens=streamer,
                          should_stop=should_stop, logprobs=logprobs, on_logprobs=on_logprobs)
        text = self.target.decode(run.tokens)
        if streamer:
            streamer.finish(text)
        return Answer(text=text, tokens=run.tokens, stop_reason=run.stop_reason, stats=run.stats,
                      prompt_tokens=len(ids), dllm=run.dllm, logprobs=run.logprobs)

    def _checked_decoder(self, ids: list[int], max_new_tokens: int, draft: DraftConfig | None,
                         logprobs: int | None) -> Decoder:
        """The decoder for `draft`, once the request fits the context and the decoder offers what it asks."""
        check_fits(self.target, len(ids), max_new_tokens)
        decoder = self.decoder(draft)
        decoder.refuse_logprobs(logprobs)
        return decoder

    def begin_ids(
        self,
        ids: list[int],
        max_new_tokens: int = 128,
        sampling: SamplingConfig | None = None,
        draft: DraftConfig | None = None,
        seed: int = 0,
        logprobs: int | None = None,
    ) -> Generation:
        """Start answering prompt ids for a Batch (diffdraft.batching), checked as generate_ids checks them:
        prefilled, with its first token; answer_of() makes its Answer once it has ended."""
        decoder = self._checked_decoder(ids, max_new_tokens, draft, logprobs)
        return decoder.begin(ids, max_new_tokens, sampling or SamplingConfig(), seed, logprobs)

    def auto_max_batch(self) -> int:
        """The batch size `serve --max-batch auto` takes: from this machine's measured forward costs over 1..16
        rows (cached; batching.default_max_batch), or 1 where the decoder does not batch."""
        if not self.decoder().takes_batches:
            return 1
        return default_max_batch(cost_curve(self.target, None, MAX_AUTO_BATCH - 1))

    def batch(self, max_batch: int, memory_limit: int | None = None) -> Batch:
        """An empty Batch on this pipeline's target, for generations begun by begin_ids to step together, their
        KV caches reserving at most memory_limit bytes together (None: no limit)."""
        return Batch(self.target, max_batch, memory_limit)

    def kv_bytes(self, ids: list[int], max_new_tokens: int, draft: DraftConfig | None = None) -> int:
        """Bytes of KV cache a request begun by begin_ids would reserve."""
        return self.decoder(draft).kv_bytes(len(ids), max_new_tokens)

    def answer_of(self, generation: Generation) -> Answer:
        """The Answer of a generation begun by begin_ids, once it has ended."""
        result = generation.result()
        return Answer(text=self.target.decode(result.tokens), tokens=result.tokens, stop_reason=result.stop_reason,
                      stats=result.stats, prompt_tokens=generation.request.prompt_len, logprobs=result.logprobs)


class Pipeline(_Answering):
    """A loaded target and drafter, ready to answer prompts."""

    offers_logprobs = EngineDecoder.offers_logprobs

    def __init__(self, target: TargetBackend, drafter_spec: str = DEFAULT_DRAFTER, early_exit_layers: int = 4):
        self.target = target
        self.drafter_spec = drafter_spec
        self.drafter = build_drafter(drafter_spec, target, early_exit_layers=early_exit_layers)
        self._decoders: dict[DraftConfig, EngineDecoder] = {}  # kept, so each length rule's calibration carries over
        self._decoders_lock = threading.Lock()  # requests on several threads make each decoder once

    @property
    def drafter_name(self) -> str:
        """The drafter spec, with what "auto" resolved to."""
        name = self.drafter.name if self.drafter is not None else "none"
        return f"{self.drafter_spec}: {name}" if self.drafter_spec != name else name

    @property
    def describe(self) -> str:
        return self.drafter_name

    def decoder(self, draft: DraftConfig | None = None) -> EngineDecoder:
        """The engine decoder for this draft config (made once per config)."""
        draft = draft or DraftConfig()
        with self._decoders_lock:
            if draft not in self._decoders:
                self._decoders[draft] = EngineDecoder(self.drafter_name, self.target, self.drafter, draft,
                                                      spec=self.drafter_spec)
            return self._decoders[draft]


class DLLMPipeline(_Answering):
    """A loaded target converted to a block-diffusion LM, with an optional SimSD drafter."""

    offers_logprobs = DLLMDecoder.offers_logprobs

    def __init__(self, target: TargetBackend, runner: DLLMRunner):
        self.target = target
        self.runner = runner
        self._decoder = DLLMDecoder(runner)

    @property
    def describe(self) -> str:
        return self.runner.describe()

    def decoder(self, draft: DraftConfig | None = None) -> DLLMDecoder:
        """The dLLM's decoder; the draft config does not apply (the runner fixes its steps and drafter)."""
        return self._decoder


class TextStreamer:
    """Turns streamed token chunks into text deltas (decoding the whole answer keeps UTF-8 whole)."""

    def __init__(self, target: TargetBackend, on_text: Callable[[str], None]):
        self.target, self.on_text = target, on_text
        self.tokens: list[int] = []
        self.shown = ""

    def __call__(self, chunk: list[int]) -> None:
        self.tokens.extend(chunk)
        text = self.target.decode(self.tokens)
        if text.endswith("\ufffd"):  # an incomplete multi-byte character: wait for more
            return
        if text.startswith(self.shown):
            self.on_text(text[len(self.shown) :])
            self.shown = text

    def finish(self, text: str) -> None:
        """Send whatever of the final text was held back (a trailing U+FFFD, say)."""
        if text.startswith(self.shown) and len(text) > len(self.shown):
            self.on_text(text[len(self.shown) :])
            self.shown = text


def load(
    model: str | None = None,
    drafter: str = DEFAULT_DRAFTER,
    dtype: str = "float32",
    backend: str = "auto",
    tap_layers: tuple[int, ...] | None = None,
    early_exit_layers: int = 4,
    threads: int | None = None,
    weights: str = "auto",
) -> Pipeline:
    """Load a target (default SmolLM2-135M-Instruct) and a drafter (name or folder).

    backend: auto (the lean runtime for the Llama family, HF otherwise), lean or hf. weights
    (the lean runtime's decoder linears): auto (native for a GGUF target, float32 otherwise),
    native (the GGUF's own 4-bit blocks), int4 (float weights rounded to 4 bits) or float32;
    see diffdraft.backends. The target taps the layers its drafter reads unless `tap_layers`
    says otherwise. threads: torch threads for this process, all cores by default.
    """
    use_threads(threads)
    hf_model, tokenizer = load_model(model, dtype=dtype)
    taps = tap_layers or required_tap_layers([drafter], num_layers=hf_model.config.num_hidden_layers)
    target = build_target(hf_model, tokenizer, backend=backend, tap_layers=taps, name=model or "smollm2",
                          weights=weights, gguf=gguf_path(model))
    return Pipeline(target, drafter, early_exit_layers=early_exit_layers)


def use_threads(threads: int | None) -> int:
    """Set torch's thread count (None: every core of this machine; at most that many) and return it."""
    count = check_threads((os.cpu_count() or 1) if threads is None else threads)
    torch.set_num_threads(count)
    return count


def load_dllm_pipeline(
    model: str | None = None,
    dllm: str = BASE,
    drafter: str | None = None,
    drafter_layers: int | None = None,
    block_size: int | None = None,
    steps: int | None = None,
    verify: str = "auto",
    dtype: str = "float32",
    backend: str = "auto",
) -> DLLMPipeline:
    """Load a target and turn it into a dLLM (see diffdraft.dllm.loading for the choices).

    `steps` per block defaults to the block size (one slot per step); with a drafter
    (folder or first layers) generation runs SimSD, whose greedy output equals the dLLM's own.
    backend: auto (the lean runtime wherever it runs the model), lean, or hf (the dLLM module).
    """
    check_choices(dllm, drafter, drafter_layers, block_size)  # before the slow model load
    hf_model, tokenizer = load_model(model, dtype=dtype)
    target = build_target(hf_model, tokenizer, backend="hf", name=model or "smollm2")  # the dLLM runs the module
    own, simsd = dllm_runners(target, dllm, drafter, drafter_layers, block_size, steps, verify,
                              runtime=dllm_runtime(backend, hf_model), gguf=gguf_path(model))
    return DLLMPipeline(target, simsd or own)

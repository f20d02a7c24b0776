"""Peer decoders, run side by side with the engine on the same prompt ids.

- hf-generate: HF transformers `generate` on the engine's own model object (same weights,
  same dtype), plain greedy or sampling.
- hf-prompt-lookup: HF assisted generation with `prompt_lookup_num_tokens` (HF's n-gram
  drafter), same model.
- llama.cpp: `llama_cpp.Llama` on the GGUF file the target was converted from (its own
  quantized weights and kernels: outputs are not expected to equal the engine's). It is first
  run once in a child process (llama_cpp_failure): a llama-cpp-python build whose kernels
  crash on this CPU is then skipped with the reason, instead of taking the bench down with it.

Each reports its tokens and a Stats: total time, time to first token, and for HF the
verify-step trace (tokens proposed per target forward, from a forward pre-hook, and tokens
emitted per forward, from a streamer), so tau and acceptance are measured the same way as
the engine's: over the target forwards after the first one. HF samples from the global
torch RNG (generate takes no generator), so it is seeded with torch.manual_seed.
Knows nothing of suites, records or reports.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from diffdraft.drafters.ngram import MAX_NGRAM  # HF prompt lookup matches what the n-gram drafter does
from diffdraft.decoding import DecodeRun, Decoder
from diffdraft.config import SamplingConfig
from diffdraft.errors import DiffdraftError
from diffdraft.loading import gguf_path
from diffdraft.stats import Stats
from diffdraft.target import TargetBackend

HF_GENERATE = "hf-generate"
HF_PROMPT_LOOKUP = "hf-prompt-lookup"
LLAMA_CPP = "llama.cpp"
PEER_NAMES = (HF_GENERATE, HF_PROMPT_LOOKUP, LLAMA_CPP)


class _Trace:
    """Collects, per target forward, input tokens (pre-hook) and emitted tokens (streamer)."""

    def __init__(self):
        self.inputs: list[int] = []  # per forward: tokens fed
        self.emitted: list[int] = []  # per forward: tokens it added to the answer
        self.first_token_at: float | None = None
        self._prompt_seen = False

    # forward pre-hook, with_kwargs=True
    def on_forward(self, module, args, kwargs):
        ids = kwargs.get("input_ids") if kwargs.get("input_ids") is not None else (args[0] if args else None)
        self.inputs.append(int(ids.shape[1]))

    # streamer interface of transformers.generate: put(prompt ids) first, then each chunk of new tokens
    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        self.emitted.append(int(value.numel()))

    def end(self) -> None:
        pass


def trace_stats(inputs: list[int], emitted: list[int], draft_len: int) -> Stats:
    """A Stats from per-forward input and emitted counts; the first forward (the prefill,
    which may carry a draft too) is not a verify step, as in the engine.

    inputs[i]: tokens fed to forward i ([last token, candidates] after the first);
    emitted[i]: tokens forward i added to the answer.
    """
    if len(inputs) != len(emitted):
        raise RuntimeError(f"trace mismatch: {len(inputs)} forwards but {len(emitted)} emitted chunks")
    stats = Stats(draft_len=draft_len, new_tokens=sum(emitted))
    for fed, out in zip(inputs[1:], emitted[1:]):
        proposed = fed - 1
        stats.record_step(proposed=proposed, accepted=min(out - 1, proposed), emitted=out)
    return stats


class PeerDecoder(Decoder):
    """Another library's decoding behind the Decoder interface."""

    kind = "peer"

    def run(self, prompt: list[int], max_new_tokens: int, sampling: SamplingConfig, seed: int,
            on_tokens=None, should_stop=None, logprobs=None, on_logprobs=None) -> DecodeRun:
        """Peers answer in one piece: on_tokens gets every token at the end; should_stop is not asked."""
        self.refuse_logprobs(logprobs)
        run = self._run(prompt, max_new_tokens, sampling, seed)
        if on_tokens is not None:
            on_tokens(run.tokens)
        return run

    def _run(self, prompt: list[int], max_new_tokens: int, sampling: SamplingConfig, seed: int) -> DecodeRun:
        raise NotImplementedError


class HFGenerate(PeerDecoder):
    """transformers `generate` on the target's model; prompt lookup when prompt_lookup > 0."""

    def __init__(self, target: TargetBackend, prompt_lookup: int = 0):
        self.target = target
        self.model = target.module
        self.draft_len = prompt_lookup
        self.name = HF_PROMPT_LOOKUP if prompt_lookup else HF_GENERATE

    def _config(self, max_new_tokens: int, sampling: SamplingConfig):
        from transformers import GenerationConfig

        eos = sorted(self.target.eos_token_ids)
        pad = self.target.tokenizer.pad_token_id
        options = dict(max_new_tokens=max_new_tokens, num_beams=1, eos_token_id=eos,
                       pad_token_id=pad if pad is not None else eos[0])
        if sampling.greedy:
            options.update(do_sample=False)
        else:  # exactly the engine's law: temperature, then top-k (0 = off), then top-p (1.0 = off)
            options.update(do_sample=True, temperature=sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p)
        if self.draft_len:
            options.update(prompt_lookup_num_tokens=self.draft_len, max_matching_ngram_size=MAX_NGRAM)
        return GenerationConfig(**options)

    def _run(self, prompt: list[int], max_new_tokens: int, sampling: SamplingConfig, seed: int) -> DecodeRun:
        config = self._config(max_new_tokens, sampling)
        ids = torch.tensor([prompt], dtype=torch.long, device=self.target.device)  # [1, T]
        trace = _Trace()
        hook = self.model.register_forward_pre_hook(trace.on_forward, with_kwargs=True)
        try:
            torch.manual_seed(seed)
            start = time.perf_counter()
            with torch.inference_mode():
                out = self.model.generate(
                    input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config, streamer=trace
                )
            total = time.perf_counter() - start
        finally:
            hook.remove()
        tokens = out[0, len(prompt):].tolist()
        stats = trace_stats(trace.inputs, trace.emitted, self.draft_len)
        stats.new_tokens = len(tokens)
        stats.total_s = total
        stats.ttft_s = (trace.first_token_at - start) if trace.first_token_at is not None else total
        eos = self.target.eos_token_ids
        stop = "eos" if tokens and tokens[-1] in eos else "length"
        return DecodeRun(tokens=tokens, stop_reason=stop, stats=stats)

    def describe(self) -> dict:
        dtype = str(self.target.dtype).removeprefix("torch.")
        info = {**super().describe(), "library": "transformers", "dtype": dtype, "runtime": f"transformers, {dtype}"}
        if self.draft_len:
            info["max_matching_ngram_size"] = MAX_NGRAM
        return info


def llama_cpp_available() -> bool:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return False
    return True


# What the probe runs in a child: load the GGUF, then a prompt's forward and a one-token forward (the two
# kinds of matmul a decode runs).
LLAMA_CPP_PROBE = ("import sys; from llama_cpp import Llama; "
                   "m = Llama(model_path=sys.argv[1], n_ctx=64, n_threads=int(sys.argv[2]), verbose=False); "
                   "m.eval(m.tokenize(b'The probe of a peer')); m.eval([m.token_eos()])")
# Where llama.cpp's AMX kernels crash (seen on an AVX-512 Xeon with AMX in a VM), this build runs.
LLAMA_CPP_WITHOUT_AMX = ('CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_AVX512=ON -DGGML_AMX_INT8=OFF '
                         '-DGGML_AMX_TILE=OFF" pip install --force-reinstall --no-deps llama-cpp-python')


def child_failure(code: str, *args: str, timeout_s: float = 300.0) -> str | None:
    """None when `code` runs to its end in a fresh Python with `args`, else why not, in a few words."""
    try:
        done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return f"did not finish within {timeout_s:.0f} s"
    if done.returncode == 0:
        return None
    if done.returncode < 0:
        return f"crashed ({signal.Signals(-done.returncode).name})"
    last = done.stderr.decode(errors="replace").strip().splitlines()[-1:]
    return f"failed ({last[0] if last else f'exit code {done.returncode}'})"


def llama_cpp_failure(gguf: Path, threads: int, code: str = LLAMA_CPP_PROBE) -> str | None:
    """Why llama.cpp cannot decode `gguf` on this machine (its probe, in a child process), or None."""
    failure = child_failure(code, str(gguf), str(threads))
    if failure is None:
        return None
    return (f"llama-cpp-python {failure} decoding {gguf.name} in a probe; a build without AMX may run: "
            f"{LLAMA_CPP_WITHOUT_AMX}")


class LlamaCpp(PeerDecoder):
    """llama.cpp through llama-cpp-python, on a GGUF file, fed the same prompt ids."""

    name = LLAMA_CPP

    def __init__(self, gguf: Path, eos_token_ids: frozenset[int], n_ctx: int, threads: int):
        from llama_cpp import Llama

        self.gguf = Path(gguf)
        self.threads = threads
        self.llm = Llama(model_path=str(self.gguf), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads,
                         verbose=False)
        self.eos = frozenset(eos_token_ids) | {self.llm.token_eos()}

    def _run(self, prompt: list[int], max_new_tokens: int, sampling: SamplingConfig, seed: int) -> DecodeRun:
        if sampling.greedy:
            options = dict(temp=0.0)
        else:  # the engine's law: no min-p, typical or repeat penalty; top_k <= 0 is off in llama.cpp
            options = dict(temp=sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p)
        options.update(min_p=0.0, typical_p=1.0, repeat_penalty=1.0)
        self.llm.reset()  # no reuse of a cached prompt prefix from the previous call
        self.llm.set_seed(seed)
        tokens: list[int] = []
        stop = "length"
        start = time.perf_counter()
        ttft = 0.0
        for token in self.llm.generate(prompt, reset=True, **options):
            if not tokens:
                ttft = time.perf_counter() - start
            tokens.append(int(token))
            if token in self.eos:
                stop = "eos"
                break
            if len(tokens) >= max_new_tokens:
                break
        total = time.perf_counter() - start
        stats = Stats(draft_len=0, new_tokens=len(tokens), ttft_s=ttft, total_s=total)
        for _ in tokens[1:]:  # one forward per token after the first
            stats.record_step(proposed=0, accepted=0, emitted=1)
        return DecodeRun(tokens=tokens, stop_reason=stop, stats=stats)

    def describe(self) -> dict:
        import llama_cpp

        return {**super().describe(), "library": f"llama-cpp-python {llama_cpp.__version__}", "gguf": str(self.gguf),
                "threads": self.threads, "runtime": f"llama.cpp, {self.gguf.name}"}


def build_peers(
    names: list[str], target: TargetBackend, model_spec: str | None, draft_len: int, threads: int, explicit: bool
) -> tuple[list[Decoder], dict[str, str]]:
    """The named peers that can run here, and {name: why not} for the others.

    explicit: the user named these peers; then one that cannot run is an error, not a note.
    """
    unknown = [n for n in names if n not in PEER_NAMES]
    if unknown:
        raise DiffdraftError(f"unknown peers {unknown}: use any of {', '.join(PEER_NAMES)}")
    peers: list[Decoder] = []
    skipped: dict[str, str] = {}
    for name in names:
        if name == HF_GENERATE:
            peers.append(HFGenerate(target))
        elif name == HF_PROMPT_LOOKUP:
            if draft_len < 1:
                skipped[name] = "needs a draft length of at least 1"
            else:
                peers.append(HFGenerate(target, prompt_lookup=draft_len))
        elif name == LLAMA_CPP:
            gguf = gguf_path(model_spec)
            if gguf is None:
                skipped[name] = f"the model {model_spec!r} is not a GGUF file"
            elif not llama_cpp_available():
                skipped[name] = "llama-cpp-python is not installed (pip install 'diffdraft[peers]')"
            elif failure := llama_cpp_failure(gguf, threads):
                skipped[name] = failure
            else:
                peers.append(LlamaCpp(gguf, target.eos_token_ids, n_ctx=target.max_context, threads=threads))
    if explicit and skipped:
        raise DiffdraftError("; ".join(f"peer {n} cannot run: {why}" for n, why in skipped.items()))
    return peers, skipped

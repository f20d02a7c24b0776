"""The speculative engine on tiny random Llama targets (conftest.py): exactness and bookkeeping.

Greedy: every drafter (n-gram, early exit with 1-3 layers, early exit with a perturbed head,
and a scripted drafter that replays the right answer with planted mistakes) must give
token-identical output to plain decoding, for several prompts and draft lengths, including
EOS, max_new_tokens and the end of the model context. Sampling: the law of the first
L = 3 generated tokens through the whole engine (drafter + target forwards + cache crops +
verifier) must equal the law computed by enumeration from the model's own logits,
prod_t logits_to_probs(model(prompt + x_<t))[x_t], by the chi-square check of lawcheck.py
(outcomes expected < 5 times pooled, Wilson-Hilferty threshold at alpha = 1e-4).
"""

from __future__ import annotations

import itertools

import pytest
import torch

from conftest import FIXED, make_llama
from diffdraft import engine as engine_module
from diffdraft.config import DraftConfig, SamplingConfig
from diffdraft.drafters import Draft, Drafter, EarlyExitDrafter, NgramDrafter
from diffdraft.errors import DiffdraftError
from diffdraft.sampling import logits_to_probs, sample
from diffdraft.engine import SpeculativeEngine
from diffdraft.backends import build_target
from diffdraft.target import TargetBackend
from diffdraft.verify import Verdict
from lawcheck import fit

PROMPTS = [
    "The quick brown fox jumps over the lazy dog.",
    "abcabcabcabc",
    "Zebra 12345 zebra 12345 ZEBRA",
]
MAX_NEW = 48


def encode(target: TargetBackend, text: str) -> list[int]:
    return target.tokenizer(text, add_special_tokens=False)["input_ids"]


def plain(target: TargetBackend, prompt: list[int], max_new_tokens: int = MAX_NEW):
    return SpeculativeEngine(target, None).generate(prompt, max_new_tokens=max_new_tokens)


def perturbed_head(target: TargetBackend, scale: float, seed: int) -> torch.nn.Linear:
    """Identity plus noise: the early-exit drafter then agrees with the target only part of the time."""
    width = target.hidden_size
    gen = torch.Generator().manual_seed(seed)
    head = torch.nn.Linear(width, width)
    with torch.no_grad():
        head.weight.copy_(torch.eye(width) + scale * torch.randn(width, width, generator=gen) / width**0.5)
        head.bias.copy_(0.1 * scale * torch.randn(width, generator=gen))
    return head


class ScriptedDrafter(Drafter):
    """Replays a known continuation and plants one wrong token in most blocks.

    In block number c (counting from 0), position c % (g + 1) is corrupted: every accepted
    length 0..g occurs, full acceptance (bonus token) included. It also checks that the
    engine hands it exactly the sequence so far.
    """

    name = "scripted"

    def __init__(self, reference: list[int], vocab_size: int):
        self.reference = reference  # prompt + the plain greedy output
        self.vocab_size = vocab_size
        self.calls = 0
        self.expected_accepts: list[int] = []

    def propose(self, state, tokens, num_tokens, sampling, generator) -> Draft:
        n = len(tokens)
        assert tokens == self.reference[:n], "the engine's sequence left the greedy path"
        continuation = list(self.reference[n : n + num_tokens])
        bad = self.calls % (num_tokens + 1)
        if bad < len(continuation):
            continuation[bad] = (continuation[bad] + 1) % self.vocab_size
            self.expected_accepts.append(bad)
        else:
            self.expected_accepts.append(len(continuation))
        self.calls += 1
        return Draft(tokens=torch.tensor(continuation, dtype=torch.long), probs=None)


def drafter_for(kind: str, target: TargetBackend, reference: list[int] | None = None) -> Drafter | None:
    if kind == "none":
        return None
    if kind == "ngram":
        return NgramDrafter()
    if kind == "ngram-1":
        return NgramDrafter(max_ngram=1)
    if kind == "early-exit-perturbed":
        return EarlyExitDrafter(target, num_layers=2, head=perturbed_head(target, 0.2, seed=3))
    if kind.startswith("early-exit-"):
        return EarlyExitDrafter(target, num_layers=int(kind.rsplit("-", 1)[1]))
    if kind == "scripted":
        return ScriptedDrafter(reference, target.vocab_size)
    raise AssertionError(kind)


DRAFTERS = ["ngram", "ngram-1", "early-exit-1", "early-exit-2", "early-exit-3", "early-exit-perturbed", "scripted"]


def check_stats(result, draft_len: int) -> None:
    stats = result.stats
    assert stats.new_tokens == len(result.tokens)
    assert sum(stats.emitted) + 1 == len(result.tokens)  # + 1: the first token comes from the prefill
    assert len(stats.proposed) == len(stats.accepted) == len(stats.emitted) == stats.steps
    for proposed, accepted, emitted in zip(stats.proposed, stats.accepted, stats.emitted):
        assert 0 <= accepted <= proposed <= draft_len
        assert 1 <= emitted <= accepted + 1


# ------------------------------------------------------------------------------ greedy exactness
# Long drafts for every kind; the slow early-exit drafters with 3 layers or a bad head get 16.
GREEDY_CASES = [(kind, g) for kind in DRAFTERS for g in (1, 4)] + [
    (kind, 16 if kind in ("early-exit-2", "early-exit-3", "early-exit-perturbed") else 64) for kind in DRAFTERS
]


@pytest.mark.parametrize("kind, draft_len", GREEDY_CASES)
def test_greedy_matches_plain_decoding(tiny_target, kind, draft_len):
    forwards = []
    real_forward = tiny_target.forward
    tiny_target.forward = lambda state, ids, want_taps=False, rows=None: (forwards.append(ids.shape[1])
                                                                          or real_forward(state, ids, want_taps, rows))
    totals = [0, 0]  # accepted, proposed over all prompts
    for text in PROMPTS:
        prompt = encode(tiny_target, text)
        expected = plain(tiny_target, prompt)
        drafter = drafter_for(kind, tiny_target, reference=prompt + expected.tokens)
        forwards.clear()
        result = SpeculativeEngine(tiny_target, drafter, DraftConfig(draft_len=draft_len, **FIXED)).generate(
            prompt, max_new_tokens=MAX_NEW
        )
        assert result.tokens == expected.tokens, f"{kind}, g={draft_len}, prompt {text!r}"
        assert result.stop_reason == expected.stop_reason
        check_stats(result, draft_len)
        assert forwards == [1 + p for p in result.stats.proposed]  # one target forward per step (after the prefill)
        if kind == "scripted":
            # steps with g = 0 (at the token limit) do not call the drafter
            drafted = [a for a, p in zip(result.stats.accepted, result.stats.proposed) if p > 0]
            assert drafted == drafter.expected_accepts
        totals[0] += sum(result.stats.accepted)
        totals[1] += sum(result.stats.proposed)
    # Both accepted and rejected draft tokens happened, so both paths were checked.
    assert 0 < totals[0] < totals[1], totals


def test_plain_decoding_bookkeeping(tiny_target):
    prompt = encode(tiny_target, PROMPTS[0])
    result = plain(tiny_target, prompt)
    assert len(result.tokens) == MAX_NEW and result.stop_reason == "length"
    check_stats(result, 0)
    assert result.stats.tau == 1.0
    assert set(result.stats.proposed) == {0}
    # the engine's own greedy picks are the argmax of full-sequence forwards
    with torch.no_grad():
        logits = tiny_target.module(torch.tensor([prompt + result.tokens])).logits[0]
    argmax = logits[len(prompt) - 1 : -1].argmax(-1).tolist()
    assert argmax == result.tokens


@pytest.mark.parametrize("kind", ["ngram", "early-exit-2"])
def test_draft_len_zero_is_plain_decoding(tiny_target, kind):
    prompt = encode(tiny_target, PROMPTS[1])
    expected = plain(tiny_target, prompt)
    result = SpeculativeEngine(tiny_target, drafter_for(kind, tiny_target), DraftConfig(draft_len=0, **FIXED)).generate(
        prompt, max_new_tokens=MAX_NEW
    )
    assert result.tokens == expected.tokens
    assert result.stats.tau == 1.0 and set(result.stats.proposed) == {0}


def test_streamed_chunks_add_up(tiny_target):
    prompt = encode(tiny_target, PROMPTS[1])
    chunks = []
    result = SpeculativeEngine(tiny_target, NgramDrafter(), DraftConfig(draft_len=6, **FIXED)).generate(
        prompt, max_new_tokens=MAX_NEW, on_tokens=chunks.append
    )
    assert [t for chunk in chunks for t in chunk] == result.tokens
    assert [len(c) for c in chunks[1:]] == result.stats.emitted


@pytest.mark.parametrize(
    "text",
    ["hello world", "The quick brown fox", "x y z", "Once upon a time"],
)
def test_streamed_text_equals_answer_text(tiny_target, text):
    """Pipeline.generate's on_text pieces add up to the answer. The tiny model emits raw bytes;
    the last two prompts end in invalid UTF-8 (decoded as U+FFFD)."""
    from diffdraft.api import Pipeline

    pipe = Pipeline(tiny_target, "ngram")
    pieces: list[str] = []
    answer = pipe.generate(text, max_new_tokens=40, on_text=pieces.append)
    assert "".join(pieces) == answer.text


# ---------------------------------------------------------------------------------- stopping
@pytest.mark.parametrize("kind", ["none"] + DRAFTERS)
def test_stops_at_eos(tiny_target, kind):
    """Make a token the plain output emits mid-way the EOS: every drafter stops right after it."""
    prompt = encode(tiny_target, PROMPTS[0])
    reference = plain(tiny_target, prompt).tokens
    # the first token whose first occurrence is at index >= 6
    index = next(i for i, t in enumerate(reference) if i >= 6 and t not in reference[:i])
    eos = reference[index]
    tiny_target.eos_token_ids = frozenset({eos})
    drafter = drafter_for(kind, tiny_target, reference=prompt + reference)
    result = SpeculativeEngine(tiny_target, drafter, DraftConfig(draft_len=8, **FIXED)).generate(prompt, max_new_tokens=MAX_NEW)
    assert result.tokens == reference[: index + 1]
    assert result.stop_reason == "eos"
    check_stats(result, 8)


def test_natural_eos_of_the_model(tiny_target):
    """This prompt makes the tiny model emit its configured EOS (id 256) on its own after 3 tokens."""
    prompt = encode(tiny_target, "def add(a, b):\n    return a + b\n")
    expected = plain(tiny_target, prompt)
    assert expected.stop_reason == "eos" and expected.tokens[-1] in tiny_target.eos_token_ids
    for kind in ["ngram", "early-exit-2"]:
        result = SpeculativeEngine(tiny_target, drafter_for(kind, tiny_target), DraftConfig(8, **FIXED)).generate(prompt, 64)
        assert result.tokens == expected.tokens and result.stop_reason == "eos"


def test_eos_as_first_token(tiny_target):
    prompt = encode(tiny_target, PROMPTS[2])
    first = plain(tiny_target, prompt, 1).tokens[0]
    tiny_target.eos_token_ids = frozenset({first})
    result = SpeculativeEngine(tiny_target, NgramDrafter(), DraftConfig(4, **FIXED)).generate(prompt, max_new_tokens=10)
    assert result.tokens == [first] and result.stop_reason == "eos"
    assert result.stats.steps == 0 and result.stats.new_tokens == 1


@pytest.mark.parametrize("kind", ["none", "ngram", "early-exit-2", "scripted"])
@pytest.mark.parametrize("max_new", [1, 2, 3, 7, 17])
def test_stops_at_max_new_tokens_exactly(tiny_target, kind, max_new):
    prompt = encode(tiny_target, PROMPTS[1])
    reference = plain(tiny_target, prompt, 32).tokens
    drafter = drafter_for(kind, tiny_target, reference=prompt + reference)
    result = SpeculativeEngine(tiny_target, drafter, DraftConfig(draft_len=5, **FIXED)).generate(prompt, max_new_tokens=max_new)
    assert result.tokens == reference[:max_new]
    assert result.stop_reason == "length"
    check_stats(result, 5)


@pytest.mark.parametrize("kind", ["none", "ngram", "early-exit-3", "scripted"])
def test_stops_at_end_of_context(tiny_target, kind):
    """A prompt near max_position_embeddings: decoding stops with reason 'context' when the
    sequence fills the context, at the same token with or without a drafter."""
    context = tiny_target.max_context
    prompt = (encode(tiny_target, PROMPTS[1]) * 40)[: context - 12]
    reference = plain(tiny_target, prompt, 100)
    assert reference.stop_reason == "context"
    assert len(prompt) + len(reference.tokens) == context
    drafter = drafter_for(kind, tiny_target, reference=prompt + reference.tokens)
    result = SpeculativeEngine(tiny_target, drafter, DraftConfig(draft_len=8, **FIXED)).generate(prompt, max_new_tokens=100)
    assert result.tokens == reference.tokens and result.stop_reason == "context"


# ------------------------------------------------------------------------------- input errors
def test_engine_rejects_bad_requests(tiny_target):
    engine = SpeculativeEngine(tiny_target, NgramDrafter())
    with pytest.raises(DiffdraftError):
        engine.generate([], max_new_tokens=4)
    for bad in (0, -1, True, 2.5):
        with pytest.raises(DiffdraftError):
            engine.generate([1, 2, 3], max_new_tokens=bad)
    with pytest.raises(DiffdraftError):
        engine.generate([5] * tiny_target.max_context, max_new_tokens=4)


class FixedDrafter(Drafter):
    """Always proposes the same tokens and states no q."""

    name = "fixed"

    def propose(self, state, tokens, num_tokens, sampling, generator) -> Draft:
        return Draft(tokens=torch.full((num_tokens,), 7, dtype=torch.long), probs=None)


def test_rejection_mode_needs_a_drafter_with_q(tiny_target):
    """Refused when the engine is made, before any token: a stream never starts and then fails."""
    with pytest.raises(DiffdraftError, match="rejection"):
        SpeculativeEngine(tiny_target, FixedDrafter(), DraftConfig(draft_len=4, verify="rejection", **FIXED),
                          SamplingConfig(temperature=1.0))
    greedy = SpeculativeEngine(tiny_target, FixedDrafter(), DraftConfig(draft_len=4, verify="rejection", **FIXED))
    assert len(greedy.generate(encode(tiny_target, PROMPTS[1]), max_new_tokens=8).tokens) == 8  # greedy needs no q


@pytest.mark.parametrize("drafter_kind", ["early-exit-1", "none"])
def test_rejection_mode_with_empty_draft(tiny_target, drafter_kind):
    """max_new_tokens = 2 and draft_len = 1 leave room for no draft token in the one verify step
    (g = min(1, 2 - 1 - 1) = 0); the engine must just sample the last token from p."""
    drafter = drafter_for(drafter_kind, tiny_target)
    engine = SpeculativeEngine(
        tiny_target, drafter, DraftConfig(draft_len=1, verify="rejection", **FIXED), SamplingConfig(temperature=1.0)
    )
    result = engine.generate(encode(tiny_target, PROMPTS[1]), max_new_tokens=2, seed=0)
    assert len(result.tokens) == 2


# ---------------------------------------------------------------------------------- the target
def test_crop_then_refeed_equals_fresh_prefill(tiny_target):
    prompt = encode(tiny_target, PROMPTS[0])
    state = tiny_target.new_state()
    tiny_target.prefill(state, torch.tensor([prompt]))
    tiny_target.forward(state, torch.tensor([[10, 11, 12, 13, 14]]))
    assert state.length == len(prompt) + 5
    tiny_target.crop(state, len(prompt) + 2)
    assert state.length == len(prompt) + 2
    after_crop = tiny_target.forward(state, torch.tensor([[20, 21, 22]])).logits[0]  # [3, V]

    fresh = tiny_target.new_state()
    tiny_target.prefill(fresh, torch.tensor([prompt]))
    full = tiny_target.forward(fresh, torch.tensor([[10, 11, 20, 21, 22]])).logits[0, -3:]
    torch.testing.assert_close(after_crop, full, rtol=1e-4, atol=1e-4)
    again = tiny_target.prefill(fresh, torch.tensor([prompt + [10, 11, 12]])).logits[0, -1]
    assert not torch.allclose(after_crop[0], again)


def test_crop_to_zero_and_limits(tiny_target):
    prompt = encode(tiny_target, PROMPTS[2])
    state = tiny_target.new_state()
    first = tiny_target.prefill(state, torch.tensor([prompt])).logits
    tiny_target.crop(state, state.length)  # no-op
    assert state.length == len(prompt)
    tiny_target.crop(state, 0)
    again = tiny_target.forward(state, torch.tensor([prompt])).logits
    assert first.shape == (1, 1, tiny_target.vocab_size)  # a prefill returns the last position's logits only
    torch.testing.assert_close(first, again[:, -1:], rtol=1e-4, atol=1e-4)
    for bad in (-1, len(prompt) + 1):
        with pytest.raises(ValueError):
            tiny_target.crop(state, bad)
    with pytest.raises(DiffdraftError):
        tiny_target.forward(state, torch.zeros(1, tiny_target.max_context, dtype=torch.long))


def test_taps_are_hidden_states_of_the_tap_layers(tiny_target):
    prompt = encode(tiny_target, PROMPTS[0])
    state = tiny_target.new_state()
    out = tiny_target.prefill(state, torch.tensor([prompt[:-4]]), want_taps=True)
    more = tiny_target.forward(state, torch.tensor([prompt[-4:]]), want_taps=True)
    taps = torch.cat([out.taps, more.taps], dim=1)  # [1, T, n_taps * D]
    assert taps.shape == (1, len(prompt), len(tiny_target.tap_layers) * tiny_target.hidden_size)
    with torch.no_grad():
        hidden = tiny_target.module(torch.tensor([prompt]), output_hidden_states=True).hidden_states
    expected = torch.cat([hidden[i] for i in tiny_target.tap_layers], dim=-1)
    torch.testing.assert_close(taps, expected, rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------------- the drafters
def test_early_exit_cache_rollback_matches_a_fresh_drafter(tiny_target):
    """Proposing after a different earlier sequence (cache cropped to the shared prefix) gives
    the same draft and the same q as a fresh state."""
    base = encode(tiny_target, PROMPTS[0])
    drafter = EarlyExitDrafter(tiny_target, num_layers=2)
    # a sequence that branches off, and one that is a prefix of what the drafter has cached
    for other in (base[:-5] + [7, 8, 9], base[:-3]):
        used = drafter.new_state()
        drafter.begin(used, base, None)
        drafter.propose(used, base, 6, SamplingConfig(), None)
        for sampling in (SamplingConfig(), SamplingConfig(temperature=0.9, top_k=20)):
            fresh = drafter.new_state()
            drafter.begin(fresh, other, None)
            want = drafter.propose(fresh, other, 5, sampling, torch.Generator().manual_seed(1))
            got = drafter.propose(used, other, 5, sampling, torch.Generator().manual_seed(1))
            assert got.tokens.tolist() == want.tokens.tolist()
            torch.testing.assert_close(got.probs, want.probs, rtol=1e-4, atol=1e-5)
            drafter.propose(used, base + [3, 4], 4, sampling, torch.Generator().manual_seed(2))  # move elsewhere again


def test_early_exit_untrained_is_plain_early_exit(tiny_target):
    """With its identity head, the drafter's logits are the LM head over the final norm of layer n."""
    prompt = encode(tiny_target, PROMPTS[2])
    drafter = EarlyExitDrafter(tiny_target, num_layers=2)
    draft = drafter.propose(drafter.new_state(), prompt, 1, SamplingConfig(temperature=1.0),
                            torch.Generator().manual_seed(0))
    model = tiny_target.module
    with torch.no_grad():
        hidden = model(torch.tensor([prompt]), output_hidden_states=True).hidden_states[2][0, -1]
        expected = logits_to_probs(model.lm_head(model.model.norm(hidden)), SamplingConfig(temperature=1.0))
    torch.testing.assert_close(draft.probs[0], expected, rtol=1e-4, atol=1e-6)


def test_early_exit_layer_count_is_checked(tiny_target):
    for bad in (0, tiny_target.num_layers):
        with pytest.raises(DiffdraftError):
            EarlyExitDrafter(tiny_target, num_layers=bad)


def test_ngram_lookup():
    from diffdraft.drafters.ngram import lookup_continuation

    tokens = [1, 2, 3, 9, 1, 2, 3, 4, 5, 1, 2, 3]
    # longest suffix n-gram (3: [1, 2, 3]); its latest earlier occurrence starts at 4
    assert lookup_continuation(tokens, 3, max_ngram=3, min_ngram=1) == [4, 5, 1]
    assert lookup_continuation(tokens, 10, max_ngram=3, min_ngram=1) == [4, 5, 1, 2, 3]
    assert lookup_continuation([1, 2, 3], 4, max_ngram=3, min_ngram=1) == []
    assert lookup_continuation([5, 6, 5], 2, max_ngram=3, min_ngram=1) == [6, 5]
    assert lookup_continuation([5, 6, 5], 2, max_ngram=3, min_ngram=2) == []


# ------------------------------------------------------------------------ sampling losslessness
VOCAB_SMALL = 4
L = 3
LAW_PROMPT = [0, 1, 2, 3, 0, 1]


def make_small_target() -> TargetBackend:
    """The vocabulary-4 target whose law over 3 tokens is enumerated (no tokenizer: drafters that
    check one see a fixed fingerprint)."""
    model = make_llama(
        vocab_size=VOCAB_SMALL, layers=3, hidden=32, heads=2, kv_heads=1, max_positions=64,
        eos_token_id=None, init_range=0.2, seed=1,
    )
    target = build_target(model, None, tap_layers=(1, 2), name="tiny-vocab")
    target.tokenizer_fingerprint = lambda: "none"
    return target


@pytest.fixture(scope="module")
def small_target() -> TargetBackend:
    return make_small_target()


def exact_law(target: TargetBackend, prompt: list[int], sampling: SamplingConfig, backend: bool = False) -> dict:
    """P(x_1..x_L) from the model's own logits on every prefix, by enumeration; with `backend`, from the backend's
    (a 4-bit target's law is its kernels', not the float model's)."""
    law = {(): 1.0}
    model = target.module
    for _ in range(L):
        prefixes = list(law)
        with torch.no_grad():
            if backend:
                logits = torch.cat([target.prefill(target.new_state(), torch.tensor([prompt + list(p)])).logits[:, -1]
                                    for p in prefixes])  # [n, V]
            else:
                logits = model(torch.tensor([prompt + list(p) for p in prefixes])).logits[:, -1]  # [n, V]
        probs = logits_to_probs(logits, sampling).double()
        law = {p + (x,): law[p] * float(probs[i, x]) for i, p in enumerate(prefixes) for x in range(VOCAB_SMALL)}
    return law


def engine_samples(engine: SpeculativeEngine, n: int, seed0: int = 0, trace: str = "accepted"):
    """The first L tokens of n seeded runs on LAW_PROMPT, and every verify step's `trace`
    (a Stats list: accepted or proposed) over all runs."""
    samples, steps = [], []
    for s in range(n):
        result = engine.generate(LAW_PROMPT, max_new_tokens=L + 1, seed=seed0 + s)
        samples.append(tuple(result.tokens[:L]))
        steps.extend(getattr(result.stats, trace))
    return samples, steps


# verify="auto" picks rejection sampling for the early-exit drafter (it states q).
LAW_CASES = {
    "early-exit, rejection, t=1": ("early-exit-1", "rejection", SamplingConfig(temperature=1.0)),
    "early-exit, auto, t=1.5 top-k 3 top-p 0.95": (
        "early-exit-1", "auto", SamplingConfig(temperature=1.5, top_k=3, top_p=0.95)
    ),
    "ngram, point-mass, t=1": ("ngram", "point-mass", SamplingConfig(temperature=1.0)),
}
N_ENGINE = 1000


@pytest.mark.parametrize("case", list(LAW_CASES))
def test_engine_sampling_law_equals_target_law(small_target, case, monkeypatch):
    """Engine + drafter at temperature > 0: the first 3 tokens follow the target's exact law
    (chi-square at alpha 1e-4, N = 1000 seeded runs; draft_len 2, so tokens 2-3 come from
    one verify step and its crop, or from two)."""
    kind, mode, sampling = LAW_CASES[case]
    calls = {"rejection": 0, "point-mass": 0}
    for name, attr in (("rejection", "verify_rejection"), ("point-mass", "verify_point_mass")):
        real = getattr(engine_module, attr)

        def counted(*args, _real=real, _name=name):
            calls[_name] += 1
            return _real(*args)

        monkeypatch.setattr(engine_module, attr, counted)
    engine = SpeculativeEngine(small_target, drafter_for(kind, small_target), DraftConfig(2, mode, **FIXED), sampling)
    samples, accepted = engine_samples(engine, N_ENGINE)
    result = fit(samples, exact_law(small_target, LAW_PROMPT, sampling))
    print(case, result, calls)
    assert result.ok, f"{case}: {result}"
    assert 0 in accepted and 2 in accepted  # rejections and full acceptances both happened
    expected_path = "rejection" if kind.startswith("early-exit") else "point-mass"
    assert calls[expected_path] > N_ENGINE // 2


def test_engine_law_check_catches_a_lossy_verifier(small_target, monkeypatch):
    """Negative control at the same N: an engine whose rejection step resamples from p instead
    of the residual norm(max(0, p - q)) is caught."""

    def lossy(draft_tokens, draft_probs, target_probs, generator):
        g = draft_tokens.shape[0]
        for i in range(g):
            x = int(draft_tokens[i])
            if float(torch.rand(1, generator=generator)) >= float(target_probs[i, x] / draft_probs[i, x]):
                return Verdict(i, draft_tokens[:i].tolist() + [int(sample(target_probs[i], generator))], g)
        return Verdict(g, draft_tokens.tolist() + [int(sample(target_probs[g], generator))], g)

    monkeypatch.setattr(engine_module, "verify_rejection", lossy)
    sampling = SamplingConfig(temperature=1.0)
    engine = SpeculativeEngine(
        small_target, drafter_for("early-exit-1", small_target), DraftConfig(2, "rejection", **FIXED), sampling
    )
    samples, _ = engine_samples(engine, N_ENGINE)
    result = fit(samples, exact_law(small_target, LAW_PROMPT, sampling))
    print("lossy", result)
    assert not result.ok, f"the lossy engine passed: {result}"

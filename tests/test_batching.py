"""Batched decoding (diffdraft.batching): a request's tokens, and the log probabilities that decided
them, are bit for bit what it gets alone, whatever batch it runs in (mixed prompt lengths, arrivals
mid-stream, another request cancelled), for plain decoding and each drafter, greedy and seeded T = 1;
the control on `F.linear` differs. Plus the scheduler's admission and cancellation. Tiny random Llamas."""

from __future__ import annotations

import pytest
import torch

from conftest import FIXED, make_llama
from diffdraft.backends import LeanLlamaTarget, build_target
from diffdraft.backends.lean import BULK_ROWS
from diffdraft.batching import Batch, run_batched
from diffdraft.config import DraftConfig, SamplingConfig
from diffdraft.engine import SpeculativeEngine
from diffdraft.errors import DiffdraftError
from test_request_state import drafter_for

PROMPTS = [[5, 9, 33, 100, 7, 5, 9, 33], [200, 17, 64, 3, 3, 150], [(7 * i) % 250 for i in range(45)], [1, 2],
           [9, 9, 9, 9, 9]]
ARRIVALS = [0, 0, 2, 5, 5]  # steps at which each request arrives
MAX_NEW = 30
SEEDS = [0, 1, 2, 3, 4]
TOP = 2  # logprob alternatives: the values are compared bit for bit


@pytest.fixture(scope="module")
def model():
    return make_llama(init_range=0.2)


def lean(model, tiny_tokenizer, onednn: bool = True) -> LeanLlamaTarget:
    return LeanLlamaTarget(model, tiny_tokenizer, tap_layers=(1, 3), prefer_onednn=onednn)


def record(tokens, logprobs, stop_reason) -> tuple:
    return tokens, [(e.token, e.logprob, tuple(e.top)) for e in logprobs], stop_reason


def alone(engine: SpeculativeEngine, max_new: int = MAX_NEW) -> list[tuple]:
    out = []
    for prompt, seed in zip(PROMPTS, SEEDS):
        result = engine.generate(prompt, max_new_tokens=max_new, seed=seed, logprobs=TOP)
        out.append(record(result.tokens, result.logprobs, result.stop_reason))
    return out


def batched(engine: SpeculativeEngine, max_batch: int, stops=None, max_new: int = MAX_NEW) -> tuple[list, list]:
    """Every request through one batch; also the batch sizes seen at each step."""
    begins = [lambda p=p, s=s: engine.begin(p, max_new, s, TOP) for p, s in zip(PROMPTS, SEEDS)]
    streamed = [[] for _ in PROMPTS]
    results = [None] * len(PROMPTS)
    for index, emitted, generation in run_batched(engine.target, begins, max_batch, ARRIVALS, stops):
        if emitted is not None:
            streamed[index].extend(emitted.tokens)
        else:
            result = generation.result()
            assert streamed[index] == result.tokens  # what streamed is the answer
            results[index] = record(result.tokens, result.logprobs, result.stop_reason)
    return results


def engine_for(target, kind: str, sampling: SamplingConfig, **draft) -> SpeculativeEngine:
    drafter = drafter_for(kind, target)
    config = DraftConfig(draft_len=4, **draft) if drafter is not None else DraftConfig()
    return SpeculativeEngine(target, drafter, config, sampling)


GREEDY = SamplingConfig()
T1 = SamplingConfig(temperature=1.0)


@pytest.mark.parametrize("kind, sampling, draft", [
    ("none", GREEDY, {}),
    ("ngram", GREEDY, FIXED),
    ("block-diffusion", GREEDY, FIXED),
    ("block-diffusion", GREEDY, {"tree": 6}),  # the length rule and draft trees
    ("masked-diffusion", GREEDY, FIXED),
    ("none", T1, {}),
    ("block-diffusion", T1, {**FIXED, "verify": "point-mass"}),
    ("ngram", T1, {"verify": "point-mass"}),
])
def test_a_request_in_a_batch_gets_what_it_gets_alone(model, tiny_tokenizer, kind, sampling, draft):
    target = lean(model, tiny_tokenizer)
    engine = engine_for(target, kind, sampling, **draft)
    expected = alone(engine)
    for max_batch in (2, 5):
        assert batched(engine, max_batch) == expected, f"max batch {max_batch}"


def test_with_4_bit_weights_a_request_gets_alone_and_plain_what_it_gets_in_a_batch(model, tiny_tokenizer):
    """4-bit weights: the 45-token prompt is prefilled on the bulk kernels where the CPU has them
    (backends/lean.py, BULK_ROWS); plain and speculative decoding and every batch share that prefill."""
    target = build_target(model, tiny_tokenizer, backend="lean", tap_layers=(1, 3), weights="int4",
                          report=lambda line: None)
    assert max(len(p) for p in PROMPTS) >= BULK_ROWS
    plain = alone(engine_for(target, "none", GREEDY))
    engine = engine_for(target, "block-diffusion", GREEDY, **FIXED)
    expected = alone(engine)
    assert [r[0] for r in expected] == [r[0] for r in plain]
    assert batched(engine, 5) == expected


def test_a_cancelled_request_leaves_the_others_untouched(model, tiny_tokenizer):
    target = lean(model, tiny_tokenizer)
    engine = engine_for(target, "block-diffusion", GREEDY, **FIXED)
    expected = alone(engine)
    asked = [0]

    def cancel_after_three() -> str | None:
        asked[0] += 1
        return "cancelled" if asked[0] > 3 else None

    results = batched(engine, 5, stops=[None, cancel_after_three, None, None, None])
    assert results[1][2] == "cancelled" and results[1][0] == expected[1][0][: len(results[1][0])]
    assert len(results[1][0]) < len(expected[1][0])
    assert [r for i, r in enumerate(results) if i != 1] == [r for i, r in enumerate(expected) if i != 1]


def test_the_control_on_f_linear_is_not_batch_invariant(model, tiny_tokenizer):
    """Negative control: the same runtime on `F.linear` (MKL) gives a batched request other log
    probabilities than it gets alone, so the equality above is not an accident of the tiny model."""
    target = lean(model, tiny_tokenizer, onednn=False)
    engine = engine_for(target, "none", GREEDY)
    assert batched(engine, 5) != alone(engine)


def test_the_batch_admits_up_to_its_size_and_in_arrival_order(model, tiny_tokenizer):
    target = lean(model, tiny_tokenizer)
    engine = engine_for(target, "none", GREEDY)
    begins = [lambda p=p: engine.begin(p, 6) for p in PROMPTS]
    live, most, order = set(), 0, []
    for index, emitted, _ in run_batched(target, begins, 2, ARRIVALS):
        if emitted is not None and index not in live:
            live.add(index)
            order.append(index)
        elif emitted is None:
            live.discard(index)
        most = max(most, len(live))
    assert most == 2 and order == [0, 1, 2, 3, 4]
    batch = Batch(target, 1)
    batch.add(engine.begin(PROMPTS[0], 4))
    with pytest.raises(DiffdraftError, match="batch is full"):
        batch.add(engine.begin(PROMPTS[1], 4))
    with pytest.raises(DiffdraftError, match="positive integer"):
        Batch(target, 0)


def test_a_cancel_frees_the_member_at_once(model, tiny_tokenizer):
    target = lean(model, tiny_tokenizer)
    engine = engine_for(target, "none", GREEDY)
    batch = Batch(target, 2)
    first = batch.add(engine.begin(PROMPTS[0], 20))
    second = batch.add(engine.begin(PROMPTS[1], 20))
    batch.step()
    batch.cancel(first)
    assert batch.members == [second] and first.generation.stop_reason == "cancelled" and not batch.full
    report = batch.step()
    assert report.sequences == 1 and [m for m, _ in report.emitted] == [second]


def test_the_hf_backend_batches_by_running_sequences_in_turn(model, tiny_tokenizer):
    from diffdraft.backends import HFTarget

    target = HFTarget(model, tiny_tokenizer, tap_layers=(1, 3))
    engine = engine_for(target, "ngram", GREEDY, **FIXED)
    expected = alone(engine)
    results = batched(engine, 3)
    assert [r[0] for r in results] == [r[0] for r in expected]  # tokens; HF's logits vary with the sequence count
    torch.testing.assert_close([lp for r in results for _, lp, _ in r[1]],
                               [lp for r in expected for _, lp, _ in r[1]], rtol=0, atol=1e-5)


def test_a_request_reserves_the_cache_it_needs(model, tiny_tokenizer):
    """A request's KV cache holds its prompt, its answer and the widest step's rows, not the whole context; a
    fixed tree of 6 nodes at the very end of the answer still fits."""
    target = lean(model, tiny_tokenizer)
    engine = engine_for(target, "block-diffusion", GREEDY, length="fixed", proposals="sample", tree=6)
    generation = engine.begin(PROMPTS[0], 10)
    assert generation.request.target.capacity == len(PROMPTS[0]) + 10 + 1 + 6 < target.max_context
    assert generation.request.target.cache.shape[3] == generation.request.target.capacity
    while (step := engine.plan(generation)) is not None:
        engine.conclude(generation, step, target.forward_many([step.part], want_taps=generation.want_taps)[0])
    assert generation.stop_reason in ("length", "eos") and len(generation.tokens) <= 10
    assert engine.kv_bytes(len(PROMPTS[0]), 10) == target.kv_bytes(generation.request.target.capacity) \
        == generation.request.target.cache.numel() * 4


def test_the_batch_keeps_its_kv_memory_limit(model, tiny_tokenizer):
    target = lean(model, tiny_tokenizer)
    engine = engine_for(target, "none", GREEDY)
    one = engine.kv_bytes(len(PROMPTS[0]), 20)
    batch = Batch(target, 4, memory_limit=one + one // 2)  # room for one such request, not two
    assert batch.ever_fits(one) and not batch.ever_fits(2 * one) and batch.has_room(one)
    batch.add(engine.begin(PROMPTS[0], 20))
    assert not batch.has_room(one) and batch.reserved == one
    with pytest.raises(DiffdraftError, match="KV memory is full"):
        batch.add(engine.begin(PROMPTS[0], 20))
    with pytest.raises(DiffdraftError, match="KV memory limit must be a positive"):
        Batch(target, 4, memory_limit=0)


def test_a_stream_yields_each_step_and_stops_when_closed(model, tiny_tokenizer):
    target = lean(model, tiny_tokenizer)
    engine = engine_for(target, "ngram", GREEDY, **FIXED)
    expected = engine.generate(PROMPTS[0], max_new_tokens=MAX_NEW)
    steps = engine.stream(PROMPTS[0], MAX_NEW)
    streamed = []
    while True:
        try:
            streamed.append(next(steps).tokens)
        except StopIteration as done:
            result = done.value
            break
    assert [t for chunk in streamed for t in chunk] == result.tokens == expected.tokens
    assert len(streamed) == result.stats.steps + 1  # the prefill's token, then one chunk per step
    steps = engine.stream(PROMPTS[0], MAX_NEW)
    first = next(steps)
    steps.close()  # the caller cancels: nothing more is computed
    assert first.tokens == expected.tokens[:1]
    with pytest.raises(StopIteration):
        next(steps)


def test_the_default_batch_size_comes_from_the_cost_curve():
    from diffdraft.batching import default_max_batch
    from diffdraft.draft_length import CostCurve

    assert default_max_batch(CostCurve(tuple(float(b) for b in range(1, 17)))) == 1  # rows cost alike: no gain
    assert default_max_batch(CostCurve((1.0,) * 16)) == 15  # free rows: the fewest within 90% of 16
    # a measured-like curve: 16 rows cost 3.4x one, 12 rows 2.8x
    curve = CostCurve((16.2, 18.6, 20.4, 22.4, 28.7, 30.0, 32.0, 34.0, 40.6, 42.9, 43.6, 45.4, 52.9, 53.3, 54.5, 55.8))
    assert default_max_batch(curve) == 12

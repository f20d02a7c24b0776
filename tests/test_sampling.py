"""logits_to_probs and the config dataclasses, on hand-made logits and reference code."""

from __future__ import annotations

import math

import pytest
import torch

from diffdraft.config import VERIFY_MODES, DraftConfig, SamplingConfig
from diffdraft.errors import DiffdraftError
from diffdraft.sampling import logits_to_logprobs, logits_to_probs, sample


def reference_probs(logits: list[float], temperature: float, top_k: int = 0, top_p: float = 1.0) -> list[float]:
    """Plain-Python statement of the shaping: temperature, then top-k, then the smallest
    set of most likely tokens whose mass reaches top_p (the top token always kept)."""
    scaled = [x / temperature for x in logits]
    keep = set(range(len(scaled)))
    if 0 < top_k < len(scaled):
        keep = set(sorted(keep, key=lambda i: -scaled[i])[:top_k])
    z = sum(math.exp(scaled[i]) for i in keep)
    probs = {i: math.exp(scaled[i]) / z for i in keep}
    if top_p < 1.0:
        chosen, mass = set(), 0.0
        for i in sorted(probs, key=lambda i: -probs[i]):
            chosen.add(i)
            mass += probs[i]
            if mass >= top_p:
                break
        z = sum(probs[i] for i in chosen)
        probs = {i: probs[i] / z for i in chosen}
    return [probs.get(i, 0.0) for i in range(len(logits))]


def test_greedy_is_one_hot_on_the_argmax():
    logits = torch.tensor([[1.0, 3.0, 2.0, -1.0], [5.0, -1.0, 0.0, 4.9]])
    probs = logits_to_probs(logits, SamplingConfig(temperature=0.0))
    assert probs.dtype == torch.float32
    assert probs.tolist() == [[0.0, 1.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]]


def test_greedy_ignores_top_k_and_top_p():
    logits = torch.tensor([0.5, 0.1, 2.0])
    probs = logits_to_probs(logits, SamplingConfig(temperature=0.0, top_k=1, top_p=0.3))
    assert probs.tolist() == [0.0, 0.0, 1.0]


@pytest.mark.parametrize("temperature", [0.25, 0.7, 1.0, 2.5])
def test_temperature_scaling(temperature):
    logits = [2.0, 1.0, 0.0, -1.5, 0.3]
    probs = logits_to_probs(torch.tensor(logits), SamplingConfig(temperature=temperature))
    assert probs.tolist() == pytest.approx(reference_probs(logits, temperature), abs=1e-6)
    # lower temperature sharpens: the top token gains mass as T falls
    cooler = logits_to_probs(torch.tensor(logits), SamplingConfig(temperature=temperature / 2))
    assert float(cooler[0]) > float(probs[0])


@pytest.mark.parametrize("k", [1, 2, 3, 5, 7])
def test_top_k_keeps_exactly_k(k):
    gen = torch.Generator().manual_seed(k)
    logits = torch.randn(4, 8, generator=gen)  # distinct values almost surely
    probs = logits_to_probs(logits, SamplingConfig(temperature=0.8, top_k=k))
    for row_logits, row in zip(logits, probs):
        kept = set(torch.nonzero(row).flatten().tolist())
        assert kept == set(torch.topk(row_logits, k).indices.tolist())
        assert row.tolist() == pytest.approx(reference_probs(row_logits.tolist(), 0.8, top_k=k), abs=1e-6)


@pytest.mark.parametrize("k", [0, 8, 50])
def test_top_k_off_or_larger_than_vocab(k):
    logits = torch.tensor([0.1, 0.9, -0.4, 1.2, 0.0, 0.3, -2.0, 0.5])
    probs = logits_to_probs(logits, SamplingConfig(temperature=1.0, top_k=k))
    torch.testing.assert_close(probs, logits.softmax(-1))


@pytest.mark.parametrize(
    "top_p, kept",
    [
        (0.1, {0}),  # below the top token's mass: the top token alone
        (0.45, {0}),
        (0.6, {0, 1}),  # 0.5 < 0.6 <= 0.5 + 0.3
        (0.85, {0, 1, 2}),  # 0.8 < 0.85 <= 0.95
        (0.97, {0, 1, 2, 3}),
        (1.0, {0, 1, 2, 3}),
    ],
)
def test_top_p_keeps_smallest_set_reaching_p(top_p, kept):
    base = [0.5, 0.3, 0.15, 0.05]
    logits = torch.tensor([math.log(x) for x in base])[[2, 0, 3, 1]]  # shuffled: token order != rank order
    probs = logits_to_probs(logits, SamplingConfig(temperature=1.0, top_p=top_p))
    kept_tokens = {i for i in range(4) if float(probs[i]) > 0}
    assert kept_tokens == {[2, 0, 3, 1].index(r) for r in kept}
    mass = sum(base[r] for r in kept)
    for r in kept:
        assert float(probs[[2, 0, 3, 1].index(r)]) == pytest.approx(base[r] / mass, abs=1e-6)


def test_top_p_random_rows_against_reference():
    gen = torch.Generator().manual_seed(3)
    for trial in range(60):
        logits = 2 * torch.randn(9, generator=gen)
        config = SamplingConfig(temperature=0.6 + 0.1 * (trial % 10), top_k=trial % 7, top_p=0.3 + 0.011 * trial)
        probs = logits_to_probs(logits, config)
        want = reference_probs(logits.tolist(), config.temperature, config.top_k, config.top_p)
        assert probs.tolist() == pytest.approx(want, abs=1e-5), config


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize(
    "config",
    [
        SamplingConfig(),
        SamplingConfig(temperature=1.0),
        SamplingConfig(temperature=0.5, top_k=10),
        SamplingConfig(temperature=1.3, top_p=0.7),
        SamplingConfig(temperature=0.9, top_k=20, top_p=0.9),
    ],
)
def test_float32_rows_summing_to_one(dtype, config):
    logits = (3 * torch.randn(2, 3, 50, generator=torch.Generator().manual_seed(0))).to(dtype)
    probs = logits_to_probs(logits, config)
    assert probs.dtype == torch.float32 and probs.shape == logits.shape
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, 3), rtol=0, atol=1e-5)
    assert bool((probs >= 0).all())


def test_sample_draws_from_each_row():
    probs = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    assert sample(probs, None).tolist() == [1, 2]
    assert sample(probs[0], None).shape == ()
    gen = torch.Generator().manual_seed(0)
    rows = torch.tensor([0.2, 0.5, 0.3]).expand(30_000, 3)
    counts = torch.bincount(sample(rows, gen), minlength=3).float() / 30_000
    torch.testing.assert_close(counts, torch.tensor([0.2, 0.5, 0.3]), rtol=0, atol=0.015)


def test_sample_never_draws_a_token_of_zero_mass():
    """Zero-mass tokens at both ends and in the middle (as top-k / top-p leave them)."""
    gen = torch.Generator().manual_seed(1)
    rows = torch.tensor([0.0, 0.25, 0.0, 0.75, 0.0]).expand(20_000, 5)
    drawn = sample(rows, gen)
    assert set(drawn.unique().tolist()) == {1, 3}
    assert abs(float((drawn == 3).float().mean()) - 0.75) < 0.015
    tiny = torch.zeros(3, 49152)
    tiny[:, -2] = 1e-30  # all the mass on one token next to the end, far below float rounding
    assert sample(tiny, gen).tolist() == [49150] * 3


# ------------------------------------------------------------------------------- validation
@pytest.mark.parametrize(
    "kwargs",
    [
        {"temperature": -0.1},
        {"temperature": -1},
        {"temperature": float("nan")},
        {"temperature": "1.0"},
        {"temperature": None},
        {"top_p": 0.0},
        {"top_p": 1.5},
        {"top_p": -0.2},
        {"top_p": float("nan")},
        {"top_p": "0.9"},
        {"top_k": -1},
        {"top_k": 1.5},
        {"top_k": True},
        {"top_k": "3"},
    ],
)
def test_sampling_config_rejects_bad_values(kwargs):
    with pytest.raises(DiffdraftError):
        SamplingConfig(**kwargs)


@pytest.mark.parametrize("kwargs", [{}, {"temperature": 0}, {"temperature": 0.7, "top_k": 5, "top_p": 1.0}, {"top_p": 1e-6}])
def test_sampling_config_accepts_good_values(kwargs):
    config = SamplingConfig(**kwargs)
    assert SamplingConfig.from_dict(config.to_dict()) == config
    assert config.greedy == (config.temperature == 0)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"draft_len": -1},
        {"draft_len": 65},
        {"draft_len": 2.0},
        {"draft_len": True},
        {"draft_len": "8"},
        {"verify": "greedy"},
        {"verify": "Rejection"},
        {"verify": ""},
    ],
)
def test_draft_config_rejects_bad_values(kwargs):
    with pytest.raises(DiffdraftError):
        DraftConfig(**kwargs)


@pytest.mark.parametrize("draft_len", [0, 1, 16, 64])
@pytest.mark.parametrize("verify", VERIFY_MODES)
def test_draft_config_accepts_good_values(draft_len, verify):
    config = DraftConfig(draft_len=draft_len, verify=verify)
    assert DraftConfig.from_dict(config.to_dict()) == config


@pytest.mark.parametrize("temperature", [2.1e-263, 1e-40, 1e-30, 1e-6])
def test_a_tiny_temperature_is_a_point_mass_on_the_best_tokens_not_nan(temperature):
    """Found by the fuzzer: logits / 2e-263 overflowed (and 2e-263 rounds to 0 in float32), giving NaN
    probabilities and an IndexError in the draw."""
    logits = torch.tensor([[1.0, 3.0, 2.0, 3.0], [0.5, -1.0, 0.25, 0.0]])
    sampling = SamplingConfig(temperature=temperature)
    probs = logits_to_probs(logits, sampling)
    assert torch.equal(probs, torch.tensor([[0.0, 0.5, 0.0, 0.5], [1.0, 0.0, 0.0, 0.0]]))
    assert torch.isfinite(logits_to_logprobs(logits, sampling)[probs > 0]).all()
    assert sample(probs, torch.Generator().manual_seed(0)).tolist()[1] == 0

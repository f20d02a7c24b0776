"""Training data: chat-formatted given answers, and a dataset of them written to resumable shards.

Uses the real SmolLM2 tokenizer (loaded without the model weights) for its chat template.
"""

from __future__ import annotations

import json

import pytest

from diffdraft.errors import DiffdraftError
from diffdraft.train.data import answer_sequence, build_dataset, encode_prompt, read_split


@pytest.fixture(scope="module")
def smol_tokenizer():
    from diffdraft.loading import load_model

    _, tokenizer = load_model(dtype="float32")
    return tokenizer


def test_answer_sequence_matches_the_chat_template(smol_tokenizer):
    seq = answer_sequence(smol_tokenizer, "Name a colour.", "Blue.", max_prompt_tokens=256, max_new_tokens=64)
    assert seq.tokens[: seq.prompt_len] == encode_prompt(smol_tokenizer, "Name a colour.", 256)
    response = smol_tokenizer.decode(seq.tokens[seq.prompt_len :])
    assert response.startswith("Blue.") and response.endswith(smol_tokenizer.eos_token)
    assert seq.tokens[-1] == smol_tokenizer.eos_token_id  # cut after the end of the turn
    short = answer_sequence(smol_tokenizer, "Name a colour.", "Blue " * 50, 256, max_new_tokens=5)
    assert len(short.tokens) - short.prompt_len == 5


def test_given_answers_dataset_and_resume(smol_tokenizer, tmp_path):
    exchanges = [(f"Question {i}?", f"Answer number {i}.") for i in range(10)]
    manifest = build_dataset(tmp_path, None, smol_tokenizer, num_prompts=10, eval_fraction=0.2, shard_size=4,
                             responses="sharegpt", exchanges=exchanges, progress=False)
    assert manifest["responses"] == "sharegpt" and manifest["train"]["sequences"] == 8
    assert manifest["eval"]["sequences"] == 2
    texts = {smol_tokenizer.decode(s.tokens[s.prompt_len :]) for s in read_split(tmp_path, "train")}
    assert len(texts) == 8 and all(t.startswith("Answer number") for t in texts)
    first = sorted(tmp_path.glob("train-*.safetensors"))[0]
    stamp = first.stat().st_mtime_ns
    again = build_dataset(tmp_path, None, smol_tokenizer, num_prompts=10, eval_fraction=0.2, shard_size=4,
                          responses="sharegpt", exchanges=exchanges, progress=False)
    assert first.stat().st_mtime_ns == stamp and again == json.loads((tmp_path / "manifest.json").read_text())


def test_bad_response_source_is_refused(smol_tokenizer, tmp_path):
    with pytest.raises(DiffdraftError, match="responses"):
        build_dataset(tmp_path, None, smol_tokenizer, num_prompts=1, responses="web")
    with pytest.raises(DiffdraftError, match="no answers"):
        build_dataset(tmp_path, None, smol_tokenizer, num_prompts=1, responses="sharegpt", prompts=["hi"])


def test_both_response_sources_split_prompts_alike(smol_tokenizer, tmp_path):
    """A prompt held out of one source's training data is held out of the other's: no leak into eval."""
    from diffdraft.train.data import split_prompts

    exchanges = [(f"Question {i}?", f"Answer {i}." if i % 3 else None) for i in range(20)]
    build_dataset(tmp_path, None, smol_tokenizer, num_prompts=20, eval_fraction=0.25, shard_size=8,
                  responses="sharegpt", exchanges=exchanges, progress=False)
    _, held_out = split_prompts([p for p, _ in exchanges], 0.25, 0)
    eval_prompts = {smol_tokenizer.decode(s.tokens[: s.prompt_len]) for s in read_split(tmp_path, "eval")}
    train_prompts = {smol_tokenizer.decode(s.tokens[: s.prompt_len]) for s in read_split(tmp_path, "train")}
    assert all(any(p in text for p in held_out) for text in eval_prompts)
    assert not any(p in text for p in held_out for text in train_prompts)
    assert len(train_prompts) + len(eval_prompts) == sum(1 for _, a in exchanges if a)

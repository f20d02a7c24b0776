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


def test_every_turn_of_a_conversation(monkeypatch, tmp_path):
    """turns="all": each user turn after the conversation so far; banned or broken conversations dropped."""
    from diffdraft.train import data

    conversations = [
        {"conversations": [{"from": "human", "value": "First question?"}, {"from": "gpt", "value": "First answer."},
                           {"from": "human", "value": "A follow-up?"}, {"from": "gpt", "value": "Second answer."},
                           {"from": "human", "value": "And a last one?"}]},
        {"conversations": [{"from": "human", "value": "A banned prompt"}, {"from": "gpt", "value": "x"},
                           {"from": "human", "value": "Other question"}]},
        {"conversations": [{"from": "gpt", "value": "starts with the model"}]},
    ]
    path = tmp_path / "sharegpt.json"
    path.write_text(json.dumps(conversations))
    monkeypatch.setattr(data, "sharegpt_file", lambda: path)
    monkeypatch.setattr(data, "benchmark_prompts", lambda: {"A banned prompt"})
    assert data.load_sharegpt_exchanges(turns="first") == [("First question?", "First answer.")]
    every = data.load_sharegpt_exchanges(turns="all")
    assert every == [
        ("First question?", "First answer."),
        ((("user", "First question?"), ("assistant", "First answer."), ("user", "A follow-up?")), "Second answer."),
        ((("user", "First question?"), ("assistant", "First answer."), ("user", "A follow-up?"),
          ("assistant", "Second answer."), ("user", "And a last one?")), None),
    ]
    with pytest.raises(DiffdraftError, match="turns"):
        data.load_sharegpt_exchanges(turns="some")


def test_a_conversation_stays_on_one_side_of_the_split():
    from diffdraft.train.data import split_prompts

    prompts = []
    for c in range(30):
        first = f"Conversation {c}?"
        prompts += [first, (("user", first), ("assistant", "ok"), ("user", "more?"))]
    train, held_out = split_prompts(prompts, 0.2, seed=1)
    firsts = lambda part: {p if isinstance(p, str) else p[0][1] for p in part}  # noqa: E731
    assert not firsts(train) & firsts(held_out) and len(train) + len(held_out) == 60 and len(held_out) == 12


def test_a_multi_turn_prompt_goes_through_the_chat_template(smol_tokenizer):
    prompt = (("user", "Name a colour."), ("assistant", "Blue."), ("user", "Another?"))
    seq = answer_sequence(smol_tokenizer, prompt, "Red.", max_prompt_tokens=256, max_new_tokens=64)
    text = smol_tokenizer.decode(seq.tokens[: seq.prompt_len])
    assert text.count("<|im_start|>user") == 2 and "Blue." in text and text.rstrip().endswith("<|im_start|>assistant")
    assert smol_tokenizer.decode(seq.tokens[seq.prompt_len :]).startswith("Red.")

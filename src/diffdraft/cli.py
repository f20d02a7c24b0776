"""Command line: `diffdraft generate`, `chat`, `serve`, `bench`, `data`, `train`, `calibrate`, `export` and
`dllm-train`.

Thin: parses arguments into the config dataclasses and calls the API. A DiffdraftError
becomes one line on stderr and exit code 2, Ctrl-C `diffdraft: interrupted` and 130, and any
other exception one line naming a file that holds the full report, exit code 1.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from diffdraft import arguments as types
from diffdraft import interrupts
from diffdraft.backends import BACKENDS, WEIGHTS
from diffdraft.config import (BEST_OBJECTIVE, DEFAULT_DRAFT_LEN, LENGTH_MODES, MAX_TREE_NODES, PROPOSAL_MODES,
                              TRAINABLE_KINDS, VERIFY_MODES, DraftConfig, SamplingConfig)
from diffdraft.drafters import DRAFTER_NAMES
from diffdraft.errors import DiffdraftError
from diffdraft.loading import DTYPES
from diffdraft.prompting import check_text


def add_model_args(parser: argparse.ArgumentParser, drafter: bool = True) -> None:
    """Options shared by every command that loads a target (and, with drafter=True, one drafter)."""
    group = parser.add_argument_group("model")
    group.add_argument("--model", default=None, help="smollm2 (default), a .gguf file or an HF model folder")
    group.add_argument("--dtype", default="float32", choices=list(DTYPES), help="target dtype (default float32)")
    group.add_argument("--backend", default="auto", choices=list(BACKENDS),
                       help="target runtime: lean (Llama family: static cache, row-invariant kernels), hf (any "
                            "model), or auto (lean where it can run the model; default)")
    weights_help = ("the lean runtime's decoder linears: native (a GGUF file's own 4-bit weights, int4 kernel), "
                    "int4 (float weights rounded to 4-bit groups of 32), float32 (the reference), or auto (native "
                    "for a GGUF model, float32 otherwise; default)")
    if drafter:
        group.add_argument("--weights", default="auto", choices=list(WEIGHTS), help=weights_help)
    else:  # the bench runs each choice side by side
        group.add_argument("--weights", nargs="+", default=["auto"], choices=list(WEIGHTS), metavar="WEIGHTS",
                           help=weights_help + "; several run side by side: the first with every drafter, "
                                "the others as plain decoding named plain:WEIGHTS")
    if drafter:
        group.add_argument(
            "--drafter", default=None, help=f"one of {', '.join(DRAFTER_NAMES)}, or a drafter folder (default auto: the shipped block-diffusion "
                 "drafter where it was trained for the model, n-gram elsewhere)"
        )
    group.add_argument("--early-exit-layers", type=types.positive_int, default=4, help="layers of the early-exit drafter")
    if drafter:
        group.add_argument("--threads", type=types.threads, default=None,
                           help="torch threads, at most the cores (default: every core)")


def add_dllm_args(parser: argparse.ArgumentParser, bench: bool = False) -> None:
    """Options that turn the target into a block-diffusion LM (docs/design.md, 'Diffusion-LM targets and SimSD')."""
    group = parser.add_argument_group(
        "diffusion-LM target",
        "decode with the target converted into a block-diffusion LM: its own blockwise decoding, and "
        "SimSD when a dLLM drafter is given" + (" (both side by side)" if bench else ""),
    )
    group.add_argument("--dllm", default=None, metavar="SPEC",
                       help="a converted dLLM folder (from `diffdraft dllm-train`), b4 or b8 for the shipped SmolLM2 "
                            "conversion, or 'base': the unconverted model with a fresh mask embedding, UNTRAINED "
                            "(its text is poor; it only exercises the path)")
    group.add_argument("--dllm-drafter", default=None, metavar="SPEC",
                       help="a dLLM drafter folder (from `diffdraft dllm-train --layers N`), or b4 / b8 for the "
                            "shipped SmolLM2 drafter: decode with SimSD")
    group.add_argument("--dllm-drafter-layers", type=types.positive_int, default=None, metavar="N",
                       help="draft with the dLLM target's own first N layers (untrained as a drafter)")
    group.add_argument("--dllm-block-size", type=types.positive_int, default=None, metavar="B",
                       help="block size of --dllm base (default 4); with a folder it must match the folder's")
    group.add_argument("--dllm-steps", type=types.positive_int, default=None, metavar="S",
                       help="denoising steps per block (default: the block size, one slot per step)")


def add_decoding_args(parser: argparse.ArgumentParser, serving: bool = False) -> None:
    """Drafting and sampling options; a server takes only the drafting ones (sampling comes per request)."""
    group = parser.add_argument_group("decoding")
    group.add_argument("--draft-len", type=types.int_in(0, 64), default=DEFAULT_DRAFT_LEN,
                       help=f"the most tokens drafted per step, g (default {DEFAULT_DRAFT_LEN})")
    group.add_argument("--length", default="auto", choices=LENGTH_MODES,
                       help="auto (default): verify the number of drafted tokens that maximizes expected tokens/s "
                            "from this machine's measured costs and the drafter's calibrated confidences; fixed: "
                            "verify all g. Lossless either way")
    group.add_argument("--tree", type=types.int_in(0, MAX_TREE_NODES), default=0, metavar="N",
                       help="verify a draft tree of up to N nodes grown from the drafter's alternatives per slot "
                            "(block-diffusion drafters, lean runtime; at T > 0 with --verify point-mass), sized "
                            "by the length rule; 0 (default): a chain")
    group.add_argument("--proposals", default="sample", choices=PROPOSAL_MODES,
                       help="above temperature 0: draw each slot from the drafter's q (sample, default) or propose "
                            "its most likely token (argmax). Lossless either way")
    group.add_argument("--verify", default="auto", choices=VERIFY_MODES, help="verification mode (default auto)")
    group.add_argument("--min-confidence", type=types.fraction, default=0.0,
                       help="instead of --length auto: verify only the draft prefix the drafter is this sure of "
                            "(product of its per-slot confidences); 0 = off (default). Lossless either way")
    if serving:
        return
    group.add_argument("--temperature", type=types.non_negative_float, default=0.0, help="0 = greedy (default)")
    group.add_argument("--top-k", type=types.non_negative_int, default=0, help="0 = off")
    group.add_argument("--top-p", type=types.probability_mass, default=1.0, help="1.0 = off")
    group.add_argument("--seed", type=types.seed, default=0)
    group.add_argument("--max-new-tokens", type=types.positive_int, default=256)


def decoding_configs(args: argparse.Namespace) -> tuple[SamplingConfig, DraftConfig]:
    sampling = SamplingConfig(temperature=getattr(args, "temperature", 0.0), top_k=getattr(args, "top_k", 0),
                              top_p=getattr(args, "top_p", 1.0))
    draft = DraftConfig(draft_len=args.draft_len, verify=args.verify, length=args.length,
                        min_confidence=args.min_confidence, proposals=args.proposals, tree=args.tree)
    return sampling, draft


def _load(args: argparse.Namespace):
    from diffdraft.api import DEFAULT_DRAFTER, load

    return load(args.model, drafter=args.drafter or DEFAULT_DRAFTER, dtype=args.dtype, backend=args.backend,
                early_exit_layers=args.early_exit_layers, threads=getattr(args, "threads", None), weights=args.weights)


def _dllm_only_options(args: argparse.Namespace) -> None:
    """The dLLM options are refused without --dllm (they would be silently ignored)."""
    given = [flag for flag, value in (("--dllm-drafter", args.dllm_drafter), ("--dllm-drafter-layers",
             args.dllm_drafter_layers), ("--dllm-block-size", args.dllm_block_size), ("--dllm-steps", args.dllm_steps))
             if value is not None]
    if given and args.dllm is None:
        raise DiffdraftError(f"{', '.join(given)} need --dllm")
    weights = args.weights if isinstance(args.weights, list) else [args.weights]
    if args.dllm is not None and set(weights) - {"auto", "float32"}:
        raise DiffdraftError("--dllm runs the converted model's own module in float32: leave --weights out")


STOP_REASONS = {"eos": "end of answer", "length": "--max-new-tokens reached", "context": "the model context is full"}


def read_prompt(arg: str) -> str:
    """The prompt from argv, or from standard input for '-', refused unless it is valid UTF-8 and not empty."""
    if arg == "-":
        raw = getattr(sys.stdin, "buffer", None)  # bytes where there are bytes (a text stream when embedded)
        try:
            arg = raw.read().decode("utf-8") if raw is not None else sys.stdin.read()
        except UnicodeDecodeError as err:
            raise DiffdraftError(f"the prompt on standard input is not valid UTF-8 (byte {err.start})") from None
    if not check_text(arg).strip():
        raise DiffdraftError("the prompt is empty")
    return arg


def stopped(reason: str) -> str:
    return f", stopped: {STOP_REASONS.get(reason, reason)}"


def cmd_generate(args: argparse.Namespace) -> int:
    prompt = read_prompt(args.prompt)
    sampling, draft = decoding_configs(args)  # validate before the slow model load
    if args.max_new_tokens <= 0:
        raise DiffdraftError(f"max-new-tokens must be positive, got {args.max_new_tokens}")
    _dllm_only_options(args)
    if args.dllm is not None:
        return _generate_dllm(args, prompt, sampling)
    pipe = _load(args)
    answer = pipe.generate(
        prompt, max_new_tokens=args.max_new_tokens, sampling=sampling, draft=draft, seed=args.seed,
        on_text=lambda text: print(text, end="", flush=True),
    )
    print()
    print(f"[{pipe.drafter_name}, g={draft.draft_len}; {pipe.target.runtime}] {answer.stats.summary()}{_lengths(answer.stats)}"
          f"{stopped(answer.stop_reason)}", file=sys.stderr)
    return 0


def _lengths(stats) -> str:
    """The chosen draft lengths, when the length rule chose them."""
    return f", verified lengths {stats.length_histogram()}" if stats.cost_curve else ""


def _load_dllm(args: argparse.Namespace):
    from diffdraft.api import load_dllm_pipeline, use_threads

    if args.drafter is not None:
        raise DiffdraftError("--drafter drafts for the autoregressive target; with --dllm use --dllm-drafter "
                             "or --dllm-drafter-layers")
    use_threads(getattr(args, "threads", None))
    return load_dllm_pipeline(args.model, dllm=args.dllm, drafter=args.dllm_drafter,
                              drafter_layers=args.dllm_drafter_layers, block_size=args.dllm_block_size,
                              steps=args.dllm_steps, verify=args.verify, dtype=args.dtype, backend=args.backend)


def _generate_dllm(args: argparse.Namespace, prompt: str, sampling: SamplingConfig) -> int:
    from diffdraft.dllm.runner import summary

    pipe = _load_dllm(args)
    answer = pipe.generate(prompt, max_new_tokens=args.max_new_tokens, sampling=sampling, seed=args.seed,
                           on_text=lambda text: print(text, end="", flush=True))
    print()
    print(f"[{pipe.runner.describe()}] {summary(answer.dllm, answer.stats)}{stopped(answer.stop_reason)}",
          file=sys.stderr)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    sampling, draft = decoding_configs(args)
    pipe = _load(args)
    messages: list[dict] = []
    print("diffdraft chat: an empty line or Ctrl-D ends the session.", file=sys.stderr)
    while True:
        try:
            line = input("you> ")
        except EOFError:
            break
        if not line.strip():
            break
        messages.append({"role": "user", "content": line})
        try:
            ids = pipe.prompt_ids(messages)
        except DiffdraftError as err:  # this line is refused; the session goes on without it
            messages.pop()
            print(f"diffdraft: error: {' '.join(str(err).split())}", file=sys.stderr)
            continue
        print("assistant> ", end="", flush=True)
        answer = pipe.generate_ids(
            ids, max_new_tokens=args.max_new_tokens, sampling=sampling, draft=draft, seed=args.seed,
            on_text=lambda text: print(text, end="", flush=True),
        )
        print()
        print(f"[{answer.stats.summary()}{stopped(answer.stop_reason)}]", file=sys.stderr)
        messages.append({"role": "assistant", "content": answer.text})
    return 0


def default_kv_memory_mb() -> int:
    """Half of this machine's physical memory, in MiB (4 GiB where it cannot be read)."""
    try:
        return max(1, os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2 // 2**20)
    except (ValueError, OSError, AttributeError):
        return 4096


def served_name(model: str | None) -> str:
    """The model id clients send by default: a short name, never a path (a file's stem, a folder's name)."""
    if model is None:
        return "smollm2"
    path = Path(model)
    if path.is_file():
        return path.stem
    return path.resolve().name if path.is_dir() else model


def cmd_serve(args: argparse.Namespace) -> int:
    from diffdraft.serve import ServerSettings, run

    _, draft = decoding_configs(args)
    _dllm_only_options(args)
    api_key = args.api_key if args.api_key is not None else os.environ.get("DIFFDRAFT_API_KEY")
    auto_batch = args.max_batch == "auto"

    def settings_with(max_batch: int):
        return ServerSettings(model_name=args.served_model_name or served_name(args.model), api_key=api_key or None,
                              queue_limit=args.queue_limit, request_timeout_s=args.request_timeout,
                              max_body_bytes=args.max_body_bytes, default_max_tokens=args.default_max_tokens,
                              workers=args.workers, max_batch=max_batch,
                              kv_memory_bytes=(args.kv_memory if args.kv_memory is not None else default_kv_memory_mb())
                              * 2**20)

    settings = settings_with(1 if auto_batch else args.max_batch)  # refuses bad settings before the slow load
    if args.threads is None:  # the cores are shared among the workers: no more torch threads than cores
        args.threads = max(1, (os.cpu_count() or 1) // settings.workers)
    if args.dllm is not None:
        pipe = _load_dllm(args)
    else:
        pipe = _load(args)
        pipe.decoder(draft)  # measure the costs for the length rule now, not in the first request
    if auto_batch and args.workers == 1:
        settings = settings_with(pipe.auto_max_batch())
    print(f"diffdraft serve: {settings.model_name} with {pipe.describe} ({pipe.target.runtime}) on http://{args.host}:{args.port}/v1"
          f"{' (API key required)' if api_key else ''}; "
          + (f"batches of up to {settings.max_batch} requests x {args.threads} thread(s)" if settings.max_batch > 1
             else f"{settings.workers} worker(s) x {args.threads} thread(s)"),
          file=sys.stderr)
    run(pipe, settings, draft, host=args.host, port=args.port, log_level=args.log_level)
    return 0


def check_device(name: str) -> None:
    """A torch device this machine has, before anything loads; one line where it has not."""
    import torch

    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise DiffdraftError(f"--device {name!r} is not a device: {err}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DiffdraftError(f"--device {name}: this torch has no CUDA device here (torch {torch.__version__})")
    if device.type not in ("cpu", "cuda"):
        raise DiffdraftError(f"--device {name}: only cpu and cuda are supported")


def cmd_data(args: argparse.Namespace) -> int:
    from diffdraft.loading import load_model
    from diffdraft.train.data import build_dataset, load_prompts_file

    temperatures = args.temperatures
    check_device(args.device)
    model, tokenizer = load_model(args.model, dtype=args.dtype)
    model.to(args.device)
    prompts = load_prompts_file(args.prompts) if args.prompts else None
    manifest = build_dataset(
        args.out, model, tokenizer, num_prompts=args.num_prompts, temperatures=temperatures,
        eval_fraction=args.eval_fraction, shard_size=args.shard_size, batch_size=args.batch_size,
        max_prompt_tokens=args.max_prompt_tokens, max_new_tokens=args.max_new_tokens, seed=args.seed,
        prompts=prompts, responses=args.responses, turns=args.turns,
    )
    print(f"train: {manifest['train']}  eval: {manifest['eval']}  ->  {args.out}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from diffdraft.config import TrainConfig
    from diffdraft.train.trainer import train

    check_device(args.device)
    cfg = TrainConfig(
        data=args.data, out=args.out, model=args.model, num_layers=args.layers, block_size=args.block_size,
        tap_layers=args.tap_layers,
        blocks_per_sequence=args.blocks, batch_size=args.batch_size, max_len=args.max_len, steps=args.steps,
        lr=args.lr, warmup_steps=args.warmup, gamma=None if args.gamma <= 0 else args.gamma,
        eval_every=args.eval_every, eval_sequences=args.eval_sequences, save_every=args.save_every, seed=args.seed,
        device=args.device, amp=args.amp, save_dtype=args.save_dtype, draft_vocab=args.draft_vocab,
        kind=args.kind, mask_token_id=args.mask_token_id, init_from=args.init_from, eval_data=args.eval_data,
        focal_lambda=args.focal_lambda, chain_weight=args.chain_weight,
        align_fraction=args.align_fraction, align_alpha=args.align_alpha, align_max_masked=args.align_max_masked,
        distill_weight=args.distill_weight,
    )
    result = train(cfg)
    print(f"drafter written to {args.out}/drafter  (simulated tau {result.get('sim_tau', float('nan')):.3f})")
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    from diffdraft.api import load
    from diffdraft.drafters import BlockDiffusionDrafter
    from diffdraft.drafters.checkpoint import is_checkpoint, update_config
    from diffdraft.train.calibrate import calibrate
    from diffdraft.train.data import read_split

    if not is_checkpoint(args.drafter):
        raise DiffdraftError(f"{args.drafter} is not a diffdraft drafter folder (calibration is stored in drafter.json)")
    if args.sequences < 1:
        raise DiffdraftError(f"--sequences must be at least 1, got {args.sequences}")
    sequences = read_split(args.data, "eval")[: args.sequences]
    pipe = load(args.model, drafter=args.drafter)
    drafter = pipe.drafter
    if not isinstance(drafter, BlockDiffusionDrafter):
        raise DiffdraftError(f"calibration is for block-diffusion drafters, {args.drafter} holds a {drafter.name} one")
    best, curve = calibrate(drafter, pipe.target, sequences, temperature=args.temperature, seed=args.seed)
    for scale, value in curve.items():
        print(f"q scale {scale:5.3f}: expected accepted draft tokens per block {value:.4f}"
              f"{'  <- best' if scale == best else ''}")
    update_config(args.drafter, {"q_scale": best, "q_scale_curve": {f"{s:.4f}": round(v, 5) for s, v in curve.items()},
                                 "q_scale_temperature": args.temperature})
    print(f"q scale {best:.3f} written to {args.drafter} (was {drafter.q_scale:.3f}; 1.0 is uncalibrated)")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from diffdraft.drafters import SHIPPED_DRAFTER
    from diffdraft.drafters.dflash import check_dflash_folder, export_dflash

    folder = SHIPPED_DRAFTER if args.drafter == "block-diffusion" else args.drafter
    config = export_dflash(folder, args.out, dtype=args.dtype)
    problems = check_dflash_folder(args.out)
    if problems:  # a bug here, not the user's: say so plainly
        raise DiffdraftError(f"the exported folder fails the DFlash checks: {problems[0]}")
    sub = config["dflash_config"]
    print(f"DFlash drafter written to {args.out}: {config['num_hidden_layers']} layers, block size "
          f"{config['block_size']}, target_layer_ids {sub['target_layer_ids']}, mask_token_id {sub['mask_token_id']}")
    return 0


def cmd_dllm_train(args: argparse.Namespace) -> int:
    from diffdraft.dllm.train import DLLMTrainConfig, train_dllm

    cfg = DLLMTrainConfig(
        data=args.data, out=args.out, model=args.model, block_size=args.block_size, num_layers=args.layers,
        rank=args.rank, alpha=args.alpha, init_from=args.init_from, batch_size=args.batch_size, max_len=args.max_len,
        steps=args.steps, lr=args.lr, warmup_steps=args.warmup, eval_every=args.eval_every,
        eval_sequences=args.eval_sequences, save_every=args.save_every, seed=args.seed, device=args.device,
        amp=args.amp, save_dtype=args.save_dtype,
    )
    result = train_dllm(cfg)
    print(f"adapters written to {args.out}/adapter  (held-out masked loss {result.get('eval_loss', float('nan'))})")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from diffdraft.bench import BenchConfig, report, run_bench

    _dllm_only_options(args)
    if args.report_only:
        results = report(args.out)
    else:
        dllm = args.dllm is not None  # a dLLM run compares the dLLM's decoders: no AR drafters or peers unless asked
        drafters = args.drafters if args.drafters is not None else ([] if dllm else ["ngram", "early-exit"])
        peers = args.peers if args.peers is not None else (["none"] if dllm else None)
        config = BenchConfig(
            suite=args.suite, out=args.out, limit=args.limit,
            categories=tuple(c for c in args.categories.split(",") if c) if args.categories else None,
            turn=args.turn, model=args.model, dtype=args.dtype, backend=args.backend, drafters=tuple(drafters),
            weights=tuple(args.weights),
            peers=None if peers is None else tuple(p for p in peers if p != "none"),
            draft_len=args.draft_len, verify=args.verify, early_exit_layers=args.early_exit_layers,
            temperatures=tuple(args.temperatures), max_new_tokens=args.max_new_tokens, repeats=args.repeats,
            warmup=not args.no_warmup, seed=args.seed, threads=args.threads, progress=not args.no_progress,
            command=" ".join(["diffdraft", *sys.argv[1:]]), dllm=args.dllm, dllm_drafter=args.dllm_drafter,
            dllm_drafter_layers=args.dllm_drafter_layers, dllm_block_size=args.dllm_block_size,
            dllm_steps=args.dllm_steps,
        )
        if args.concurrency:
            return _bench_concurrency(config, args.concurrency)
        results = run_bench(config)
    for t, summary in results["temperatures"].items():
        overall = summary["figures"].get("all", {})
        for name in summary["decoders"]:
            f = overall.get(name)
            if f is None:
                continue
            eq = summary.get("equality", {}).get(name)
            ref = summary.get("references", {}).get(name, "plain")
            same = f", equal {eq['equal']}/{eq['total']}" if eq else ""
            print(f"T={t} {name:18s} tau {f['tau']:.2f}  {f['tokens_per_s']['median_time']:.1f} tok/s  "
                  f"speedup {f['speedup']['median_time']:.2f}x{'' if ref == 'plain' else ' vs ' + ref}  "
                  f"TTFT {f['ttft_s']['median_time'] * 1000:.0f} ms{same}")
    bugs = sum(len(s.get("bugs", [])) for s in results["temperatures"].values())
    print(f"results in {args.out}/results.json, .md and .png; engine and dLLM outputs differing from their "
          f"reference (plain, or the dLLM's own decoding): {bugs}")
    return 1 if bugs else 0


def _bench_concurrency(config, levels: list[int]) -> int:
    """bench --concurrency: every decoder at every level, through one continuous batch each (bench.concurrency)."""
    from diffdraft.bench.concurrency import check_levels, run_concurrency
    from diffdraft.bench.runner import select_prompts

    if config.dllm is not None or config.peers:
        raise DiffdraftError("--concurrency batches the engine's decoders: no --dllm and no peers")
    check_levels(levels)
    config.validate()
    results = run_concurrency(config, select_prompts(config), levels)
    unequal = 0
    for t, figures in results["temperatures"].items():
        for level in results["levels"]:
            for name, by_level in figures.items():
                f = by_level[level]
                print(f"T={t} C={level:<3d} {name:18s} {f['tokens_per_s']:7.1f} tok/s  "
                      f"{f['speedup_vs_plain_same_c']:.2f}x plain at C={level}  tau {f['tau']:.2f}  "
                      f"latency p50 {f['latency_p50_s']:.2f} s  {f['rows_per_step']:.1f} rows/step  "
                      f"equal {f['equal_to_plain']}/{f['requests']}")
                unequal += float(t) == 0 and f["equal_to_plain"] != f["requests"]
    print(f"results in {config.out}/concurrency.json and .md; greedy answers differing from plain at "
          f"C={results['levels'][0]}: {unequal}")
    return 1 if unequal else 0


def build_parser() -> argparse.ArgumentParser:
    parser = types.OneLineParser(prog="diffdraft", description="Lossless speculative decoding.")
    commands = parser.add_subparsers(dest="command", required=True)

    generate = commands.add_parser("generate", help="answer one prompt, streaming the text")
    generate.add_argument("prompt", help="the user prompt ('-' reads standard input)")
    add_model_args(generate)
    add_decoding_args(generate)
    add_dllm_args(generate)
    generate.set_defaults(func=cmd_generate)

    chat = commands.add_parser("chat", help="a multi-turn session in the terminal")
    add_model_args(chat)
    add_decoding_args(chat)
    chat.set_defaults(func=cmd_chat)

    serve = commands.add_parser("serve", help="an OpenAI-compatible HTTP server (chat and completions, streaming)")
    add_model_args(serve)
    add_decoding_args(serve, serving=True)
    add_dllm_args(serve)
    net = serve.add_argument_group("server")
    net.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    net.add_argument("--port", type=types.port, default=8000)
    net.add_argument("--api-key", default=None,
                     help="require 'Authorization: Bearer KEY' on /v1 and /metrics; /health stays open "
                          "(default: $DIFFDRAFT_API_KEY, else none)")
    net.add_argument("--served-model-name", default=None,
                     help="the model id clients send (default: a short name: smollm2, or the --model file's stem or "
                          "folder's name, never its path)")
    net.add_argument("--queue-limit", type=types.positive_int, default=16, help="requests that may wait; beyond, 429 (default 16)")
    net.add_argument("--workers", type=types.positive_int, default=1,
                     help="requests generated at once, each on its own thread sharing the loaded weights; the "
                          "cores are split among them unless --threads is given (default 1)")
    net.add_argument("--max-batch", type=types.positive_int_or_auto, default="auto",
                     help="requests decoded together, every step one target forward over all of their rows, each "
                          "answer exactly what it would be alone; 1: one request per worker thread (--workers); "
                          "auto: the fewest that reach 90%% of the best throughput of this machine's measured "
                          "forward costs, or 1 with --workers > 1 or a decoder that does not batch (default auto)")
    net.add_argument("--kv-memory", type=types.positive_int, default=None, metavar="MIB",
                     help="MiB of KV cache the batched requests may reserve together (each reserves what its prompt "
                          "and max_tokens need); a request waits until it fits, and one that never could answers "
                          "503 (default: half of this machine's memory)")
    net.add_argument("--request-timeout", type=types.positive_float, default=600.0,
                     help="seconds a request may take, waiting included; generation stops there (default 600)")
    net.add_argument("--max-body-bytes", type=types.positive_int, default=1 << 20, help="largest request body (default 1 MiB)")
    net.add_argument("--default-max-tokens", type=types.positive_int, default=512,
                     help="new tokens when a request gives no max_tokens (default 512, within the context)")
    net.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    serve.set_defaults(func=cmd_serve)

    bench = commands.add_parser("bench", help="benchmark decoders and peers side by side on a prompt suite")
    bench.add_argument("--suite", default="mt-bench", help="mt-bench (default), alpaca-eval, or a .jsonl prompt file")
    bench.add_argument("--out", default="bench-out", help="output folder; an interrupted run there resumes")
    bench.add_argument("--limit", type=types.positive_int, default=None, help="prompts to run (AlpacaEval: seeded 80 by default)")
    bench.add_argument("--categories", default=None, help="comma-separated categories to keep")
    bench.add_argument("--turn", type=types.positive_int, default=1, choices=(1, 2), help="MT-Bench turn to answer (default 1)")
    add_model_args(bench, drafter=False)
    bench.add_argument("--drafters", nargs="*", default=None, metavar="SPEC",
                       help="drafters beside plain decoding: names or folders, SPEC@G for its own draft length "
                            "(default: ngram early-exit; none with --dllm)")
    bench.add_argument("--peers", nargs="*", default=None, metavar="PEER",
                       help="hf-generate hf-prompt-lookup llama.cpp (default: every one installed, none with --dllm; "
                            "'none' for none)")
    bench.add_argument("--draft-len", type=types.int_in(0, 64), default=DEFAULT_DRAFT_LEN,
                       help=f"tokens drafted per step, g (default {DEFAULT_DRAFT_LEN})")
    bench.add_argument("--verify", default="auto", choices=VERIFY_MODES, help="verification mode (default auto)")
    bench.add_argument("--temperatures", type=types.non_negative_float, nargs="+", default=[0.0, 1.0], help="default: 0 1")
    bench.add_argument("--max-new-tokens", type=types.positive_int, default=128)
    bench.add_argument("--repeats", type=types.positive_int, default=1, help="timed runs per decoder and prompt (min/median)")
    bench.add_argument("--no-warmup", action="store_true", help="skip the untimed warm-up run of each decoder")
    bench.add_argument("--seed", type=types.seed, default=0)
    bench.add_argument("--threads", type=types.threads, default=None, help="torch and llama.cpp threads")
    bench.add_argument("--no-progress", action="store_true")
    bench.add_argument("--report-only", action="store_true", help="only rebuild the reports from --out")
    bench.add_argument("--concurrency", type=types.positive_int, nargs="+", default=None, metavar="C",
                       help="instead: each decoder at each number of requests in flight, batched "
                            "(total and per-request tok/s, latency p50/p95); e.g. 1 4 8 16")
    add_dllm_args(bench, bench=True)
    bench.set_defaults(func=cmd_bench)

    data = commands.add_parser("data", help="build a training set: ShareGPT prompts, answers regenerated by the target")
    data.add_argument("--out", required=True, help="output folder for the shards (resumes if it exists)")
    data.add_argument("--model", default=None, help="target: smollm2 (default), a .gguf file or an HF folder")
    data.add_argument("--dtype", default="float32", choices=list(DTYPES))
    data.add_argument("--device", default="cpu")
    data.add_argument("--prompts", default=None, help="a JSON list of prompts instead of ShareGPT's")
    data.add_argument("--num-prompts", type=types.positive_int, default=2000)
    data.add_argument("--temperatures", type=types.float_list, default=(0.0, 0.8),
                      help="comma-separated; shards alternate between them (default 0,0.8)")
    data.add_argument("--responses", default="regenerate", choices=["regenerate", "sharegpt"],
                      help="regenerate: the target answers (default); sharegpt: ShareGPT's own answers, "
                           "tokenised only (fast, more text, not the target's distribution)")
    data.add_argument("--turns", default="first", choices=["first", "all"],
                      help="first: each conversation's first user turn (default); all: every user turn, after the "
                           "conversation so far (more, longer-context data; a conversation stays on one side of "
                           "the train/held-out split)")
    data.add_argument("--eval-fraction", type=types.open_fraction, default=0.02,
                      help="share of the conversations held out, between 0 and 1 (default 0.02)")
    data.add_argument("--shard-size", type=types.positive_int, default=256)
    data.add_argument("--batch-size", type=types.positive_int, default=32)
    data.add_argument("--max-prompt-tokens", type=types.positive_int, default=256)
    data.add_argument("--max-new-tokens", type=types.positive_int, default=256)
    data.add_argument("--seed", type=types.seed, default=0)
    data.set_defaults(func=cmd_data)

    tr = commands.add_parser("train", help="train a block-diffusion drafter on a `diffdraft data` folder")
    tr.add_argument("--data", required=True)
    tr.add_argument("--out", required=True, help="run folder; an existing checkpoint there is resumed")
    tr.add_argument("--model", default=None)
    tr.add_argument("--layers", type=types.positive_int, default=2)
    tr.add_argument("--block-size", type=types.positive_int, default=16)
    tr.add_argument("--tap-layers", type=types.int_list, default=None,
                    help="comma-separated target layers (default 1,L/2,L-3)")
    tr.add_argument("--blocks", type=types.positive_int, default=16, help="blocks per sequence per step")
    tr.add_argument("--batch-size", type=types.positive_int, default=8)
    tr.add_argument("--max-len", type=types.positive_int, default=512)
    tr.add_argument("--steps", type=types.positive_int, default=1000)
    tr.add_argument("--lr", type=types.positive_float, default=6e-4)
    tr.add_argument("--warmup", type=types.non_negative_int, default=50)
    tr.add_argument("--gamma", type=types.finite_float, default=7.0, help="positional weighting; <= 0 for uniform")
    tr.add_argument("--eval-every", type=types.positive_int, default=100)
    tr.add_argument("--eval-sequences", type=types.positive_int, default=64)
    tr.add_argument("--save-every", type=types.positive_int, default=100)
    tr.add_argument("--seed", type=types.seed, default=0)
    tr.add_argument("--device", default="cpu")
    tr.add_argument("--amp", default="auto", choices=["auto", "bfloat16", "float16", "float32"],
                    help="autocast dtype (auto: bfloat16 on CUDA, float32 on CPU)")
    tr.add_argument("--save-dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    tr.add_argument("--draft-vocab", type=types.non_negative_int, default=0,
                    help="draft only the N most frequent training tokens (cheaper head); 0 = full vocabulary")
    tr.add_argument("--kind", default="dflash", choices=list(TRAINABLE_KINDS),
                    help="dflash (default: reads target features, DFlash's layout, exportable to vLLM and SGLang), "
                         "block-diffusion (the original layout: a learned MASK vector, no q/k norms) or "
                         "masked-diffusion (standalone)")
    tr.add_argument("--mask-token-id", type=types.non_negative_int, default=None,
                    help="dflash: the target token fed as MASK (default: the tokenizer's mask token, an unused "
                         "embedding row, or a special token the chat never writes)")
    tr.add_argument("--init-from", default=None, help="a drafter folder of the same kind to start from")
    tr.add_argument("--eval-data", default=None,
                    help="evaluate on this data folder's held-out shards (e.g. regenerated data while training "
                         "on ShareGPT's own answers)")
    objective = tr.add_argument_group("objective (block-diffusion; composable)")
    best = BEST_OBJECTIVE  # the objective ablation's best row (results/ablation-mtbench)
    objective.add_argument("--focal-lambda", type=types.non_negative_float, default=None,
                           help=f"extra weight on each block's first error (default {best['focal_lambda']:g}; 0 for none)")
    objective.add_argument("--chain-weight", type=types.non_negative_float, default=None,
                           help=f"weight of the chain loss (default {best['chain_weight']:g}; 0 for none)")
    objective.add_argument("--distill-weight", type=types.non_negative_float, default=0.0,
                           help="weight of the KL to the target's full next-token distribution at each slot "
                                "(soft labels beside the hard ones; default 0)")
    objective.add_argument("--align-fraction", type=types.fraction, default=0.0,
                           help="last fraction of the steps run as stage II of the two-stage alignment")
    objective.add_argument("--align-alpha", type=types.positive_float, default=1.01)
    objective.add_argument("--align-max-masked", type=types.positive_int, default=96)
    tr.set_defaults(func=cmd_train)

    cal = commands.add_parser("calibrate", help="fit a block-diffusion drafter's q for sampling on held-out data")
    cal.add_argument("drafter", help="a drafter folder (the scale is written into its drafter.json)")
    cal.add_argument("--data", required=True, help="a `diffdraft data` folder: its held-out shards are used")
    cal.add_argument("--model", default=None, help="target: smollm2 (default), a .gguf file or an HF folder")
    cal.add_argument("--temperature", type=types.positive_float, default=1.0, help="the sampling temperature to fit for (default 1)")
    cal.add_argument("--sequences", type=types.positive_int, default=64, help="held-out sequences to use (default 64)")
    cal.add_argument("--seed", type=types.seed, default=0)
    cal.set_defaults(func=cmd_calibrate)

    ex = commands.add_parser("export", help="write a drafter in another engine's format (DFlash: vLLM, SGLang)")
    ex.add_argument("drafter", help="a drafter folder (from `diffdraft train --kind dflash`)")
    ex.add_argument("--format", default="dflash", choices=["dflash"], help="dflash (default)")
    ex.add_argument("--out", required=True, help="the folder to write (replaced whole if it exists)")
    ex.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"],
                    help="stored weight dtype (default bfloat16, as the engines serve it)")
    ex.set_defaults(func=cmd_export)

    dt = commands.add_parser("dllm-train", help="convert the target into a block-diffusion LM (LoRA), or train a dLLM drafter")
    dt.add_argument("--data", required=True, help="a `diffdraft data` folder")
    dt.add_argument("--out", required=True, help="run folder; an existing checkpoint there is resumed")
    dt.add_argument("--model", default=None)
    dt.add_argument("--block-size", type=types.positive_int, default=4)
    dt.add_argument("--layers", type=types.positive_int, default=None, help="train a drafter of the first N layers (default: all)")
    dt.add_argument("--rank", type=types.positive_int, default=8, help="LoRA rank")
    dt.add_argument("--alpha", type=types.positive_float, default=16.0, help="LoRA alpha")
    dt.add_argument("--init-from", default=None, help="start from a converted dLLM folder (e.g. the target's adapter)")
    dt.add_argument("--batch-size", type=types.positive_int, default=16)
    dt.add_argument("--max-len", type=types.positive_int, default=512)
    dt.add_argument("--steps", type=types.positive_int, default=1000)
    dt.add_argument("--lr", type=types.positive_float, default=3e-4)
    dt.add_argument("--warmup", type=types.non_negative_int, default=50)
    dt.add_argument("--eval-every", type=types.positive_int, default=100)
    dt.add_argument("--eval-sequences", type=types.positive_int, default=64)
    dt.add_argument("--save-every", type=types.positive_int, default=100)
    dt.add_argument("--seed", type=types.seed, default=0)
    dt.add_argument("--device", default="cpu")
    dt.add_argument("--amp", default="auto", choices=["auto", "bfloat16", "float16", "float32"],
                    help="autocast dtype (auto: bfloat16 on CUDA, float32 on CPU)")
    dt.add_argument("--save-dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    dt.set_defaults(func=cmd_dllm_train)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as stop:  # --help (0), or a bad value, already told in one line (2)
        return stop.code if isinstance(stop.code, int) else 2
    try:
        code = args.func(args)
        if interrupts.happened():  # a Ctrl-C that a library swallowed while the command went on
            print("\ndiffdraft: interrupted", file=sys.stderr)
            return 130
        return code
    except DiffdraftError as err:
        message = " ".join(str(err).split())  # always one line, whatever the cause's text held
        print(f"diffdraft: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ndiffdraft: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # unforeseen: the whole report goes to a file, one line to the terminal
        if interrupts.happened():  # a Ctrl-C that a library swallowed, leaving this failure behind it
            print("\ndiffdraft: interrupted", file=sys.stderr)
            return 130
        where = write_crash_report(argv)
        message = " ".join(str(err).split())[:300]
        print(f"diffdraft: internal error: {type(err).__name__}: {message} (full report: {where})", file=sys.stderr)
        return 1


def write_crash_report(argv: list[str] | None) -> str:
    """The traceback being handled, the command line and the versions, written to a new file in the cache
    folder's logs/ (or the temporary folder); returns where."""
    import platform
    import tempfile
    import time
    import traceback

    from diffdraft.loading import cache_dir

    text = (f"diffdraft {' '.join(sys.argv[1:] if argv is None else argv)}\n"
            f"python {platform.python_version()} on {platform.platform()}\n\n{traceback.format_exc()}")
    name = f"crash-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.txt"
    for folder in (cache_dir() / "logs", Path(tempfile.gettempdir())):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            (folder / name).write_text(text)
            return str(folder / name)
        except OSError:
            continue
    return "nowhere (the cache and temporary folders could not be written)"


if __name__ == "__main__":
    interrupts.install()
    sys.exit(main())

"""DFlash's folder format: export a block-diffusion drafter to it, load one from it, and check one by
the rules vLLM and SGLang load it with.

A DFlash drafter (z-lab/dflash, SpecForge; served by vLLM `--speculative-config
'{"method": "dflash", ...}'` and SGLang) is a folder with config.json (a Qwen3 config,
`architectures: ["DFlashDraftModel"]`, plus `block_size`, `num_target_layers` and
`dflash_config: {target_layer_ids, mask_token_id}`) and model.safetensors holding `fc`,
`hidden_norm`, `layers.{i}.*` Qwen3 decoder layers with q/k norms, and `norm`, without a
`model.` prefix and without embedding or LM head (the target's are used). It is our
block-diffusion network in its DFlash layout (BlockDiffusionConfig.dflash_layout): we fuse
k/v and gate/up into one matrix each, DFlash stores them apart (the engines fuse them
again on load), and our fuse / fuse_norm are its fc / hidden_norm.

Layer ids: DFlash's `target_layer_ids` count decoder layers from 0 and tap each one's
output, HF's hidden_states[id + 1]; our tap layers count layers done, hidden_states[t].
So id = tap - 1; a tap of the embeddings (0) or after the final norm (L) has no DFlash id.

Mask token: DFlash feeds the mask token's row of the target's frozen embedding. For a
target whose vocabulary has none, `choose_mask_token` takes an unused embedding row, or
else a special token that the chat template never writes (SmolLM2: `<empty_output>`, id
16). vLLM and SGLang then need no resizing. Knows nothing of training or decoding loops.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from diffdraft.drafters.block_diffusion import load_net
from diffdraft.errors import DiffdraftError
from diffdraft.files import atomic_folder
from diffdraft.models.block_diffusion import BlockDiffusionConfig, BlockDiffusionNet

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
ARCHITECTURE = "DFlashDraftModel"
MAX_POSITIONS = 32768  # written as max_position_embeddings: the engines size their RoPE tables by it

# Our parameter names -> DFlash's; fused ones (kv_proj, gate_up) are split in LAYER_SPLITS.
TOP_NAMES = {"fuse.weight": "fc.weight", "fuse_norm.weight": "hidden_norm.weight", "norm.weight": "norm.weight"}
LAYER_NAMES = {"attn_norm.weight": "input_layernorm.weight", "q_proj.weight": "self_attn.q_proj.weight",
               "o_proj.weight": "self_attn.o_proj.weight", "q_norm.weight": "self_attn.q_norm.weight",
               "k_norm.weight": "self_attn.k_norm.weight", "mlp_norm.weight": "post_attention_layernorm.weight",
               "down.weight": "mlp.down_proj.weight"}
LAYER_SPLITS = {"kv_proj.weight": ("self_attn.k_proj.weight", "self_attn.v_proj.weight"),
                "gate_up.weight": ("mlp.gate_proj.weight", "mlp.up_proj.weight")}


def is_dflash_folder(folder: str | Path) -> bool:
    """Whether `folder` looks like a DFlash drafter (its config names the DFlash architecture)."""
    path = Path(folder) / CONFIG_FILE
    if not path.is_file():
        return False
    try:
        return ARCHITECTURE in (json.loads(path.read_text()).get("architectures") or [])
    except (ValueError, UnicodeDecodeError, AttributeError):
        return False


def layer_ids(tap_layers) -> list[int]:
    """Our tap layers (layers done) as DFlash's target_layer_ids (the layer whose output is tapped)."""
    return [int(t) - 1 for t in tap_layers]


def tap_layers_of(ids) -> tuple[int, ...]:
    """DFlash's target_layer_ids as our tap layers."""
    return tuple(int(i) + 1 for i in ids)


def folder_tap_layers(folder: str | Path) -> tuple[int, ...]:
    """The target layers a DFlash folder reads (cheap: its config only, unchecked)."""
    return tap_layers_of(json.loads((Path(folder) / CONFIG_FILE).read_text())["dflash_config"]["target_layer_ids"])


# ----- the mask token -----
def choose_mask_token(tokenizer, vocab_size: int) -> int:
    """A mask token id for a DFlash drafter of this target: the tokenizer's mask token; else the first
    embedding row no token uses; else the last special token that is not BOS/EOS/PAD/UNK and that the
    chat template never writes."""
    if getattr(tokenizer, "mask_token_id", None) is not None and tokenizer.mask_token_id < vocab_size:
        return int(tokenizer.mask_token_id)
    if len(tokenizer) < vocab_size:
        return len(tokenizer)
    reserved = {getattr(tokenizer, f"{name}_token_id", None) for name in ("bos", "eos", "pad", "unk")}
    template = getattr(tokenizer, "chat_template", None) or ""
    candidates = [i for i, token in getattr(tokenizer, "added_tokens_decoder", {}).items()
                  if i < vocab_size and i not in reserved and str(token) not in template]
    if not candidates:
        raise DiffdraftError("this target's vocabulary has no mask token, no unused embedding row and no spare "
                             "special token: give one with --mask-token-id")
    return max(candidates)


# ----- export -----
def dflash_tensors(net: BlockDiffusionNet) -> dict[str, torch.Tensor]:
    """The network's weights under DFlash's names (k/v and gate/up split apart)."""
    out = {}
    for name, tensor in net.state_dict().items():
        if name in TOP_NAMES:
            out[TOP_NAMES[name]] = tensor
            continue
        _, index, local = name.split(".", 2)  # layers.{i}.{local}
        prefix = f"layers.{index}."
        if local in LAYER_SPLITS:
            first, second = tensor.chunk(2, dim=0)  # kv_proj: [k; v], gate_up: [gate; up]
            out[prefix + LAYER_SPLITS[local][0]], out[prefix + LAYER_SPLITS[local][1]] = first, second
        else:
            out[prefix + LAYER_NAMES[local]] = tensor
    return out


def dflash_config(cfg: BlockDiffusionConfig, tap_layers: tuple[int, ...], signature: dict, dtype: str,
                  q_scale: float = 1.0) -> dict:
    """config.json for a network in DFlash's layout (see the module docstring for the layer ids)."""
    num_target_layers = int(signature["num_layers"])
    ids = layer_ids(tap_layers)
    return {
        "architectures": [ARCHITECTURE],
        "model_type": "qwen3",
        "hidden_size": cfg.hidden_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "intermediate_size": cfg.intermediate_size,
        "hidden_act": "silu",
        "rms_norm_eps": cfg.rms_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": None,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "max_position_embeddings": MAX_POSITIONS,
        "vocab_size": int(signature["vocab_size"]),
        "attention_bias": False,
        "attention_dropout": 0.0,
        "tie_word_embeddings": False,
        "use_sliding_window": False,
        "sliding_window": None,
        "max_window_layers": cfg.num_layers,
        "layer_types": ["full_attention"] * cfg.num_layers,
        "torch_dtype": dtype,
        "block_size": cfg.block_size,
        "num_target_layers": num_target_layers,
        "dflash_config": {"target_layer_ids": ids, "mask_token_id": cfg.mask_token_id, "block_size": cfg.block_size,
                          "num_target_layers": num_target_layers},
        # Ours, ignored by the engines: what import needs to check the target exactly, and the calibrated
        # q scale (the engines sample q unscaled; greedy drafts are the same either way).
        "diffdraft": {"target": signature, "tap_layers": list(tap_layers), "q_scale": q_scale},
    }


def export_dflash(drafter_folder: str | Path, out: str | Path, dtype: str = "bfloat16") -> dict:
    """Write `drafter_folder` (a block-diffusion drafter in DFlash's layout) as a DFlash folder at `out`;
    returns its config. Refuses a drafter that has no DFlash equivalent."""
    dtypes = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
    if dtype not in dtypes:
        raise DiffdraftError(f"dtype must be one of {', '.join(dtypes)}, got {dtype!r}")
    net, tap_layers, signature, source_config, draft_vocab = load_net(drafter_folder)
    cfg = net.cfg
    why = []
    if not cfg.qk_norm:
        why.append("its layers have no q/k norms")
    if cfg.mask_token_id is None:
        why.append("its mask is a learned vector, not a token of the target")
    if draft_vocab is not None:
        why.append(f"it drafts from {draft_vocab.numel()} tokens, not the target's whole vocabulary")
    num_target_layers = signature.get("num_layers")
    if not isinstance(num_target_layers, int):
        why.append("its target's layer count is not recorded")
    elif any(not 1 <= t <= num_target_layers - 1 for t in tap_layers):
        why.append(f"it taps layers {list(tap_layers)}; DFlash ids reach layers 1..{num_target_layers - 1} only")
    if why:
        raise DiffdraftError(f"the drafter in {drafter_folder} has no DFlash equivalent: {'; '.join(why)} "
                             "(train one with `diffdraft train --kind dflash`)")
    config = dflash_config(cfg, tap_layers, signature, dtype, q_scale=float(source_config.get("q_scale", 1.0)))
    tensors = {k: v.to(dtypes[dtype]).contiguous() for k, v in dflash_tensors(net).items()}
    with atomic_folder(out) as tmp:
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    return config


# ----- checks, from vLLM's and SGLang's loading rules -----
def expected_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """Every tensor a DFlash folder with this config holds, with its shape."""
    d, heads, kv_heads = config["hidden_size"], config["num_attention_heads"], config["num_key_value_heads"]
    hd = config.get("head_dim") or d // heads
    inter, n = config["intermediate_size"], len(config["dflash_config"]["target_layer_ids"])
    shapes = {"fc.weight": (d, n * d), "hidden_norm.weight": (d,), "norm.weight": (d,)}
    for i in range(config["num_hidden_layers"]):
        p = f"layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (d,), p + "post_attention_layernorm.weight": (d,),
            p + "self_attn.q_proj.weight": (heads * hd, d), p + "self_attn.k_proj.weight": (kv_heads * hd, d),
            p + "self_attn.v_proj.weight": (kv_heads * hd, d), p + "self_attn.o_proj.weight": (d, heads * hd),
            p + "self_attn.q_norm.weight": (hd,), p + "self_attn.k_norm.weight": (hd,),
            p + "mlp.gate_proj.weight": (inter, d), p + "mlp.up_proj.weight": (inter, d),
            p + "mlp.down_proj.weight": (d, inter),
        })
    return shapes


def config_problems(config: object) -> list[str]:
    """What in a DFlash config.json vLLM or SGLang would refuse or misread (empty: none)."""
    if not isinstance(config, dict):
        return ["config.json is not a JSON object"]
    problems = []
    if config.get("architectures") != [ARCHITECTURE]:
        problems.append(f"architectures must be [{ARCHITECTURE!r}] (vLLM's registry, SGLang's EntryClass), "
                        f"got {config.get('architectures')!r}")
    if config.get("model_type") != "qwen3":
        problems.append(f"model_type must be 'qwen3' (the layers are Qwen3's), got {config.get('model_type')!r}")
    ints = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "intermediate_size",
            "vocab_size", "num_target_layers", "max_position_embeddings", "block_size")
    for key in ints:
        value = config.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            problems.append(f"{key} must be a positive integer, got {value!r}")
    for key in ("rms_norm_eps", "rope_theta"):
        value = config.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
            problems.append(f"{key} must be a positive number, got {value!r}")
    if config.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act must be 'silu' (SGLang refuses others), got {config.get('hidden_act')!r}")
    if config.get("attention_bias"):
        problems.append("attention_bias must be false (these drafters have no biases)")
    if problems:
        return problems  # the checks below need those fields
    if config["num_attention_heads"] % config["num_key_value_heads"]:
        problems.append("num_attention_heads must be a multiple of num_key_value_heads")
    head_dim = config.get("head_dim")
    if head_dim is not None and (isinstance(head_dim, bool) or not isinstance(head_dim, int) or head_dim < 1):
        problems.append(f"head_dim must be a positive integer, got {head_dim!r}")
    if config["block_size"] < 2:
        problems.append(f"block_size must be at least 2, got {config['block_size']}")
    layer_types = config.get("layer_types")
    if layer_types is not None and (not isinstance(layer_types, list) or len(layer_types) != config["num_hidden_layers"]
                                    or any(t != "full_attention" for t in layer_types)):
        problems.append("layer_types must list 'full_attention' once per layer (no sliding-window layers here)")
    sub = config.get("dflash_config")
    if not isinstance(sub, dict):
        return problems + ["dflash_config must be an object with target_layer_ids and mask_token_id"]
    ids, targets = sub.get("target_layer_ids"), config["num_target_layers"]
    if not isinstance(ids, list) or not ids or any(isinstance(i, bool) or not isinstance(i, int) for i in ids):
        problems.append(f"dflash_config.target_layer_ids must be a non-empty list of integers, got {ids!r}")
    else:
        if ids != sorted(set(ids)):
            problems.append(f"dflash_config.target_layer_ids must ascend strictly (engines capture in layer order), "
                            f"got {ids}")
        if any(not 0 <= i <= targets - 2 for i in ids):
            problems.append(f"dflash_config.target_layer_ids must lie in 0..{targets - 2}: the engines capture the "
                            f"input of layer id+1 of the {targets}, got {ids}")
    mask = sub.get("mask_token_id")
    if isinstance(mask, bool) or not isinstance(mask, int) or not 0 <= mask < config["vocab_size"]:
        problems.append(f"dflash_config.mask_token_id must be a token id below vocab_size {config['vocab_size']} "
                        f"(vLLM requires it; SGLang cannot resize the embedding), got {mask!r}")
    for key in ("block_size", "num_target_layers"):
        if key in sub and sub[key] != config[key]:
            problems.append(f"dflash_config.{key} {sub[key]!r} differs from the top-level {key} {config[key]!r}")
    if sub.get("projector_type", "dflash") != "dflash":
        problems.append(f"dflash_config.projector_type {sub['projector_type']!r} is not plain dflash")
    return problems


def tensor_problems(config: dict, shapes: dict[str, tuple[int, ...]]) -> list[str]:
    """What in a DFlash folder's tensors (name -> shape) vLLM or SGLang would refuse or misread."""
    problems = []
    prefixed = sorted(n for n in shapes if n.startswith("model."))
    if prefixed:
        problems.append(f"tensor names must not start with 'model.' (vLLM adds it itself): {prefixed[:3]}")
    head = sorted(n for n in shapes if "embed_tokens" in n or "lm_head" in n)
    if head:
        problems.append(f"no embedding or LM head may be saved (the target's are used): {head}")
    want = expected_shapes(config)
    missing = sorted(set(want) - set(shapes))
    extra = sorted(set(shapes) - set(want) - set(prefixed) - set(head))
    if missing:
        problems.append(f"missing tensors: {missing[:4]}{' ...' if len(missing) > 4 else ''}")
    if extra:
        problems.append(f"unexpected tensors: {extra[:4]}{' ...' if len(extra) > 4 else ''}")
    wrong = [f"{n} is {list(shapes[n])}, expected {list(s)}" for n, s in want.items()
             if n in shapes and tuple(shapes[n]) != s]
    problems += wrong[:4]
    return problems


def check_dflash_folder(folder: str | Path) -> list[str]:
    """Every problem vLLM or SGLang would have loading `folder` as a DFlash drafter (empty: none)."""
    folder = Path(folder)
    config_path, weights_path = folder / CONFIG_FILE, folder / WEIGHTS_FILE
    if not config_path.is_file() or not weights_path.is_file():
        return [f"{folder} needs {CONFIG_FILE} and {WEIGHTS_FILE}"]
    try:
        config = json.loads(config_path.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        return [f"{CONFIG_FILE} is not valid JSON: {err}"]
    problems = config_problems(config)
    if problems:
        return problems
    try:
        from safetensors import safe_open

        with safe_open(str(weights_path), framework="pt") as f:
            shapes = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
    except Exception as err:  # safetensors raises its own error types on a damaged file
        return [f"{WEIGHTS_FILE} is damaged: {err}"]
    return tensor_problems(config, shapes)


# ----- import -----
def load_dflash(folder: str | Path) -> tuple[BlockDiffusionNet, tuple[int, ...], dict, float]:
    """A DFlash folder as our network: (net, tap layers, target signature, q scale). A folder that fails
    the checks is refused with its first problem."""
    problems = check_dflash_folder(folder)
    if problems:
        raise DiffdraftError(f"{folder} is not a usable DFlash drafter: {problems[0]}")
    config = json.loads((Path(folder) / CONFIG_FILE).read_text())
    sub = config["dflash_config"]
    rope = config.get("rope_theta") or (config.get("rope_parameters") or {}).get("rope_theta", 1e6)
    cfg = BlockDiffusionConfig(
        hidden_size=config["hidden_size"], num_layers=config["num_hidden_layers"],
        num_heads=config["num_attention_heads"], num_kv_heads=config["num_key_value_heads"],
        head_dim=config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"],
        intermediate_size=config["intermediate_size"], block_size=config["block_size"], rope_theta=float(rope),
        rms_eps=float(config["rms_norm_eps"]), qk_norm=True, num_taps=len(sub["target_layer_ids"]),
        mask_token_id=sub["mask_token_id"])
    try:
        tensors = load_file(str(Path(folder) / WEIGHTS_FILE))
    except Exception as err:
        raise DiffdraftError(f"{folder}: {WEIGHTS_FILE} is damaged: {err}") from err
    ours = {}
    for ours_name, theirs in TOP_NAMES.items():
        ours[ours_name] = tensors[theirs]
    for i in range(cfg.num_layers):
        p = f"layers.{i}."
        for local, theirs in LAYER_NAMES.items():
            ours[p + local] = tensors[p + theirs]
        for local, (first, second) in LAYER_SPLITS.items():
            ours[p + local] = torch.cat([tensors[p + first], tensors[p + second]], dim=0)
    net = BlockDiffusionNet(cfg)
    net.load_state_dict({k: v.float() for k, v in ours.items()})
    mine = config.get("diffdraft") or {}
    signature = dict(mine.get("target") or {"hidden_size": config["hidden_size"], "vocab_size": config["vocab_size"],
                                             "num_layers": config["num_target_layers"]})
    tap_layers = tap_layers_of(sub["target_layer_ids"])
    q_scale = mine.get("q_scale", 1.0)
    if isinstance(q_scale, bool) or not isinstance(q_scale, (int, float)) or not q_scale > 0:
        raise DiffdraftError(f"{folder}: diffdraft.q_scale must be a positive number, got {q_scale!r}")
    return net, tap_layers, signature, float(q_scale)


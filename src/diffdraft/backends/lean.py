"""The lean backend: a static-cache runtime for Llama-family targets, row-invariant by construction.

Built from a loaded HF Llama (SmolLM2, any Llama-architecture folder or GGUF); its weights
are read once and prepared for the fastest row-invariant kernel (backends/kernels.py),
with q/k/v and gate/up fused into one linear each, and q and k's rows ordered so that each
rotary pair sits side by side (RoPE is then one complex multiply: rope.rotate_pairs_in_place).
Each sequence's KV cache (in its TargetState) is one preallocated tensor per K and V, [layers,
kv heads, capacity, head dim]; crop is a change of length. Only the tapped layers' hidden states are kept, and only when
asked for.

Batch invariance: for a forward over k <= `invariant_rows` tokens, every operation computes
each row exactly as a one-token forward at that position would. Linears, norms, RoPE and the
MLP are row-wise; attention runs one query row per call, over that row's own prefix of the
cache, which is the very call a one-token forward makes. So on the CPU in float32 the
logits of a verify forward are bit-identical to k one-token forwards (tested), and greedy
speculative decoding equals plain decoding by construction. Longer forwards (a long
prompt's prefill) attend in one masked call instead: plain and speculative decoding share
that prefill, so equality does not depend on it. For the same reason a prefill of BULK_ROWS
tokens or more attends in one masked call, and may run its linears on other kernels than
decoding does: with 4-bit weights, on a CPU where oneDNN runs bfloat16, a bfloat16 copy of
them (BulkLinear, several times faster over many rows; `bulk_prefill`).

Weights (docs/native-weights.md): the decoder linears run either on the loaded float weights
(oneDNN, `weights="float32"`) or as 4-bit groups through the int4 kernel (`int4_layers`:
the GGUF file's own blocks, "native", or the float weights rounded, "int4"); a fused linear
whose parts are not all 4-bit stays float. The residual stream, norms, attention and the
LM head's activations and logits stay float32 either way; only the 4-bit matmuls read bfloat16
activations. With 4-bit weights the LM head's weight is read in float16 (HalfLinear, where FBGEMM
runs it), else float32.

With 4-bit weights the decoder layers run as one C++ call per forward where it builds
(backends/fused.py, docs/native-weights.md "The fused layer stack"): the same int4 matmuls, and
the norms, RoPE, cache writes, attention and SiLU between them as loops over the rows, each row
alone, so the bit-identity above holds for it too. A long prefill runs in the same C++ call on
the bfloat16 copies where they exist (docs/native-weights.md, "Prefills in the fused stack"). The
Python loop below stays for float weights, LoRA updates and machines without a compiler.

Several sequences' rows run through one forward (forward_many, a batch of requests): the
row-wise parts over all rows at once, the cache writes and attention per sequence and row,
so each sequence's logits are bit-identical to its own forward's (tested).

It knows nothing of drafting. One sequence per state. On CUDA the same module
runs with `F.linear` (no CUDA graphs yet: no GPU was lent to test them).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from diffdraft.backends import fused as fused_kernels
from diffdraft.backends.int4 import Int4Weight
from diffdraft.backends.kernels import (AdaptedLinear, BulkLinear, Int4Linear, PreparedLinear, half_supported,
                                       onednn_bf16_supported, prepared_linear)
from diffdraft.errors import DiffdraftError
from diffdraft.rope import paired_rows, rope_phases, rope_tables, rotate_pairs_in_place
from diffdraft.target import Rows, SequenceRows, TargetBackend, TargetOutput, TargetState

# Verify forwards up to this many tokens are computed row by row (draft lengths are far below it).
INVARIANT_ROWS = 32
# A prefill of at least this many tokens attends in one masked call and runs on the bulk kernels where there
# are any (BulkLinear); below it the 4-bit kernel is as fast (measured on the development CPU: about even at
# 6 to 12 rows).
BULK_ROWS = 16
# RoPE kinds whose frequencies do not change with the sequence length.
STATIC_ROPE = ("default", "linear", "llama3", "yarn")


def lean_unsupported(module: nn.Module) -> str | None:
    """Why the lean runtime cannot run `module`, or None when it can."""
    config = getattr(module, "config", None)
    if getattr(config, "model_type", None) != "llama":
        return f"architecture {getattr(config, 'model_type', type(module).__name__)!r} is not in the Llama family"
    if getattr(config, "hidden_act", "silu") != "silu":
        return f"activation {config.hidden_act!r} is not silu"
    rope = (getattr(config, "rope_parameters", None) or {}).get("rope_type", "default")
    if rope not in STATIC_ROPE:
        return f"RoPE type {rope!r} changes with the sequence length"
    body = getattr(module, "model", None)
    if body is None or not hasattr(body, "layers") or not hasattr(body, "rotary_emb"):
        return "the model body has no layers or rotary embedding where a Llama keeps them"
    return None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Llama's RMSNorm, row by row, in float32 like HF's. x: [k, D] -> [k, D] in weight's dtype.
    In float32 it is PyTorch's own op, one call instead of five."""
    if x.dtype == torch.float32 and weight.dtype == torch.float32:
        return F.rms_norm(x, weight.shape, weight, eps)
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(weight.dtype)


Kernel = PreparedLinear | Int4Linear | BulkLinear | AdaptedLinear
LowRank = tuple[torch.Tensor, torch.Tensor]  # (A [r, in], B [out, r]): a weight's update B A, scale folded into B


def _linear(parts: list[nn.Linear], int4: list[Int4Weight | None], prefer_onednn: bool, bulk: bool,
            low_rank: list[LowRank | None] | None = None,
            orders: list[torch.Tensor | None] | None = None) -> tuple[Kernel, Kernel]:
    """One linear over `parts` stacked on the output side, as (its row-invariant kernel, its kernel for bulk
    prefills): 4-bit when every part has 4-bit weights, else float; the bulk kernel is a bfloat16 copy of
    4-bit weights where `bulk` says so, else the same kernel. Parts with a low-rank update (`low_rank`)
    get it beside the weight, both kernels alike (AdaptedLinear). A part with a row order in `orders` gives its
    output rows in that order (weight, bias and update alike)."""
    orders = orders or [None] * len(parts)

    def ordered(rows: torch.Tensor | None, order: torch.Tensor | None) -> torch.Tensor | None:
        return rows if rows is None or order is None else rows[order]

    biases = [ordered(p.bias, order) for p, order in zip(parts, orders)]
    bias = torch.cat([b.detach() for b in biases]) if all(b is not None for b in biases) else None
    if int4 and all(w is not None for w in int4):
        weight = Int4Weight.cat([w if order is None else w.take_rows(order) for w, order in zip(int4, orders)])
        kernel = Int4Linear(weight, bias)
        pair = (kernel, BulkLinear(weight, bias) if bulk else kernel)
    else:
        weights = [ordered(p.weight.detach(), order) for p, order in zip(parts, orders)]
        linear = PreparedLinear(torch.cat(weights), prefer_onednn=prefer_onednn)
        if bias is not None:
            linear.bias = bias
        pair = (linear, linear)
    if not low_rank or all(update is None for update in low_rank):
        return pair
    low_rank = [None if update is None else (update[0], ordered(update[1], order))
                for update, order in zip(low_rank, orders)]
    a, b = _stacked_low_rank(low_rank, [p.out_features for p in parts])
    rowwise = AdaptedLinear(pair[0], a, b)
    return rowwise, rowwise if pair[1] is pair[0] else AdaptedLinear(pair[1], a, b)


def _stacked_low_rank(updates: list[LowRank | None], outs: list[int]) -> LowRank:
    """The updates of parts stacked on the output side as one: A's rows stacked, B block-diagonal."""
    present = [(i, update) for i, update in enumerate(updates) if update is not None]
    a = torch.cat([update[0] for _, update in present])  # [sum r, in]
    b = torch.zeros(sum(outs), a.shape[0], dtype=a.dtype)  # [sum out, sum r]
    column = 0
    offsets = [sum(outs[:i]) for i in range(len(outs))]
    for i, (down, up) in present:
        b[offsets[i] : offsets[i] + outs[i], column : column + down.shape[0]] = up
        column += down.shape[0]
    return a, b


@dataclass(frozen=True)
class _Linears:
    """One decoder layer's linears, q/k/v and gate/up fused."""

    qkv: Kernel
    o: Kernel
    gate_up: Kernel
    down: Kernel

    def all(self) -> tuple[Kernel, Kernel, Kernel, Kernel]:
        """The four, in the order a layer runs them (the fused layers take them so)."""
        return self.qkv, self.o, self.gate_up, self.down


class _LeanLayer:
    """One decoder layer's prepared weights (4-bit ones by LINEARS key in `int4`, where given): `rowwise`, the
    row-invariant kernels every decoding forward runs on, and `bulk`, those of a long prefill (the same
    objects unless `bulk`)."""

    def __init__(self, layer: nn.Module, head_dim: int, prefer_onednn: bool,
                 int4: dict[str, Int4Weight | None] | None = None, bulk: bool = False,
                 low_rank: dict[str, LowRank] | None = None):
        attn, mlp = layer.self_attn, layer.mlp
        int4, low_rank = int4 or {}, low_rank or {}

        def make(names: list[str], parts: list[nn.Linear], orders=None):
            return _linear(parts, [int4.get(n) for n in names] if int4 else [], prefer_onednn, bulk,
                           [low_rank.get(n) for n in names], orders)

        # q and k with each rotary pair side by side, so RoPE is one complex multiply (rope.paired_rows)
        heads, kv_heads = attn.q_proj.out_features // head_dim, attn.k_proj.out_features // head_dim
        paired = [paired_rows(heads, head_dim), paired_rows(kv_heads, head_dim), None]
        pairs = [make(["q", "k", "v"], [attn.q_proj, attn.k_proj, attn.v_proj], paired), make(["o"], [attn.o_proj]),
                 make(["gate", "up"], [mlp.gate_proj, mlp.up_proj]), make(["down"], [mlp.down_proj])]
        self.rowwise = _Linears(*(pair[0] for pair in pairs))
        self.bulk = _Linears(*(pair[1] for pair in pairs))
        self.attn_norm = layer.input_layernorm.weight.detach()
        self.mlp_norm = layer.post_attention_layernorm.weight.detach()
        self.intermediate = mlp.gate_proj.weight.shape[0]


class LeanLlamaTarget(TargetBackend):
    """Static-cache Llama decoding on prepared weights (see the module docstring)."""

    kind = "lean"
    takes_trees = True
    takes_batches = True

    def __init__(
        self,
        module: nn.Module,
        tokenizer,
        tap_layers: tuple[int, ...] | None = None,
        name: str = "model",
        cache_tokens: int | None = None,
        invariant_rows: int = INVARIANT_ROWS,
        prefer_onednn: bool = True,
        int4_layers: list[dict[str, Int4Weight | None]] | None = None,
        weights: str = "float32",
        bulk_prefill: bool = True,
        low_rank: list[dict[str, LowRank]] | None = None,
        extra_embeddings: torch.Tensor | None = None,
        fused: bool = True,
    ):
        """low_rank: per layer, by LINEARS key, an update beside that weight (a LoRA adapter, not merged);
        extra_embeddings [n, D]: input embeddings for ids V..V+n-1, which no output predicts (a dLLM's mask).
        fused: run the decoder layers of 4-bit targets in one C++ call where it builds (backends/fused.py)."""
        reason = lean_unsupported(module)
        if reason:
            raise DiffdraftError(f"the lean runtime cannot run this model: {reason}; use --backend hf")
        dtype = module.get_output_embeddings().weight.dtype
        if dtype == torch.bfloat16 and prefer_onednn and not onednn_bf16_supported():
            raise DiffdraftError(
                "bfloat16 weights need a CPU with AVX-512 or AVX-NE-CONVERT for the lean runtime's kernels, and "
                "this one has neither: use --weights native (4-bit weights with bfloat16 activations) or float32")
        if int4_layers is not None and (dtype != torch.float32 or len(int4_layers) != module.config.num_hidden_layers):
            raise DiffdraftError("4-bit weights go with a float32 model of the same depth")
        if low_rank is not None and len(low_rank) != module.config.num_hidden_layers:
            raise DiffdraftError(f"low-rank updates for {len(low_rank)} layers; the model has "
                                 f"{module.config.num_hidden_layers}")
        super().__init__(module, tokenizer, tap_layers, name)
        self.weights = weights  # what the decoder linears run on: float32, native (the GGUF's 4-bit) or int4
        cfg = module.config
        body = module.model
        if cache_tokens is not None:
            if cache_tokens < 2:
                raise DiffdraftError(f"the KV cache must hold at least 2 tokens, got {cache_tokens}")
            self.max_context = min(self.max_context, cache_tokens)
        self.num_heads: int = cfg.num_attention_heads
        self.num_kv_heads: int = cfg.num_key_value_heads
        self.head_dim: int = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.eps: float = cfg.rms_norm_eps
        self.invariant_rows = invariant_rows
        # 4-bit weights get a bfloat16 copy for long prefills where oneDNN runs bfloat16 (BulkLinear)
        self.bulk_prefill = bulk_prefill and int4_layers is not None and prefer_onednn and onednn_bf16_supported()
        with torch.no_grad():
            self._layers = [_LeanLayer(layer, self.head_dim, prefer_onednn,
                                       None if int4_layers is None else int4_layers[i],
                                       bulk=self.bulk_prefill, low_rank=None if low_rank is None else low_rank[i])
                            for i, layer in enumerate(body.layers)]
            self._final_norm = body.norm.weight.detach()
            self._embed = body.embed_tokens.weight.detach()  # [V (+ n extra), D]
            if extra_embeddings is not None:
                self._embed = torch.cat([self._embed, extra_embeddings.detach().to(self._embed.dtype)])
            # 4-bit targets read their LM head in float16 where FBGEMM runs it (float32 in and out): half the bytes
            self.half_head = int4_layers is not None and prefer_onednn and half_supported()
            self._head = prepared_linear(module.lm_head.weight, None, self.half_head, prefer_onednn)
            self._phases = self._rope_phases(body.rotary_emb)  # [C, hd / 2] complex
        self._fused, self.fused_note = self._prepare_fused(fused)
        self.fused_layers = self._fused is not None
        self.fused_build = fused_kernels.build_key() if self.fused_layers else ""
        self.row_invariant = all(lin.row_invariant for layer in self._layers for lin in layer.rowwise.all()) \
            and self._head.row_invariant

    def _prepare_fused(self, wanted: bool):
        """(the layers as a fused_kernels.FusedStack, a note for the load line), or (None, note)
        where the layers run in Python: not asked for, not every decoder linear a plain 4-bit one, or no build."""
        kernels = [lin for layer in self._layers for lin in layer.rowwise.all()]
        if not wanted or self.device.type != "cpu" or self.dtype != torch.float32:
            return None, ""
        if not all(type(lin) is Int4Linear and lin.bias is None for lin in kernels):
            return None, ""
        op, why = fused_kernels.fused_layers()
        if op is None:
            return None, f"decoder layers in Python ({why})"
        if not all(lin.fused_kernel for lin in kernels):  # (made before the library was asked for, or without it)
            return None, "decoder layers in Python (their 4-bit weights are in PyTorch's layout)"
        bulk = [lin for layer in self._layers for lin in layer.bulk.all()] if self.bulk_prefill else []
        if not all(type(lin) is BulkLinear and lin.bias is None for lin in bulk):
            bulk = []  # (a bias, say): long prefills run the Python layers on their bulk kernels
        stack = fused_kernels.FusedStack.of(op, [(layer.attn_norm, layer.mlp_norm) for layer in self._layers],
                                            kernels, self.num_heads, self.num_kv_heads, self.head_dim, self.eps,
                                            bulk=bulk)
        return stack, "decoder layers fused (C++, integer 4-bit kernel" + (", prefills bfloat16)" if bulk else ")")

    def _run_fused(self, x: torch.Tensor, parts: list[SequenceRows], starts: list[int], sizes: list[int],
                   phases: torch.Tensor, want_taps: bool, bulk: bool = False) -> dict[int, torch.Tensor]:
        """Every layer over x [R, D] (in place) in one C++ call, on the bfloat16 copies if bulk; returns the taps
        of layers 1..L-1 asked for."""
        chains = [1 if part.rows is None or part.rows.is_chain else 0 for part in parts]
        if all(chains):
            seen = offsets = torch.empty(0, dtype=torch.long)
        else:
            sees = [row for part, k in zip(parts, sizes)  # per row, the new rows of its sequence it sees
                    for row in (part.rows.sees if part.rows is not None else [tuple(range(i + 1)) for i in range(k)])]
            seen = torch.tensor([j for row in sees for j in row], dtype=torch.long)  # all of them, row after row
            offsets = torch.tensor([0] + [len(row) for row in sees], dtype=torch.long).cumsum(0)  # [R + 1]
        taps = [i for i in self.tap_layers if 0 < i < self.num_layers] if want_taps else []
        pairs = torch.view_as_real(phases[:, 0]).contiguous()  # [R, hd / 2, 2]
        tapped = self._fused.run(x, [part.state.cache for part in parts], sizes, starts, chains, seen, offsets, pairs,
                                 taps, bulk=bulk)
        return dict(zip(taps, tapped))

    def _rope_phases(self, rotary: nn.Module) -> torch.Tensor:
        """The model's own frequencies and scaling (as its rotary module holds them) at every position, as the
        phases of rope.rotate_pairs_in_place: [C, hd / 2] complex64."""
        positions = torch.arange(self.max_context, device=self.device)
        cos, sin = rope_tables(positions, self.head_dim, 0.0, inv_freq=rotary.inv_freq, scale=rotary.attention_scaling)
        return rope_phases(cos, sin)

    # ----- incremental decoding -----
    def _empty_cache(self, old: torch.Tensor | None, capacity: int) -> torch.Tensor:
        """Keys and values, [L, 2, Hkv, C, hd] (index 0 the keys, 1 the values), for the sequence's capacity C: a
        restarted sequence keeps its own. One tensor, so a layer writes its new keys and values in one copy.
        Untouched pages cost nothing until written (SmolLM2's whole context: 377 MB reserved)."""
        if old is not None and old.shape[3] == capacity:
            return old
        return torch.empty((self.num_layers, 2, self.num_kv_heads, capacity, self.head_dim),
                           device=self.device, dtype=self.dtype)

    def _crop_cache(self, state: TargetState, n: int) -> None:
        pass  # positions past the length are overwritten before they are read

    def _move_rows(self, state: TargetState, start: int, path: list[int]) -> None:
        source = start + torch.tensor(path, device=self.device)  # [n]
        target = start + torch.arange(len(path), device=self.device)  # [n]
        state.cache[:, :, :, target] = state.cache[:, :, :, source]  # the right side is gathered first

    def _run_rows(self, state: TargetState, ids: torch.Tensor, want_taps: bool, rows: Rows) -> TargetOutput:
        return self._run(state, ids, want_taps, last_only=False, rows=rows)

    def _run(self, state: TargetState, ids: torch.Tensor, want_taps: bool, last_only: bool,
             rows: Rows | None = None) -> TargetOutput:
        """ids: [1, k]. Writes the k tokens' keys/values at slots length..length+k-1 of the state's cache;
        rows (not a chain) says at which positions they sit and what each sees."""
        if ids.shape[0] != 1:
            raise ValueError(f"the lean runtime decodes one sequence per state, got a batch of {ids.shape[0]}")
        return self._run_parts([SequenceRows(state, ids[0], rows)], want_taps, last_only)[0]

    def _run_many(self, parts: list[SequenceRows], want_taps: bool) -> list[TargetOutput]:
        return self._run_parts(parts, want_taps, last_only=False)

    @torch.inference_mode()
    def _run_parts(self, parts: list[SequenceRows], want_taps: bool, last_only: bool) -> list[TargetOutput]:
        """Every part's rows in one forward: the linears, norms and RoPE over all R rows at once (row-invariant
        kernels), the cache writes and attention per sequence, per row. Each part's keys/values go to its
        own cache at slots length..length+k-1 and its length advances by k."""
        sizes = [part.ids.shape[0] for part in parts]
        for part, k in zip(parts, sizes):
            self._check_room(part.state, k)
        starts = [part.state.length for part in parts]
        ids = torch.cat([part.ids for part in parts]).to(self.device)  # [R]
        rows_total = ids.shape[0]
        x = F.embedding(ids, self._embed)  # [R, D]
        if len(parts) == 1 and parts[0].rows is None:
            phases = self._phases[starts[0] : starts[0] + rows_total, None]  # [R, 1, hd / 2]
        else:
            at = torch.cat([start + (torch.arange(k) if part.rows is None else torch.tensor(part.rows.depth))
                            for part, start, k in zip(parts, starts, sizes)]).to(self.device)  # [R] positions
            phases = self._phases[at, None]  # [R, 1, hd / 2]
        offsets = [sum(sizes[:i]) for i in range(len(parts))]
        # a long prefill (only prefill is last_only): no one-token forward has to match its rows, so it runs on
        # the bulk kernels (the row-wise ones where there is no bulk copy) and attends in one masked call
        bulk = last_only and len(parts) == 1 and rows_total >= BULK_ROWS
        taps = {0: x} if want_taps and 0 in self.tap_layers else {}
        heads, kv_heads, hd = self.num_heads, self.num_kv_heads, self.head_dim
        # all layers in one C++ call, a long prefill's on the stack's bfloat16 copies where it has them
        fused = self._fused is not None and (not bulk or self._fused.has_bulk)
        if fused:
            if 0 in taps:
                taps[0] = x.clone()  # the fused layers update x in place
            taps.update(self._run_fused(x, parts, starts, sizes, phases, want_taps, bulk=bulk))
        for index, layer in enumerate(() if fused else self._layers):  # else layer by layer, here
            linears = layer.bulk if bulk else layer.rowwise
            qkv = linears.qkv(rms_norm(x, layer.attn_norm, self.eps))  # [R, (H + 2 Hkv) hd]
            rotate_pairs_in_place(qkv[:, : (heads + kv_heads) * hd].view(rows_total, heads + kv_heads, hd), phases)
            new_kv = qkv[:, heads * hd :].view(rows_total, 2, kv_heads, hd)  # rotated keys, then values
            q_all = qkv[:, : heads * hd].view(rows_total, heads, hd)
            attended = []
            for part, start, k, offset in zip(parts, starts, sizes, offsets):
                cache = part.state.cache  # [L, 2, Hkv, C, hd]
                cache[index, :, :, start : start + k] = new_kv[offset : offset + k].permute(1, 2, 0, 3)  # [2, Hkv, k, hd]
                q = q_all[offset : offset + k].transpose(0, 1)  # [H, k, hd]
                attended.append(self._attend(q, cache[index, 0], cache[index, 1], start, part.rows,
                                             row_by_row=not bulk))  # [k, H hd]
            attended = attended[0] if len(attended) == 1 else torch.cat(attended)  # [R, H hd]
            x = x + linears.o(attended, widen=False)  # a bfloat16 output is widened by the addition
            gate, up = linears.gate_up(rms_norm(x, layer.mlp_norm, self.eps)).split(layer.intermediate, dim=-1)
            x = x + linears.down(F.silu(gate) * up, widen=False)
            if want_taps and index + 1 in self.tap_layers and index + 1 < self.num_layers:
                taps[index + 1] = x
        for part, start, k in zip(parts, starts, sizes):
            part.state.length = start + k
        if want_taps and self.num_layers in self.tap_layers:
            taps[self.num_layers] = rms_norm(x, self._final_norm, self.eps)  # HF's last hidden state is normed
        ends = [offset + k for offset, k in zip(offsets, sizes)]
        hidden = x[[end - 1 for end in ends]] if last_only else x  # [P or R, D]
        logits = self._head(rms_norm(hidden, self._final_norm, self.eps))  # [P or R, V]
        tapped = torch.cat([taps[i] for i in self.tap_layers], dim=-1) if want_taps else None  # [R, n D]
        outputs = []
        for i, (offset, end) in enumerate(zip(offsets, ends)):
            part_logits = logits[i : i + 1] if last_only else logits[offset:end]
            outputs.append(TargetOutput(logits=part_logits[None],
                                        taps=None if tapped is None else tapped[offset:end][None]))
        return outputs

    def _attend(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, start: int,
                rows: Rows | None = None, row_by_row: bool = True) -> torch.Tensor:
        """Attention of q [H, k, hd] (the rows at slots start..start+k-1) over one layer's cached keys and
        values [Hkv, C, hd] -> [k, H hd]: each row sees the committed cache and the rows `rows` says
        (a chain when None). Row by row up to invariant_rows (unless row_by_row is False: a bulk prefill),
        each over exactly the keys a one-token forward at its position would see, in the same order."""
        heads, k, hd = q.shape
        if row_by_row and k <= self.invariant_rows:
            out = []
            for i in range(k):
                seen = None if rows is None else rows.sees[i]
                if seen is None or seen == tuple(range(len(seen))):  # a prefix of the new rows (a chain's row, a
                    end = start + (i + 1 if seen is None else len(seen))  # dLLM block's): a prefix of the cache
                    row_keys, row_values = keys[:, :end], values[:, :end]
                else:  # the committed cache, then its ancestors' slots
                    slots = torch.cat([torch.arange(start, device=q.device),
                                       start + torch.tensor(seen, device=q.device)])
                    row_keys, row_values = keys.index_select(1, slots), values.index_select(1, slots)
                out.append(F.scaled_dot_product_attention(q[None, :, i : i + 1], row_keys[None], row_values[None],
                                                          enable_gqa=True)[0])  # [H, 1, hd]
            out = out[0] if k == 1 else torch.cat(out, dim=1)  # [H, k, hd]
        else:
            end = start + k
            if rows is None:
                allowed = torch.arange(end, device=q.device)[None] <= torch.arange(start, end, device=q.device)[:, None]
            else:
                allowed = torch.zeros(k, end, dtype=torch.bool, device=q.device)  # [k, end]
                allowed[:, :start] = True
                for i, seen in enumerate(rows.sees):
                    allowed[i, start + torch.tensor(seen, device=q.device)] = True
            out = F.scaled_dot_product_attention(
                q[None], keys[None, :, :end], values[None, :, :end], attn_mask=allowed, enable_gqa=True
            )[0]
        return out.transpose(0, 1).reshape(k, heads * hd)

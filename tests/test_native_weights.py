"""The target's own 4-bit weights (docs/native-weights.md): GGUF blocks into the int4 kernel's layout,
rounding float weights, the lean runtime's rows on the int4 kernel, and the kernel choice by CPU
capability. Tiny random models and a small GGUF file written here; the real file in a `real` test."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFWriter, quants

from conftest import make_llama
from diffdraft.backends import LeanLlamaTarget, build_target, resolve_weights
from diffdraft.backends import fused, kernels
from diffdraft.backends.gguf_llama import LINEARS, MODULE_PATHS, read_native_linears, unpermute_rows
from diffdraft.backends.lean import BULK_ROWS
from diffdraft.backends.int4 import GGUF_INT4_KINDS, Int4Weight, from_gguf, round_to_nearest
from diffdraft.errors import DiffdraftError
from test_backends import CONTEXT, MAX_K, k_token_vs_one_token

# The largest gap allowed between the kernel's weights and the dequantized tensor: the scales and zeros
# are rounded to bfloat16 (8 significant bits), so a weight moves by at most |q - 8| * |s| * 2^-8 + |z| * 2^-8.
BF16_REL = 2.0**-8


def random_blocks(kind: str, rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """Random bytes of a GGUF tensor [rows, row bytes] of `kind`, with sane float16 scales."""
    rng = np.random.default_rng(seed)
    per_block, size = GGUF_INT4_KINDS[kind] if kind in GGUF_INT4_KINDS else (32, 34)  # Q8_0: d + 32 bytes
    raw = rng.integers(0, 256, (rows, cols // per_block, size), dtype=np.uint8)
    scales = (2 if kind in ("Q4_1", "Q4_K") else 1)
    for i in range(scales):
        values = rng.uniform(-0.05, 0.05, (rows, cols // per_block)).astype(np.float16)
        raw[..., 2 * i : 2 * i + 2] = values.view(np.uint8).reshape(rows, cols // per_block, 2)
    return raw.reshape(rows, -1)


def kernel_weight(weight: Int4Weight) -> torch.Tensor:
    """The weight as the int4 kernel sees it: scales and zeros rounded to bfloat16 (the kernel's own formula)."""
    s, z = weight.scale.bfloat16().float(), weight.zero.bfloat16().float()
    return Int4Weight(weight.q, s, z).dequantize()


@pytest.mark.parametrize("kind", list(GGUF_INT4_KINDS))
def test_gguf_blocks_map_exactly_to_groups_of_32(kind):
    raw = random_blocks(kind, 6, 512, seed=1)
    reference = torch.from_numpy(quants.dequantize(raw, getattr(GGMLQuantizationType, kind)).astype(np.float32))
    weight = from_gguf(raw, kind, (6, 512))
    # the same codes, scales and offsets: equal up to float32 rounding (Q4_K's zero folds two products into one)
    torch.testing.assert_close(weight.dequantize(), reference, rtol=0, atol=1e-6)
    bound = (weight.q.float() - 8).abs().amax() * weight.scale.abs().amax() + weight.zero.abs().amax()
    assert (kernel_weight(weight) - reference).abs().max() <= bound * BF16_REL


def test_a_wrong_shape_or_kind_is_refused():
    with pytest.raises(ValueError, match="do not fit"):
        from_gguf(random_blocks("Q4_0", 4, 64), "Q4_0", (4, 96))
    with pytest.raises(ValueError, match="not a 4-bit group format"):
        from_gguf(random_blocks("Q4_0", 4, 64), "Q8_0", (4, 64))


def test_round_to_nearest_gives_back_q4_1_codes():
    """Weights that came from Q4_1 (every group spans codes 0 and 15) come back exactly."""
    q = torch.randint(0, 16, (8, 64), generator=torch.Generator().manual_seed(2), dtype=torch.uint8)
    q[:, ::32], q[:, 1::32] = 0, 15
    original = Int4Weight(q, torch.rand(8, 2) + 0.01, torch.randn(8, 2))
    again = round_to_nearest(original.dequantize())
    torch.testing.assert_close(again.dequantize(), original.dequantize(), rtol=0, atol=1e-5)
    assert torch.equal(again.q, q)


def test_round_to_nearest_error_is_within_half_a_step():
    weight = torch.randn(16, 96, generator=torch.Generator().manual_seed(3))
    rounded = round_to_nearest(weight)
    step = rounded.scale.repeat_interleave(32, dim=1)
    assert ((rounded.dequantize() - weight).abs() <= step / 2 + 1e-6).all()


def write_gguf(path, kinds: dict[str, str], heads: int, kv_heads: int, hidden: int, ffn: int) -> dict[str, np.ndarray]:
    """A one-layer GGUF file with the seven decoder linears in the given types (and a Q8_0 embedding);
    returns each linear's dequantized weight as the file stores it."""
    shapes = {"q": (hidden, hidden), "k": (hidden // heads * kv_heads, hidden), "v": (hidden // heads * kv_heads, hidden),
              "o": (hidden, hidden), "gate": (ffn, hidden), "up": (ffn, hidden), "down": (hidden, ffn)}
    writer = GGUFWriter(str(path), "llama")
    stored = {}
    for i, (key, gguf_name) in enumerate(LINEARS.items()):
        rows, cols = shapes[key]
        kind = kinds[key]
        raw = random_blocks(kind, rows, cols, seed=10 + i)
        stored[key] = quants.dequantize(raw, getattr(GGMLQuantizationType, kind)).astype(np.float32)
        writer.add_tensor(f"blk.0.{gguf_name}.weight", raw, raw_dtype=getattr(GGMLQuantizationType, kind))
    writer.add_tensor("token_embd.weight", random_blocks("Q8_0", 32, hidden), raw_dtype=GGMLQuantizationType.Q8_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return stored


def test_a_gguf_file_is_read_per_tensor_kind(tmp_path):
    kinds = {"q": "Q4_0", "k": "Q4_1", "v": "Q4_K", "o": "Q8_0", "gate": "Q4_1", "up": "Q4_K", "down": "Q4_0"}
    heads, kv_heads, hidden, ffn = 4, 2, 256, 512
    stored = write_gguf(tmp_path / "tiny.gguf", kinds, heads, kv_heads, hidden, ffn)
    native = read_native_linears(tmp_path / "tiny.gguf", 1, heads, kv_heads)
    layer = native.layers[0]
    assert layer["o"] is None  # Q8_0 is left to the dequantized float weights
    for key in ("q", "k"):  # llama.cpp's rotary interleaving undone, rows only
        order = unpermute_rows(stored[key].shape[0], heads if key == "q" else kv_heads)
        torch.testing.assert_close(layer[key].dequantize(), torch.from_numpy(stored[key])[order], rtol=0, atol=1e-6)
    for key in ("v", "gate", "up", "down"):
        torch.testing.assert_close(layer[key].dequantize(), torch.from_numpy(stored[key]), rtol=0, atol=1e-6)
    assert native.paths["Q8_0"] == "float32, dequantized (2 tensors)"
    assert native.paths["Q4_1"] == "int4 kernel, as stored (2 tensors)"


def test_unpermute_rows_inverts_the_llama_cpp_interleaving():
    """llama.cpp stores row (h, j, r) of a head's halves at (h, r, j): rows w.reshape(H, 2, d/2).swapaxes."""
    rows, heads = 24, 3
    original = torch.arange(rows)
    stored = original.view(heads, 2, rows // heads // 2).transpose(1, 2).reshape(rows)
    assert torch.equal(stored[unpermute_rows(rows, heads)], original)


def integer_rows(x: torch.Tensor) -> torch.Tensor:
    """x as the integer kernel sees it: per row and group of 32, round(x / d) * d, d = max |x| / 16383."""
    groups = x.view(x.shape[0], -1, 32)
    d = groups.abs().amax(-1, keepdim=True) / 16383
    return (torch.round(groups / torch.where(d > 0, d, 1)) * d).view_as(x)


def integer_weight(weight: Int4Weight) -> torch.Tensor:
    """The weight as the integer kernel sees it: w = q s + (z - 8 s), s and z - 8 s in float16."""
    s, m = weight.scale.half().float(), (weight.zero - 8 * weight.scale).half().float()
    return Int4Weight(weight.q, s, m + 8 * s).dequantize()


@pytest.mark.parametrize("integer", [True, False], ids=["integer-kernel", "pytorch-int4"])
def test_the_int4_kernel_rows_are_invariant_and_equal_the_rounded_weight(integer, monkeypatch):
    """Either kernel: rows invariant, and the product of the rows and the weight as that kernel rounds them (the
    integer one exactly up to float32 sums; PyTorch's with its output rounded to bfloat16)."""
    if not integer:
        monkeypatch.setattr(fused, "library", lambda: None)
    weight = round_to_nearest(torch.randn(96, 64, generator=torch.Generator().manual_seed(4)))
    linear = kernels.Int4Linear(weight)
    assert linear.fused_kernel == integer
    x = torch.randn(MAX_K, 64, generator=torch.Generator().manual_seed(5))
    rows = linear(x)
    assert rows.dtype == torch.float32
    assert torch.equal(rows, torch.cat([linear(x[i : i + 1]) for i in range(MAX_K)]))
    if integer:
        torch.testing.assert_close(rows, integer_rows(x) @ integer_weight(weight).T, rtol=1e-5, atol=1e-4)
    else:
        torch.testing.assert_close(rows, x.bfloat16().float() @ kernel_weight(weight).T, rtol=0.02, atol=0.05)
    # the control: an 8-bit rounding of the activations (llama.cpp's) is further off than the kernel's own
    eight = (x.view(MAX_K, -1, 32).abs().amax(-1, keepdim=True) / 127).clamp(min=1e-30)
    coarse = (torch.round(x.view(MAX_K, -1, 32) / eight) * eight).view_as(x) @ integer_weight(weight).T
    if integer:
        assert not torch.allclose(rows, coarse, rtol=1e-5, atol=1e-4)


_INTEGER_ROWS = """\
import sys, torch
from diffdraft.backends import kernels
from diffdraft.backends.int4 import round_to_nearest
weight = round_to_nearest(torch.randn(96, 64, generator=torch.Generator().manual_seed(4)))
linear = kernels.Int4Linear(weight)
assert linear.fused_kernel
x = torch.randn(5, 64, generator=torch.Generator().manual_seed(5))
torch.save((linear(x), torch.cat([linear(x[i : i + 1]) for i in range(5)])), sys.argv[1])
"""


def integer_rows_built_for(march: str, folder) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows of a 5-row call, the same rows one at a time) from a library built for `march` in a fresh cache."""
    (folder / "rows.py").write_text(_INTEGER_ROWS)
    env = dict(os.environ, DIFFDRAFT_CACHE=str(folder / "cache"), DIFFDRAFT_FUSED_MARCH=march)
    done = subprocess.run([sys.executable, "rows.py", str(folder / "rows.pt")], cwd=folder, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return torch.load(folder / "rows.pt")


@pytest.fixture(scope="module")
def native_integer_rows(tmp_path_factory):
    return integer_rows_built_for("native", tmp_path_factory.mktemp("native-build"))


@pytest.mark.parametrize("march", ["haswell", "x86-64"], ids=["avx2", "plain-c++"])
def test_the_integer_kernel_gives_the_same_bits_on_every_instruction_set(tmp_path, march, native_integer_rows):
    """The kernel's AVX2 path (haswell) and its plain C++ one (x86-64), built here in a fresh cache, give exactly
    the bits of this machine's own build (integer sums are exact; the float steps are the same fused
    multiply-adds in the same order), with rows invariant."""
    native, native_alone = native_integer_rows
    other, other_alone = integer_rows_built_for(march, tmp_path)
    assert torch.equal(native, native_alone) and torch.equal(other, other_alone)
    assert torch.equal(native, other)


@pytest.mark.parametrize("fused", [True, False], ids=["fused-layers", "python-layers"])
def test_native_rows_are_bit_identical_to_one_token_forwards(tiny_model, tiny_tokenizer, fused):
    target = build_target(tiny_model, tiny_tokenizer, backend="lean", tap_layers=(0, 2, 4), weights="int4",
                          report=lambda line: None, fused=fused)
    assert target.weights == "int4" and target.row_invariant
    assert target.fused_layers == fused, target.fused_note
    ids = torch.randint(0, 256, (1, CONTEXT + MAX_K), generator=torch.Generator().manual_seed(0))
    for k in range(1, MAX_K + 1):
        batched, single = k_token_vs_one_token(target, ids, k)
        assert torch.equal(batched, single), f"k = {k}: max difference {(batched - single).abs().max()}"


def test_the_fused_attention_on_two_threads_gives_the_one_thread_bits(tiny_model, tiny_tokenizer, monkeypatch):
    """Forced onto torch's threads (PARALLEL_WORK 1), each (row, head) is still computed alone: a k-row forward
    equals one-token forwards and the one-thread run, bit for bit."""
    from diffdraft.backends import fused

    target = build_target(tiny_model, tiny_tokenizer, backend="lean", tap_layers=(0, 2, 4), weights="int4",
                          report=lambda line: None)
    assert target.fused_layers, target.fused_note
    ids = torch.randint(0, 256, (1, CONTEXT + MAX_K), generator=torch.Generator().manual_seed(0))
    serial = k_token_vs_one_token(target, ids, MAX_K)[0]
    monkeypatch.setattr(fused, "PARALLEL_WORK", 1)
    torch.set_num_threads(2)
    batched, single = k_token_vs_one_token(target, ids, MAX_K)
    assert torch.equal(batched, single) and torch.equal(batched, serial)


def test_the_row_loops_of_a_long_forward_split_among_threads_without_changing_bits(tiny_model, tiny_tokenizer):
    """From 32 rows the fused stack's row loops (norms, RoPE and cache writes, SiLU, the residual adds) run on
    torch's threads (fused_layers.cpp, for_rows); each row still gets a one-token forward's bits."""
    target = build_target(tiny_model, tiny_tokenizer, backend="lean", tap_layers=(0, 2, 4), weights="int4",
                          report=lambda line: None)
    assert target.fused_layers, target.fused_note
    ids = torch.randint(0, 256, (1, CONTEXT + 40), generator=torch.Generator().manual_seed(3))
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        batched, single = k_token_vs_one_token(target, ids, 40)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(batched, single), f"max difference {(batched - single).abs().max()}"


def test_the_identity_fails_when_a_non_invariant_kernel_is_swapped_in(tiny_model, tiny_tokenizer, monkeypatch):
    """Negative control: the int4 linears replaced by F.linear on their weights (MKL) lose the identity
    (the Python layers, where a kernel can be swapped)."""
    target = build_target(tiny_model, tiny_tokenizer, backend="lean", tap_layers=(0, 2, 4), weights="int4",
                          report=lambda line: None, fused=False)
    dense = {}
    kernel = kernels.Int4Linear.__call__

    def f_linear(self, x, widen=True):
        if id(self) not in dense:
            dense[id(self)] = kernel(self, torch.eye(self.in_features)).T.contiguous()  # [out, in]
        return torch.nn.functional.linear(x, dense[id(self)])

    monkeypatch.setattr(kernels.Int4Linear, "__call__", f_linear)
    ids = torch.randint(0, 256, (1, CONTEXT + MAX_K), generator=torch.Generator().manual_seed(0))
    differs = [k for k in range(2, MAX_K + 1) if not torch.equal(*k_token_vs_one_token(target, ids, k))]
    assert differs, "F.linear happened to be row-invariant: the bit-identity test proves nothing here"


def test_the_fused_layers_agree_with_the_python_layers(tiny_model, tiny_tokenizer):
    """The fused C++ layers compute what the Python layers do: logits and taps close (on SmolLM2 their own
    sums and roundings make the bits differ; on the tiny model's small activations they happen to agree)."""
    ids = torch.randint(0, 256, (1, CONTEXT + MAX_K), generator=torch.Generator().manual_seed(0))
    outs = []
    for fused in (True, False):
        target = build_target(tiny_model, tiny_tokenizer, backend="lean", tap_layers=(0, 2, 4), weights="int4",
                              report=lambda line: None, fused=fused)
        state = target.new_state()
        target.prefill(state, ids[:, :CONTEXT])
        out = target.forward(state, ids[:, CONTEXT:], want_taps=True)
        outs.append((out.logits, out.taps))
    (logits, taps), (py_logits, py_taps) = outs
    torch.testing.assert_close(logits, py_logits, rtol=0, atol=0.05)
    torch.testing.assert_close(taps, py_taps, rtol=0, atol=0.05)


def test_without_a_build_the_layers_run_in_python_and_the_load_line_says_why(tiny_model, tiny_tokenizer,
                                                                          monkeypatch):
    from diffdraft.backends import fused

    def no_compiler():
        raise RuntimeError("Command 'c++' not found\nmore lines")

    monkeypatch.setattr(fused, "_state", {})
    monkeypatch.setattr(fused, "_build", no_compiler)
    lines = []
    target = build_target(tiny_model, tiny_tokenizer, backend="lean", weights="int4", report=lines.append)
    assert not target.fused_layers
    assert "decoder layers in Python (the fused layers did not build (Command 'c++' not found))" in lines[0]
    monkeypatch.setattr(fused, "_state", {})
    monkeypatch.setenv("DIFFDRAFT_FUSED", "0")
    assert not build_target(tiny_model, tiny_tokenizer, backend="lean", weights="int4",
                            report=lambda line: None).fused_layers


def test_a_damaged_build_is_made_again(tmp_path):
    """A library in the cache that does not load (here: garbage bytes) is compiled again, in a fresh process
    (a process loads the op's library once); the build then prunes the builds beside it that no process has
    loaded for UNUSED_BUILD_DAYS, and keeps a recent one."""
    builds = tmp_path / "fused"
    stale, recent = builds / "0000000000000000", builds / "1111111111111111"
    for folder in (stale, recent):
        folder.mkdir(parents=True)
        (folder / "diffdraft_fused.so").write_bytes(b"an old build")
    month_ago = time.time() - (fused.UNUSED_BUILD_DAYS + 1) * 86400
    os.utime(stale, (month_ago, month_ago))
    script = (
        "from diffdraft.backends import fused\n"
        "path = fused.build_folder() / (fused.NAME + '.so')\n"
        "path.parent.mkdir(parents=True)\n"
        "path.write_bytes(b'not a library')\n"
        "op, why = fused.fused_layers()\n"
        "assert op is not None, why\n"
        "print('rebuilt', path.stat().st_size > 10000)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "DIFFDRAFT_CACHE": str(tmp_path)})
    assert done.returncode == 0, done.stderr
    assert "rebuilt True" in done.stdout
    assert "compiling the fused CPU layers" in done.stderr
    assert not list(tmp_path.rglob("*.partial"))
    assert not stale.exists() and recent.exists()


def test_int4_weights_stay_close_to_float32(tiny_model, tiny_tokenizer):
    """Rounding to 4 bits moves the tiny model's logits, but not far (stated bound, seen ~0.08)."""
    ids = torch.randint(0, 256, (1, 30), generator=torch.Generator().manual_seed(6))
    outs = []
    for weights in ("float32", "int4"):
        target = build_target(tiny_model, tiny_tokenizer, backend="lean", weights=weights, report=lambda line: None)
        outs.append(target.prefill(target.new_state(), ids).logits)
    difference = (outs[0] - outs[1]).abs().max()
    assert 0 < difference < 0.5


def test_weight_choices_are_resolved_or_refused_in_one_line(tiny_model, tmp_path):
    gguf = tmp_path / "model.gguf"
    assert resolve_weights("auto", "auto", tiny_model, gguf) == "native"
    assert resolve_weights("auto", "auto", tiny_model, None) == "float32"
    assert resolve_weights("auto", "hf", tiny_model, gguf) == "float32"
    assert resolve_weights("int4", "lean", tiny_model, None) == "int4"
    with pytest.raises(DiffdraftError, match="not a GGUF file: use --weights int4"):
        resolve_weights("native", "auto", tiny_model, None)
    with pytest.raises(DiffdraftError, match="lean runtime"):
        resolve_weights("native", "hf", tiny_model, gguf)
    with pytest.raises(DiffdraftError, match="weights must be one of"):
        resolve_weights("int3", "auto", tiny_model, gguf)
    with pytest.raises(DiffdraftError, match="--dtype float32"):
        resolve_weights("int4", "auto", make_llama().to(torch.bfloat16), None)


def test_the_kernel_choice_follows_the_cpu_capability(monkeypatch, tiny_tokenizer):
    """Forced down to AVX2, bfloat16 gets no oneDNN kernel and the lean runtime refuses it in one line;
    float32 and the int4 kernel still run. The forced level can only lower the CPU's own."""
    monkeypatch.setenv(kernels.CAPABILITY_ENV, "AVX2")
    assert kernels.cpu_capability() in ("AVX2", "DEFAULT")
    assert not kernels.onednn_bf16_supported()
    assert not kernels.onednn_ready(torch.zeros(4, 4, dtype=torch.bfloat16))
    assert kernels.onednn_ready(torch.zeros(4, 4))
    with pytest.raises(DiffdraftError, match="AVX-512") as refused:
        LeanLlamaTarget(make_llama().to(torch.bfloat16), tiny_tokenizer)
    assert "\n" not in str(refused.value)
    target = build_target(make_llama(), tiny_tokenizer, backend="lean", weights="int4", report=lambda line: None)
    assert target.prefill(target.new_state(), torch.zeros(1, 3, dtype=torch.long)).logits.isfinite().all()
    monkeypatch.setenv(kernels.CAPABILITY_ENV, "DEFAULT")
    assert kernels.cpu_capability() == "DEFAULT"
    monkeypatch.setenv(kernels.CAPABILITY_ENV, "AVX512")  # never raised above what the CPU has
    assert kernels.cpu_capability() == torch.backends.cpu.get_cpu_capability()


def int4_target(model, tokenizer, bulk_prefill: bool = True) -> LeanLlamaTarget:
    int4 = [{key: round_to_nearest(layer.get_submodule(path).weight) for key, path in MODULE_PATHS.items()}
            for layer in model.model.layers]
    return LeanLlamaTarget(model, tokenizer, int4_layers=int4, weights="int4", bulk_prefill=bulk_prefill)


def test_the_bulk_kernel_computes_the_4_bit_weight_in_bfloat16():
    if not kernels.onednn_bf16_supported():
        pytest.skip("this CPU has no oneDNN bfloat16 kernel, so no bulk kernel (the next test checks the refusal)")
    weight = round_to_nearest(torch.randn(96, 1536, generator=torch.Generator().manual_seed(4)))
    x = torch.randn(40, 1536, generator=torch.Generator().manual_seed(5))
    rows = kernels.BulkLinear(weight)(x)
    assert rows.dtype == torch.float32
    expected = x @ weight.dequantize().T
    torch.testing.assert_close(rows, expected, rtol=0.03, atol=0.3)  # inputs, weights and output in bfloat16


def test_long_prefills_take_the_bulk_kernels_only_where_the_cpu_runs_bfloat16(tiny_model, tiny_tokenizer,
                                                                              monkeypatch):
    """A prefill of BULK_ROWS tokens or more runs on the bfloat16 copy (close to the 4-bit kernel's logits,
    not equal); shorter prefills and every other forward on the 4-bit kernel; forced down to AVX2, no copy."""
    ids = torch.randint(0, 256, (1, BULK_ROWS + 4), generator=torch.Generator().manual_seed(6))
    rowwise = int4_target(tiny_model, tiny_tokenizer, bulk_prefill=False)

    def prefill(target, n):
        return target.prefill(target.new_state(), ids[:, :n]).logits

    if kernels.onednn_bf16_supported():
        bulk = int4_target(tiny_model, tiny_tokenizer)
        assert bulk.bulk_prefill and bulk.row_invariant
        long_bulk, long_rowwise = prefill(bulk, BULK_ROWS), prefill(rowwise, BULK_ROWS)
        assert not torch.equal(long_bulk, long_rowwise)
        torch.testing.assert_close(long_bulk, long_rowwise, rtol=0.05, atol=0.05)
        assert torch.equal(prefill(bulk, BULK_ROWS - 1), prefill(rowwise, BULK_ROWS - 1))
        state, rowwise_state = bulk.new_state(), rowwise.new_state()
        bulk.prefill(state, ids[:, :3])
        rowwise.prefill(rowwise_state, ids[:, :3])
        assert torch.equal(bulk.forward(state, ids[:, 3:]).logits, rowwise.forward(rowwise_state, ids[:, 3:]).logits)
    monkeypatch.setenv(kernels.CAPABILITY_ENV, "AVX2")
    without = int4_target(tiny_model, tiny_tokenizer)
    assert not without.bulk_prefill
    assert torch.equal(prefill(without, BULK_ROWS + 4), prefill(rowwise, BULK_ROWS + 4))
    with pytest.raises(ValueError, match="oneDNN"):
        kernels.BulkLinear(round_to_nearest(torch.randn(8, 32)))


def test_a_long_prefill_runs_in_the_fused_stack_on_the_bfloat16_copies(tiny_model, tiny_tokenizer, monkeypatch):
    """Where the CPU runs bfloat16, a prefill of BULK_ROWS tokens or more runs in the fused C++ stack on the
    bfloat16 copies (no Python layer runs it) and agrees with the Python layers' bulk prefill: logits, taps and
    every cache row close. Control: the same prefill with each row rotated for the next position is not close."""
    ids = torch.randint(0, 256, (1, BULK_ROWS + 8), generator=torch.Generator().manual_seed(7))
    calls = []
    bulk_call = kernels.BulkLinear.__call__
    monkeypatch.setattr(kernels.BulkLinear, "__call__", lambda self, x, widen=True: calls.append(1) or
                        bulk_call(self, x, widen))

    def prefill(fused):
        target = build_target(tiny_model, tiny_tokenizer, backend="lean", tap_layers=(0, 2, 4), weights="int4",
                              report=lambda line: None, fused=fused)
        state = target.new_state()
        calls.clear()
        out = target.prefill(state, ids, want_taps=True)
        return target, (out.logits, out.taps, state.cache[:, :, :, : ids.shape[1]]), len(calls)

    target, fused_out, fused_calls = prefill(True)
    if not kernels.onednn_bf16_supported():
        assert "prefills bfloat16" not in target.fused_note
        return
    assert target.fused_layers and "prefills bfloat16" in target.fused_note
    _, python_out, python_calls = prefill(False)
    assert fused_calls == 0 and python_calls > 0
    for fused_part, python_part in zip(fused_out, python_out):
        torch.testing.assert_close(fused_part, python_part, rtol=0, atol=0.05)
    phases = LeanLlamaTarget._rope_phases
    monkeypatch.setattr(LeanLlamaTarget, "_rope_phases", lambda self, rotary: phases(self, rotary).roll(-1, dims=0))
    _, shifted, _ = prefill(True)
    assert not all(torch.allclose(a, b, rtol=0, atol=0.05) for a, b in zip(shifted, python_out))


def test_drift_measures_on_the_tiny_model(tiny_model, tiny_tokenizer):
    """The quality check's arithmetic: a target against itself agrees everywhere with equal NLL; int4 against
    float32 agrees less; greedy divergence is found where answers part."""
    from diffdraft.bench.drift import compare_on_texts, divergence_summary

    float32 = build_target(tiny_model, tiny_tokenizer, backend="lean")
    int4 = build_target(tiny_model, tiny_tokenizer, backend="lean", weights="int4", report=lambda line: None)
    items = [([1, 2, 3], [4, 5, 6, 7]), ([9, 8], [7])]
    same_a, same_b = compare_on_texts(float32, float32, items)
    assert same_a.tokens == same_b.tokens == 5 and same_b.agree == 5 and same_a.nll == pytest.approx(same_b.nll)
    _, other = compare_on_texts(float32, int4, items)
    assert other.tokens == 5 and other.mean_nll != same_a.mean_nll
    summary = divergence_summary({"a": [1, 2, 3], "b": [1, 2], "c": [5] * 70}, {"a": [1, 2, 3], "b": [1, 3], "c": [5] * 69 + [6]})
    assert summary["identical"] == 1 and summary["positions"] == [1, 69]
    assert summary["first_divergence"] == {"0-15": 1, "16-63": 0, "64-127": 1, "128+": 0}


def test_the_native_read_is_cached_whole_and_refreshed_when_damaged(tmp_path):
    kinds = {"q": "Q4_0", "k": "Q4_1", "v": "Q4_K", "o": "Q8_0", "gate": "Q4_1", "up": "Q4_K", "down": "Q4_0"}
    write_gguf(tmp_path / "tiny.gguf", kinds, 4, 2, 256, 512)
    cache = tmp_path / "cache" / "tiny.safetensors"
    direct = read_native_linears(tmp_path / "tiny.gguf", 1, 4, 2)
    first = read_native_linears(tmp_path / "tiny.gguf", 1, 4, 2, cache=cache)
    assert cache.is_file() and not list(cache.parent.glob("*.tmp-*"))
    (tmp_path / "tiny.gguf").unlink()  # the second read comes from the cache alone
    again = read_native_linears(tmp_path / "tiny.gguf", 1, 4, 2, cache=cache)
    assert again.paths == first.paths == direct.paths and again.layers[0]["o"] is None
    for key in ("q", "k", "v", "gate", "up", "down"):
        for part in ("q", "scale", "zero"):
            assert torch.equal(getattr(again.layers[0][key], part), getattr(direct.layers[0][key], part)), key
    cache.write_bytes(b"damaged")
    with pytest.raises(DiffdraftError, match="could not read the GGUF file"):  # damaged cache: back to the file
        read_native_linears(tmp_path / "tiny.gguf", 1, 4, 2, cache=cache)


def test_the_half_kernel_rows_are_invariant_and_equal_the_float16_weight(monkeypatch):
    """HalfLinear: float32 rows in and out, the weight rounded to float16; each row computed alone."""
    if not kernels.half_supported():
        pytest.skip("FBGEMM's float16 linear does not run on this CPU (the refusal is checked below)")
    generator = torch.Generator().manual_seed(7)
    weight, bias = torch.randn(97, 576, generator=generator), torch.randn(97, generator=generator)
    linear = kernels.HalfLinear(weight, bias)
    x = torch.randn(MAX_K, 576, generator=generator)
    rows = linear(x)
    assert rows.dtype == torch.float32
    assert torch.equal(rows, torch.cat([linear(x[i : i + 1]) for i in range(MAX_K)]))
    expected = x @ weight.half().float().T + bias
    torch.testing.assert_close(rows, expected, rtol=1e-5, atol=1e-4)  # only the sums' order differs
    assert (rows - x @ weight.T - bias).abs().max() > 0  # the weight really is rounded
    monkeypatch.setenv(kernels.CAPABILITY_ENV, "DEFAULT")
    assert not kernels.half_supported()
    with pytest.raises(ValueError, match="FBGEMM"):
        kernels.HalfLinear(weight)


def test_a_4_bit_target_reads_its_head_in_float16_and_its_drafter_follows(tiny_model, tiny_tokenizer, monkeypatch):
    """With 4-bit weights the LM head (and the block-diffusion drafter over it) reads float16 weights where FBGEMM
    runs, close to the float32 head; float32 targets, and CPUs without FBGEMM's kernel, keep float32."""
    from diffdraft.drafters.block_diffusion import BlockDiffusionDrafter
    from diffdraft.models.block_diffusion import BlockDiffusionConfig, BlockDiffusionNet

    def drafter_kernels(target):
        config = BlockDiffusionConfig(hidden_size=target.hidden_size, num_taps=1, num_layers=1, num_heads=4,
                                      num_kv_heads=2, head_dim=target.hidden_size // 4, intermediate_size=32,
                                      block_size=4)
        drafter = BlockDiffusionDrafter(target, BlockDiffusionNet(config), (2,))
        return {type(module.kernel) for module in drafter._fast.modules() if hasattr(module, "kernel")} | \
            {type(drafter.head._weight)}

    if kernels.half_supported():
        half = build_target(tiny_model, tiny_tokenizer, backend="lean", tap_layers=(2,), weights="int4", fused=False,
                            report=lambda line: None)  # (over fused 4-bit layers the drafter's run 4-bit too)
        assert half.half_head and drafter_kernels(half) == {kernels.HalfLinear}
        full = int4_target(tiny_model, tiny_tokenizer)
        full.half_head, full._head = False, kernels.PreparedLinear(tiny_model.lm_head.weight)
        ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(8))
        with_half, with_full = (t.prefill(t.new_state(), ids).logits for t in (half, full))
        assert not torch.equal(with_half, with_full)
        torch.testing.assert_close(with_half, with_full, rtol=1e-3, atol=1e-3)
    plain = build_target(tiny_model, tiny_tokenizer, backend="lean", tap_layers=(2,), report=lambda line: None)
    assert not plain.half_head and drafter_kernels(plain) == {kernels.PreparedLinear}
    monkeypatch.setenv(kernels.CAPABILITY_ENV, "DEFAULT")
    assert not int4_target(tiny_model, tiny_tokenizer).half_head

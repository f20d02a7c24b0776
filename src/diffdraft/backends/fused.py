"""The fused C++ layer stack (fused_layers.cpp): built once per machine with the system's C++ compiler, then
loaded from the cache; `fused_layers()` hands out its op, or None with the reason it is not here.

One call of the C++ compiler (c++, or $CXX) against torch's own headers and libraries: keyed by the source,
the torch version and this CPU's instruction sets (it is compiled for this CPU), about 10 s on two cores,
said on stderr when it happens. Without a compiler the lean runtime runs its layers in Python and its
load line says why; DIFFDRAFT_FUSED=0 asks for the Python layers. A FusedStack holds what the op takes
that does not change between calls (a stack's norms and 4-bit weights, its attention's head counts). Knows nothing of
models: the lean runtime and the block-diffusion drafter decide when to use it.
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from diffdraft.backends.kernels import cpuinfo_field
from diffdraft.loading import cache_dir

SOURCE = Path(__file__).with_name("fused_layers.cpp")
HEADERS = (Path(__file__).with_name("int4_kernel.h"),)  # included by SOURCE
NAME = "diffdraft_fused"
# A layer's attention over fewer (keys x heads x head dim) than this stays on one thread, where waking the
# others would cost more than they save. Measured on SmolLM2 at 2 threads (docs/native-weights.md): from
# 32 tokens of context up, threads already pay at one row (8.4 against 8.5 ms a step; 15.5 against 20.7
# ms at 1,500 tokens).
PARALLEL_WORK = 1 << 12
# A build in the cache that no process has loaded for this many days is removed (fused._prune_builds).
UNUSED_BUILD_DAYS = 30
# The instruction set the library is compiled for: this CPU's own by default; a test sets an older one (haswell:
# AVX2 without AVX-512; x86-64: neither) to run the kernels' other paths on this machine.
MARCH_ENV = "DIFFDRAFT_FUSED_MARCH"
_state: dict[str, object] = {}


@functools.cache
def build_key() -> str:
    """Which build this process needs: a hash of the source, the torch version and this CPU's instruction-set
    flags (the library is compiled with -march=native, or the MARCH_ENV asked for)."""
    flags = cpuinfo_field("flags") or torch.backends.cpu.get_cpu_capability()
    flags += f" march={march()}"
    code = b"".join(path.read_bytes() for path in (SOURCE, *HEADERS))
    return hashlib.sha256(code + torch.__version__.encode() + flags.encode()).hexdigest()[:16]


def march() -> str:
    return os.environ.get(MARCH_ENV, "native")


def build_folder() -> Path:
    return cache_dir() / "fused" / build_key()


def compile_command(source: Path, output: Path) -> list[str]:
    """The one compiler call that builds `source` into a shared library against this torch."""
    torch_dir = Path(torch.__file__).parent
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    # -fopenmp with torch's own libgomp (already loaded by torch): at::parallel_for then runs on torch's threads
    return [os.environ.get("CXX", "c++"), "-O3", f"-march={march()}", "-fopenmp", "-std=c++20", "-shared", "-fPIC",
            f"-D_GLIBCXX_USE_CXX11_ABI={abi}", "-isystem", str(torch_dir / "include"),
            "-isystem", str(torch_dir / "include" / "torch" / "csrc" / "api" / "include"),
            str(source), "-o", str(output), f"-L{torch_dir / 'lib'}", "-lc10", "-ltorch_cpu", "-lgomp"]


def _build():
    """The loaded library's ops (torch.ops.diffdraft_fused), built first where needed."""
    folder = build_folder()
    built = folder / f"{NAME}.so"
    if built.exists():
        try:
            torch.ops.load_library(str(built))
            return torch.ops.diffdraft_fused
        except OSError:  # a damaged library (a disk that filled, say): built again below
            built.unlink(missing_ok=True)
    folder.mkdir(parents=True, exist_ok=True)
    partial = folder / f"{NAME}.{os.getpid()}.so.partial"  # renamed into place whole, never half-written
    tick = time.perf_counter()
    print("compiling the fused CPU layers for this machine (once)...", file=sys.stderr, flush=True)
    try:
        done = subprocess.run(compile_command(SOURCE, partial), capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError((done.stderr.strip() or f"the compiler exited {done.returncode}").splitlines()[0])
        partial.replace(built)
    finally:
        partial.unlink(missing_ok=True)
    print(f"compiled in {time.perf_counter() - tick:.0f} s", file=sys.stderr, flush=True)
    torch.ops.load_library(str(built))
    return torch.ops.diffdraft_fused


def _prune_builds(keep: Path, unused_days: float = UNUSED_BUILD_DAYS) -> None:
    """Mark `keep` used now and remove the other builds in its cache folder that no process has loaded for
    `unused_days` (older sources, torch versions or CPUs; a few hundred KB each). Best effort: a build another process
    is using was loaded recently, and whatever cannot be removed stays."""
    now = time.time()
    try:
        os.utime(keep, (now, now))
        for other in keep.parent.iterdir():
            if other != keep and other.is_dir() and now - other.stat().st_mtime > unused_days * 86400:
                shutil.rmtree(other, ignore_errors=True)
    except OSError:  # a read-only cache, a folder another process removed meanwhile
        pass


def library():
    """The library's ops (run_layers, pack_int4, int4_linear) where it runs here, else None (fused_layers says
    why). Built at most once per process."""
    if _turned_off():
        return None
    if "ops" not in _state:
        try:
            _state["ops"], _state["why"] = _build(), ""
        except Exception as error:  # no compiler, no headers, a failed build: the Python layers run instead
            first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            _state["ops"], _state["why"] = None, f"the fused layers did not build ({first})"
        if _state["ops"] is not None:
            _prune_builds(keep=build_folder())
    return _state["ops"]


def fused_layers() -> tuple[Callable | None, str]:
    """(the layer op, "") where the fused layers run here, else (None, why not)."""
    ops = library()
    if ops is None:
        return None, "DIFFDRAFT_FUSED=0" if _turned_off() else _state["why"]  # type: ignore[return-value]
    return ops.run_layers, ""


def _turned_off() -> bool:
    return os.environ.get("DIFFDRAFT_FUSED", "1") == "0"


@dataclass(frozen=True)
class FusedStack:
    """A stack of Llama-shaped layers for the fused op: per layer two RMSNorm weights and four 4-bit linears
    (q/k/v with q and k rows in rotary-pair order, o, gate/up, down), in the integer kernel's layout
    (kernels.Int4Linear's codes and sm), and optionally the same four as bfloat16 copies in oneDNN's layout
    (kernels.BulkLinear's) for long prefills. Weights only: no request's state."""

    op: Callable
    attn_norms: list[torch.Tensor]
    mlp_norms: list[torch.Tensor]
    codes: list[torch.Tensor]
    sm: list[torch.Tensor]
    heads: int
    kv_heads: int
    head_dim: int
    eps: float
    bulk_op: Callable | None = None  # run_layers_bulk, where `packed` holds the bfloat16 copies
    packed: tuple[torch.Tensor, ...] = ()

    @classmethod
    def of(cls, op: Callable, norms: Sequence[tuple[torch.Tensor, torch.Tensor]], linears: Sequence,
           heads: int, kv_heads: int, head_dim: int, eps: float, bulk: Sequence = ()) -> "FusedStack":
        """norms: per layer (attention norm, MLP norm); linears: four kernels.Int4Linear per layer, in the order a
        layer runs them, each on the integer kernel; bulk: the same four per layer as kernels.BulkLinear (or
        none: prefills then run on the 4-bit kernel too)."""
        packed = tuple(lin.packed_weight for lin in bulk)
        return cls(op, [a.float().contiguous() for a, _ in norms], [m.float().contiguous() for _, m in norms],
                   [lin.codes for lin in linears], [lin.sm for lin in linears], heads, kv_heads,
                   head_dim, float(eps), library().run_layers_bulk if packed else None, packed)

    @property
    def has_bulk(self) -> bool:
        return self.bulk_op is not None

    def run(self, x: torch.Tensor, caches: list[torch.Tensor], sizes: list[int], starts: list[int],
            chains: list[int], seen: torch.Tensor, seen_offsets: torch.Tensor, pairs: torch.Tensor,
            taps: list[int] = (), bulk: bool = False) -> list[torch.Tensor]:
        """Every layer over x [R, D] float32, in place (the arguments as fused_layers.cpp's run_layers states
        them); returns x after each layer listed in taps. bulk: on the bfloat16 copies (has_bulk), for a prefill
        whose rows no one-token forward has to match."""
        shared = (caches, sizes, starts, chains, seen, seen_offsets, pairs, self.heads, self.kv_heads, self.head_dim,
                  self.eps, list(taps), PARALLEL_WORK)
        if bulk:
            if not self.has_bulk:
                raise ValueError("this stack has no bfloat16 copies of its weights")
            return self.bulk_op(x, self.attn_norms, self.mlp_norms, list(self.packed), *shared)
        return self.op(x, self.attn_norms, self.mlp_norms, self.codes, self.sm, *shared)

// The lean runtime's decoder layers for 4-bit weights, as one C++ call per forward (docs/native-weights.md,
// "The fused layer stack"). Between the 4-bit matmuls (int4_kernel.h's, which the Python path's Int4Linear
// runs too) everything a layer does -- RMSNorm, RoPE, the cache writes, attention, SiLU -- is a plain loop
// here, so a one-row step costs the matmuls plus microseconds instead of some forty PyTorch ops per layer.
// A long prefill runs the same layers with oneDNN's bfloat16 linear on a bfloat16 copy of the weights
// (run_layers_bulk; docs/native-weights.md, "Prefills in the fused stack"): the weight reads are shared
// across its many rows there, and no one-token forward has to match its rows.
//
// Every row is computed alone, in the same order whatever the other rows are: a k-row forward gives each row
// the bits a one-row forward at its position gives. Knows nothing of models, tokenizers or Python.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <cmath>
#include <functional>
#include <optional>
#include <string_view>
#include <vector>

#include "int4_kernel.h"

namespace {

using at::Tensor;

constexpr int64_t kLanes = 16;  // independent partial sums: the compiler vectorizes them without reassociating

float dot(const float* a, const float* b, int64_t n) {
  float lanes[kLanes] = {0};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int64_t l = 0; l < kLanes; ++l) lanes[l] += a[i + l] * b[i + l];
  float sum = 0;
  for (int64_t l = 0; l < kLanes; ++l) sum += lanes[l];
  for (; i < n; ++i) sum += a[i] * b[i];
  return sum;
}

// Below this many rows a row loop stays on the calling thread (a step's few rows); a prefill's rows split among
// torch's threads. Each row is computed alone either way, so the split changes no bits.
constexpr int64_t kRowsPerThread = 16;

// body(r) for every row r < rows.
void for_rows(int64_t rows, const std::function<void(int64_t)>& body) {
  if (rows < 2 * kRowsPerThread) {
    for (int64_t r = 0; r < rows; ++r) body(r);
    return;
  }
  at::parallel_for(0, rows, kRowsPerThread, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) body(r);
  });
}

// out[r] = w * x[r] / rms(x[r]): Llama's RMSNorm.
void norm_rows(const float* x, const float* w, float* out, int64_t rows, int64_t dim, float eps) {
  for_rows(rows, [&](int64_t r) {
    const float* xr = x + r * dim;
    const float inv = 1.0f / std::sqrt(dot(xr, xr, dim) / static_cast<float>(dim) + eps);
    for (int64_t d = 0; d < dim; ++d) out[r * dim + d] = w[d] * (xr[d] * inv);
  });
}

// x[r] += y[r] for every row: the residual stream.
void add_rows(float* x, const float* y, int64_t rows, int64_t dim) {
  for_rows(rows, [&](int64_t r) { for (int64_t i = r * dim; i < (r + 1) * dim; ++i) x[i] += y[i]; });
}

// y [R, N] = x [R, K] W^T for one packed weight (int4_kernel.h), float32 in and out.
Tensor int4_mm(const Tensor& x, const Tensor& codes, const Tensor& sm) {
  Tensor y = at::empty({x.size(0), codes.size(0) * diffdraft_int4::kBlock}, x.options());
  diffdraft_int4::matmul(x.data_ptr<float>(), x.size(0), x.size(1), codes, sm, y.data_ptr<float>());
  return y;
}

// y [R, N] float32 = x [R, K] W^T through oneDNN's bfloat16 linear: x rounded to bfloat16, W a bfloat16 weight
// reordered by mkldnn::_reorder_linear_weight, the output rounded to bfloat16 (as kernels.BulkLinear).
Tensor bf16_mm(const Tensor& x, const Tensor& packed) {
  static auto linear = c10::Dispatcher::singleton()
      .findSchemaOrThrow("mkldnn::_linear_pointwise", "")
      .typed<Tensor(const Tensor&, const Tensor&, const std::optional<Tensor>&, std::string_view,
                    c10::List<std::optional<c10::Scalar>>, std::optional<std::string_view>)>();
  return linear.call(x.to(at::kBFloat16), packed, std::nullopt, "none", c10::List<std::optional<c10::Scalar>>(),
                     std::nullopt).to(at::kFloat);
}

// y [R, N] float32 = x [R, K] float32 times the index-th linear of the stack (four per layer).
using Linear = std::function<Tensor(const Tensor& x, int64_t index)>;

// act [R, I] = silu(gate) * up for gate_up [R, 2 I] (gate, then up, per row): a loop over the rows, each row
// alone, for a forward whose rows must be a one-row forward's bits.
Tensor gated_rows(const Tensor& gate_up) {
  const int64_t rows = gate_up.size(0), inter = gate_up.size(1) / 2;
  Tensor act = at::empty({rows, inter}, gate_up.options());
  const float* gu = gate_up.data_ptr<float>();
  float* ad = act.data_ptr<float>();
  for_rows(rows, [&](int64_t r) {
    for (int64_t i = 0; i < inter; ++i) {
      const float g = gu[r * 2 * inter + i], u = gu[r * 2 * inter + inter + i];
      ad[r * inter + i] = g / (1.0f + std::exp(-g)) * u;
    }
  });
  return act;
}

// The same through ATen's vectorized SiLU, several times faster over a prefill's rows, whose bits no one-row
// forward has to match.
Tensor gated_vectorized(const Tensor& gate_up) {
  const int64_t inter = gate_up.size(1) / 2;
  return at::silu(gate_up.narrow(1, 0, inter)).mul_(gate_up.narrow(1, inter, inter));
}

// One row's keys and values: the committed cache slots 0..start-1, then the new rows it sees (slot start + j).
struct RowView {
  int64_t part, start, slot;       // its sequence, that sequence's committed length, its own cache slot
  const int64_t* seen;             // offsets j of the new rows it sees, ascending, itself last
  int64_t seen_count;
};

// Attention of one row and head over its keys: softmax(q k / sqrt(hd)) v -> out [hd].
void attend(const float* q, const float* keys, const float* values, const RowView& row, int64_t head_dim,
            float scale, std::vector<float>& weights, float* out) {
  const int64_t n = row.start + row.seen_count;
  weights.resize(n);
  float top = -INFINITY;
  for (int64_t t = 0; t < n; ++t) {
    const int64_t slot = t < row.start ? t : row.start + row.seen[t - row.start];
    weights[t] = dot(q, keys + slot * head_dim, head_dim) * scale;
    top = std::max(top, weights[t]);
  }
  float total = 0;
  for (int64_t t = 0; t < n; ++t) {
    weights[t] = std::exp(weights[t] - top);
    total += weights[t];
  }
  for (int64_t d = 0; d < head_dim; ++d) out[d] = 0;
  for (int64_t t = 0; t < n; ++t) {
    const int64_t slot = t < row.start ? t : row.start + row.seen[t - row.start];
    const float* v = values + slot * head_dim;
    const float p = weights[t] / total;
    for (int64_t d = 0; d < head_dim; ++d) out[d] += p * v[d];
  }
}

// attended [R, H hd] = each row's attention over what it sees in layer l of its sequence's cache, q [R, H hd]
// its queries. Each (row, head) alone, so the split among threads changes no bits; a layer's attention over
// fewer (keys x heads x head dim) than parallel_work stays on this thread.
void attend_rows(const Tensor& q, Tensor& attended, at::TensorList caches, const std::vector<RowView>& views,
                 int64_t l, int64_t heads, int64_t kv_heads, int64_t head_dim, int64_t parallel_work) {
  const int64_t rows = q.size(0), q_width = heads * head_dim, group = heads / kv_heads;
  const float scale = 1.0f / std::sqrt(static_cast<float>(head_dim));
  int64_t keys_seen = 0;
  for (const RowView& row : views) keys_seen += row.start + row.seen_count;
  const int64_t grain = keys_seen * heads * head_dim >= parallel_work ? 1 : rows * heads;
  at::parallel_for(0, rows * heads, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> scores, out(head_dim);
    for (int64_t job = begin; job < end; ++job) {
      const int64_t r = job / heads, h = job % heads, kvh = h / group;
      const RowView& row = views[r];
      const float* cache = caches[row.part].data_ptr<float>();
      const int64_t capacity = caches[row.part].size(3);
      const int64_t layer_at = l * 2 * kv_heads * capacity * head_dim;
      attend(q.data_ptr<float>() + r * q_width + h * head_dim, cache + layer_at + kvh * capacity * head_dim,
             cache + layer_at + (kv_heads + kvh) * capacity * head_dim, row, head_dim, scale, scores, out.data());
      float* dst = attended.data_ptr<float>() + r * q_width + h * head_dim;
      for (int64_t d = 0; d < head_dim; ++d) dst[d] = out[d];
    }
  });
}

// The same for a prompt's rows 0..R-1, each seeing the rows before it: one causal ATen call (flash attention
// on the CPU), as the Python layers' bulk prefill makes; far faster than row by row for a long prompt.
void attend_prompt(const Tensor& q, Tensor& attended, const Tensor& cache, int64_t l, int64_t heads,
                   int64_t head_dim) {
  const int64_t rows = q.size(0);
  const Tensor layer = cache.select(0, l);  // [2, Hkv, C, hd]
  const Tensor keys = layer.select(0, 0).narrow(1, 0, rows).unsqueeze(0);  // [1, Hkv, R, hd]
  const Tensor values = layer.select(0, 1).narrow(1, 0, rows).unsqueeze(0);
  const Tensor queries = q.view({rows, heads, head_dim}).transpose(0, 1).unsqueeze(0);  // [1, H, R, hd]
  const Tensor out = at::scaled_dot_product_attention(queries, keys, values, std::nullopt, 0.0, /*is_causal=*/true,
                                                      std::nullopt, /*enable_gqa=*/true);  // [1, H, R, hd]
  attended.view({rows, heads, head_dim}).copy_(out[0].transpose(0, 1));
}

// x [R, D] float32, updated in place through every layer. Per layer l, linear(., 4 l .. 4 l + 3) runs the
// q/k/v, o, gate/up and down projections, q and k rows in rotary-pair order. caches: one [L, 2, Hkv, C, hd]
// float32 per sequence; sizes / starts: each sequence's new rows and its committed length; chains[s] = 1 where
// sequence s's rows form a chain, else seen / seen_offsets [R + 1] list what each row sees. phases
// [R, hd / 2, 2]: each row's rotation (cos, sin). Attention runs on torch's threads where a layer's (keys x
// heads x head dim) reaches parallel_work. vectorized (a prefill, whose rows no one-row forward has to match): SiLU
// through ATen (gated_vectorized), and a prompt from slot 0 attends in one causal ATen call. Returns x after each
// layer in taps.
std::vector<Tensor> run_stack(Tensor x, at::TensorList attn_norm, at::TensorList mlp_norm, const Linear& linear,
                              bool vectorized,
                              at::TensorList caches, at::IntArrayRef sizes, at::IntArrayRef starts,
                              at::IntArrayRef chains, const Tensor& seen, const Tensor& seen_offsets,
                              const Tensor& phases, int64_t heads, int64_t kv_heads, int64_t head_dim, double eps,
                              at::IntArrayRef taps, int64_t parallel_work) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(), "x must be [R, D] float32");
  const int64_t rows = x.size(0), dim = x.size(1), layers = attn_norm.size();
  TORCH_CHECK(phases.scalar_type() == at::kFloat && phases.is_contiguous(), "phases must be float32 [R, hd/2, 2]");
  const int64_t q_width = heads * head_dim;

  // Each row's sequence, cache slot and the new rows it sees (a chain's row i sees 0..i).
  std::vector<int64_t> chain_seen(rows);
  for (int64_t i = 0; i < rows; ++i) chain_seen[i] = i;
  const int64_t* seen_data = seen.numel() ? seen.data_ptr<int64_t>() : nullptr;
  const int64_t* seen_at = seen_offsets.numel() ? seen_offsets.data_ptr<int64_t>() : nullptr;
  std::vector<RowView> views;
  TORCH_CHECK(caches.size() == sizes.size() && starts.size() == sizes.size() && chains.size() == sizes.size(),
              "one cache, start and chain flag per sequence");
  for (int64_t s = 0, r = 0; s < static_cast<int64_t>(sizes.size()); ++s) {
    TORCH_CHECK(caches[s].scalar_type() == at::kFloat && caches[s].is_contiguous(), "caches must be float32");
    TORCH_CHECK(starts[s] + sizes[s] <= caches[s].size(3), "a sequence's new rows must fit its cache");
    for (int64_t i = 0; i < sizes[s]; ++i, ++r) {
      if (chains[s]) {
        views.push_back({s, starts[s], starts[s] + i, chain_seen.data(), i + 1});
      } else {
        TORCH_CHECK(seen_at != nullptr, "a tree's rows need seen and seen_offsets");
        views.push_back({s, starts[s], starts[s] + i, seen_data + seen_at[r], seen_at[r + 1] - seen_at[r]});
      }
    }
  }
  TORCH_CHECK(static_cast<int64_t>(views.size()) == rows, "the sequences' sizes must add up to x's rows");

  // bulk (a prefill) over one chain from slot 0 attends in one causal call; every other forward row by row
  const bool whole_prompt = vectorized && sizes.size() == 1 && starts[0] == 0 && chains[0];
  const float* rot = phases.data_ptr<float>();
  float* xs = x.data_ptr<float>();
  Tensor normed = at::empty({rows, dim}, x.options());
  Tensor q = at::empty({rows, q_width}, x.options());
  Tensor attended = at::empty({rows, q_width}, x.options());
  std::vector<Tensor> tapped;
  std::vector<bool> tap_after(layers + 1, false);
  for (int64_t t : taps) if (t >= 0 && t <= layers) tap_after[t] = true;

  for (int64_t l = 0; l < layers; ++l) {
    // attention block
    norm_rows(xs, attn_norm[l].data_ptr<float>(), normed.data_ptr<float>(), rows, dim, static_cast<float>(eps));
    Tensor qkv = linear(normed, 4 * l);  // [R, (H + 2 Hkv) hd]
    const float* qkv_data = qkv.data_ptr<float>();
    const int64_t qkv_width = qkv.size(1);
    for_rows(rows, [&](int64_t r) {
      const float* in = qkv_data + r * qkv_width;
      const float* c = rot + r * head_dim;  // [hd / 2, 2]
      const RowView& row = views[r];
      float* cache = caches[row.part].data_ptr<float>();
      const int64_t capacity = caches[row.part].size(3);
      const int64_t layer_at = l * 2 * kv_heads * capacity * head_dim;
      float* qr = q.data_ptr<float>() + r * q_width;
      for (int64_t h = 0; h < heads + kv_heads; ++h) {  // queries, then keys: rotate each pair
        float* dst = h < heads ? qr + h * head_dim
                               : cache + layer_at + ((h - heads) * capacity + row.slot) * head_dim;
        const float* src = in + h * head_dim;
        for (int64_t p = 0; p < head_dim / 2; ++p) {
          const float a = src[2 * p], b = src[2 * p + 1], cs = c[2 * p], sn = c[2 * p + 1];
          dst[2 * p] = a * cs - b * sn;
          dst[2 * p + 1] = a * sn + b * cs;
        }
      }
      for (int64_t h = 0; h < kv_heads; ++h) {  // values, as they are
        float* dst = cache + layer_at + ((kv_heads + h) * capacity + row.slot) * head_dim;
        const float* src = in + (heads + kv_heads + h) * head_dim;
        for (int64_t d = 0; d < head_dim; ++d) dst[d] = src[d];
      }
    });
    if (whole_prompt) {
      attend_prompt(q, attended, caches[0], l, heads, head_dim);
    } else {
      attend_rows(q, attended, caches, views, l, heads, kv_heads, head_dim, parallel_work);
    }
    Tensor o = linear(attended, 4 * l + 1);  // [R, D]
    add_rows(xs, o.data_ptr<float>(), rows, dim);

    // MLP block
    norm_rows(xs, mlp_norm[l].data_ptr<float>(), normed.data_ptr<float>(), rows, dim, static_cast<float>(eps));
    Tensor gate_up = linear(normed, 4 * l + 2);  // [R, 2 I]
    Tensor act = vectorized ? gated_vectorized(gate_up) : gated_rows(gate_up);  // [R, I]
    Tensor down = linear(act, 4 * l + 3);  // [R, D]
    add_rows(xs, down.data_ptr<float>(), rows, dim);
    if (tap_after[l + 1]) tapped.push_back(x.clone());
  }
  return tapped;
}

// run_stack on the 4-bit weights: codes[4 l .. 4 l + 3] are layer l's packed q/k/v, o, gate/up and down weights
// (int4_kernel.h; their scales and offsets in sm alike).
std::vector<Tensor> run_layers(Tensor x, at::TensorList attn_norm, at::TensorList mlp_norm, at::TensorList codes,
                               at::TensorList sm, at::TensorList caches, at::IntArrayRef sizes,
                               at::IntArrayRef starts, at::IntArrayRef chains, const Tensor& seen,
                               const Tensor& seen_offsets, const Tensor& phases, int64_t heads, int64_t kv_heads,
                               int64_t head_dim, double eps, at::IntArrayRef taps, int64_t parallel_work) {
  TORCH_CHECK(codes.size() == 4 * attn_norm.size() && sm.size() == codes.size(), "four linears per layer");
  const Linear linear = [&](const Tensor& in, int64_t i) { return int4_mm(in, codes[i], sm[i]); };
  return run_stack(x, attn_norm, mlp_norm, linear, false, caches, sizes, starts, chains, seen, seen_offsets, phases,
                   heads, kv_heads, head_dim, eps, taps, parallel_work);
}

// run_stack on bfloat16 copies of the weights (bf16_mm) and ATen's SiLU, for a prefill's many rows.
std::vector<Tensor> run_layers_bulk(Tensor x, at::TensorList attn_norm, at::TensorList mlp_norm,
                                    at::TensorList packed, at::TensorList caches, at::IntArrayRef sizes,
                                    at::IntArrayRef starts, at::IntArrayRef chains, const Tensor& seen,
                                    const Tensor& seen_offsets, const Tensor& phases, int64_t heads,
                                    int64_t kv_heads, int64_t head_dim, double eps, at::IntArrayRef taps,
                                    int64_t parallel_work) {
  TORCH_CHECK(packed.size() == 4 * attn_norm.size(), "four linears per layer");
  const Linear linear = [&](const Tensor& in, int64_t i) { return bf16_mm(in, packed[i]); };
  return run_stack(x, attn_norm, mlp_norm, linear, true, caches, sizes, starts, chains, seen, seen_offsets, phases,
                   heads, kv_heads, head_dim, eps, taps, parallel_work);
}

std::vector<Tensor> pack_int4(const Tensor& q, const Tensor& scale, const Tensor& zero) {
  return diffdraft_int4::pack(q, scale, zero);
}

// y [R, N] float32 = x [R, K] float32 W^T through the integer kernel (int4_kernel.h).
Tensor int4_linear(const Tensor& x, const Tensor& codes, const Tensor& sm) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat, "x must be [R, K] float32");
  TORCH_CHECK(codes.dim() == 3 && codes.size(1) * diffdraft_int4::kGroup == x.size(1),
              "the packed weight's inputs must be x's");
  return int4_mm(x.contiguous(), codes, sm);
}

}  // namespace

TORCH_LIBRARY(diffdraft_fused, m) {
  m.def("pack_int4(Tensor q, Tensor scale, Tensor zero) -> Tensor[]");
  m.impl("pack_int4", c10::DispatchKey::CPU, &pack_int4);
  m.def("int4_linear(Tensor x, Tensor codes, Tensor sm) -> Tensor");
  m.impl("int4_linear", c10::DispatchKey::CPU, &int4_linear);
  m.def("run_layers(Tensor(a!) x, Tensor[] attn_norm, Tensor[] mlp_norm, Tensor[] weights, Tensor[] sm, "
        "Tensor(b!)[] caches, int[] sizes, int[] starts, int[] chains, Tensor seen, Tensor seen_offsets, "
        "Tensor phases, int heads, int kv_heads, int head_dim, float eps, int[] taps, int parallel_work) -> Tensor[]");
  m.impl("run_layers", c10::DispatchKey::CPU, &run_layers);
  // the packed weights are oneDNN tensors (their own dispatch key): one kernel for every key
  m.def("run_layers_bulk(Tensor(a!) x, Tensor[] attn_norm, Tensor[] mlp_norm, Tensor[] packed, "
        "Tensor(b!)[] caches, int[] sizes, int[] starts, int[] chains, Tensor seen, Tensor seen_offsets, "
        "Tensor phases, int heads, int kv_heads, int head_dim, float eps, int[] taps, int parallel_work) -> Tensor[]",
        &run_layers_bulk);
}

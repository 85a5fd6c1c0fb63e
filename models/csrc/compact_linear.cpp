// aotllm CPU kernel: a linear over compact weights for a few rows.
//
//   y[m, n] = round_to(x.dtype, (sum_k x[m, k] * w[n, k]) * scale[n] + bias[n])
//
// x: [..., K] in bf16, fp16 or fp32; w: [N, K] contiguous in int8, bf16 or
// fp16; scale and bias: optional [N]. The weight is read once, in its stored
// width, and widened to fp32 in registers; products and sums are fp32, as in
// a native half-precision GEMM. Decode reads every weight once per step, so
// this loop runs at memory speed only if the loads are issued far enough
// ahead: each thread walks its rows block by block, R rows at a time, and
// prefetches the bytes 16 KiB ahead into L2 (models/compact_linear.py has
// the measurements behind R and the distance).
//
// The entry point follows AOTInductor's C-shim convention, so compiled graphs
// call it directly (torch._inductor.config.aot_inductor.custom_ops_to_c_shims).
// The vector code is chosen when the library loads, from the CPU (AVX-512,
// AVX2+FMA+F16C, or plain C++), capped by ATEN_CPU_CAPABILITY as torch's own
// kernels are.
#include <torch/csrc/inductor/aoti_torch/c/shim.h>

#include <immintrin.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <vector>

namespace {

enum Isa { kScalar = 0, kAvx2 = 1, kAvx512 = 2 };
enum WType { kInt8 = 0, kBf16 = 1, kF16 = 2 };
enum DType { kF32 = 0, kDBf16 = 1, kDF16 = 2 };

constexpr int64_t kPrefetchBytes = 16384;
constexpr int64_t kMaxDims = 8;  // of x; the graphs pass 2-D or 3-D
// Below this many weight bytes a call runs on one thread: a parallel region
// costs more than it saves.
constexpr int64_t kParallelMinBytes = 65536;

inline float bf16_to_float(uint16_t h) {
  uint32_t u = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline uint16_t float_to_bf16(float f) {  // round to nearest even, as torch
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40);  // NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return uint16_t(u >> 16);
}

inline float f16_to_float(uint16_t h) {
  _Float16 v;
  std::memcpy(&v, &h, 2);
  return float(v);
}

inline uint16_t float_to_f16(float f) {
  _Float16 v = _Float16(f);
  uint16_t h;
  std::memcpy(&h, &v, 2);
  return h;
}

inline float load_scalar(const void* p, int64_t i, int dtype) {
  if (dtype == kF32) return static_cast<const float*>(p)[i];
  const uint16_t h = static_cast<const uint16_t*>(p)[i];
  return dtype == kDBf16 ? bf16_to_float(h) : f16_to_float(h);
}

template <int W>
inline float weight_scalar(const char* row, int64_t k) {
  if constexpr (W == kInt8) return float(reinterpret_cast<const int8_t*>(row)[k]);
  else if constexpr (W == kBf16) return bf16_to_float(reinterpret_cast<const uint16_t*>(row)[k]);
  else return f16_to_float(reinterpret_cast<const uint16_t*>(row)[k]);
}

template <int W>
constexpr int64_t weight_bytes() { return W == kInt8 ? 1 : 2; }

struct Call {
  const float* x;     // [M, K] fp32 copy of the input rows
  const char* w;      // [N, K]
  int64_t M, K, N;
  const void* scale;  // [N] or null
  int scale_dtype;
  const void* bias;   // [N] or null
  int bias_dtype;
  void* y;            // [M, N]
  int y_dtype;
};

// The epilogue: scale, bias and rounding of one output element.
inline void store(const Call& c, int64_t m, int64_t n, float acc) {
  if (c.scale) acc *= load_scalar(c.scale, n, c.scale_dtype);
  if (c.bias) acc += load_scalar(c.bias, n, c.bias_dtype);
  const int64_t i = m * c.N + n;
  if (c.y_dtype == kF32) static_cast<float*>(c.y)[i] = acc;
  else if (c.y_dtype == kDBf16) static_cast<uint16_t*>(c.y)[i] = float_to_bf16(acc);
  else static_cast<uint16_t*>(c.y)[i] = float_to_f16(acc);
}

// ---------------------------------------------------------------- plain C++
template <int W>
void row_scalar(const Call& c, int64_t n) {
  const char* row = c.w + n * c.K * weight_bytes<W>();
  for (int64_t m = 0; m < c.M; ++m) {
    float acc = 0.f;
    for (int64_t k = 0; k < c.K; ++k) acc += c.x[m * c.K + k] * weight_scalar<W>(row, k);
    store(c, m, n, acc);
  }
}

// ---------------------------------------------------------------- AVX-512
#define AOTLLM_AVX512 __attribute__((target("avx512f,f16c,fma")))

template <int W>
AOTLLM_AVX512 inline __m512 widen16(const char* p) {
  if constexpr (W == kInt8)
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)p)));
  else if constexpr (W == kBf16)
    return _mm512_castsi512_ps(
        _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
  else
    return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)p));
}

// Rows m0..m0+M of x against weight rows n0..n0+R.
template <int W, int M, int R>
AOTLLM_AVX512 void block_avx512(const Call& c, int64_t m0, int64_t n0) {
  constexpr int64_t eb = weight_bytes<W>();
  const int64_t K = c.K, kv = K - K % 16;
  const char* base = c.w + n0 * K * eb;
  const float* x = c.x + m0 * K;
  __m512 acc[M][R];
  for (int m = 0; m < M; ++m)
    for (int r = 0; r < R; ++r) acc[m][r] = _mm512_setzero_ps();
  for (int64_t k = 0; k < kv; k += 16) {
    // The block's R rows are contiguous: walk the bytes kPrefetchBytes ahead
    // at the pace this loop consumes them (R*16*eb bytes a step).
    for (int64_t q = 0; q < R * 16 * eb; q += 64)
      _mm_prefetch(base + kPrefetchBytes + k * R * eb + q, _MM_HINT_T1);
    __m512 wv[R];
    for (int r = 0; r < R; ++r) wv[r] = widen16<W>(base + (r * K + k) * eb);
    for (int m = 0; m < M; ++m) {
      const __m512 xv = _mm512_loadu_ps(x + m * K + k);
      for (int r = 0; r < R; ++r) acc[m][r] = _mm512_fmadd_ps(xv, wv[r], acc[m][r]);
    }
  }
  for (int m = 0; m < M; ++m)
    for (int r = 0; r < R; ++r) {
      float s = _mm512_reduce_add_ps(acc[m][r]);
      const char* row = base + r * K * eb;
      for (int64_t k = kv; k < K; ++k) s += x[m * K + k] * weight_scalar<W>(row, k);
      store(c, m0 + m, n0 + r, s);
    }
}

// ---------------------------------------------------------------- AVX2
#define AOTLLM_AVX2 __attribute__((target("avx2,f16c,fma")))

AOTLLM_AVX2 inline float hsum256(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// Elements of x one AVX2 k step consumes: 32 int8 weights are widened from
// one 32-byte load by unpacking (widen_avx2); bf16 and fp16 8 at a time, in
// x's own order.
template <int W>
constexpr int64_t avx2_step() { return W == kInt8 ? 32 : 8; }

// Vector j (of avx2_step / 8) of the step's weights at p, widened to fp32.
// int8 is unpacked within each 128-bit lane, so vector j holds elements
// 4j..4j+3 of the step's first 16 and the same of its second 16 (the caller
// orders x the same way, permute_x_avx2), and each value lands in the top
// byte of its lane, as v * 2^24: exact in fp32, and the block scales its
// sums back by 2^-24 (the only change: a row's sums overflow fp32 2^24 times
// sooner, past |x| sums of ~1e29). On AMD Zen 1, whose AVX2 ops are two 128-bit halves,
// this measured 9.2 G weights/s per core against 7.6 for vpmovsxbd +
// vcvtdq2ps (K=576, in L2, 1 thread), and 14.1-14.5 GB/s against 11.8-13.0
// streaming on 2 threads, below the 27 GB/s the memory gives: the widening,
// not the memory, bounds int8 there. bf16 unpacked the same way computed
// faster in L2 but streamed no faster (20.0 against 20.5-22.0 GB/s), so it
// keeps vpmovzxwd + vpslld.
template <int W>
AOTLLM_AVX2 inline __m256 widen_avx2(const char* p, int j) {
  if constexpr (W == kInt8) {
    const __m256i q = _mm256_loadu_si256((const __m256i*)p), z = _mm256_setzero_si256();
    const __m256i half = j < 2 ? _mm256_unpacklo_epi8(z, q) : _mm256_unpackhi_epi8(z, q);
    return _mm256_cvtepi32_ps(j % 2 == 0 ? _mm256_unpacklo_epi16(z, half)
                                         : _mm256_unpackhi_epi16(z, half));
  } else if constexpr (W == kBf16) {
    return _mm256_castsi256_ps(
        _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p)), 16));
  } else {
    return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)p));
  }
}

// x's rows in the element order widen_avx2 produces, step by step; the
// tail past the last whole step stays in place.
template <int W>
void permute_x_avx2(const float* x, float* out, int64_t M, int64_t K) {
  constexpr int64_t S = avx2_step<W>(), half = S / 2;
  const int64_t kv = K - K % S;
  for (int64_t m = 0; m < M; ++m) {
    const float* src = x + m * K;
    float* dst = out + m * K;
    for (int64_t k = 0; k < kv; k += S)
      for (int64_t j = 0; j < S / 8; ++j)
        for (int64_t i = 0; i < 8; ++i)
          dst[k + 8 * j + i] = src[k + (i < 4 ? 0 : half) + 4 * j + i % 4];
    for (int64_t k = kv; k < K; ++k) dst[k] = src[k];
  }
}

template <int W, int M, int R>
AOTLLM_AVX2 void block_avx2(const Call& c, int64_t m0, int64_t n0) {
  constexpr int64_t eb = weight_bytes<W>(), S = avx2_step<W>();
  const int64_t K = c.K, kv = K - K % S;
  const char* base = c.w + n0 * K * eb;
  const float* x = c.x + m0 * K;
  __m256 acc[M][R];
  for (int m = 0; m < M; ++m)
    for (int r = 0; r < R; ++r) acc[m][r] = _mm256_setzero_ps();
  for (int64_t k = 0; k < kv; k += S) {
    for (int64_t q = 0; q < R * S * eb; q += 64)
      _mm_prefetch(base + kPrefetchBytes + k * R * eb + q, _MM_HINT_T1);
    // Row by row, each row's step widened vector by vector. Widening all R
    // rows first and sharing each x load among them measured slower at one
    // x row (SmolLM2 w8a16 batch 1 on Zen 1: 63 against 68 tokens/s).
    for (int r = 0; r < R; ++r)
      for (int j = 0; j < S / 8; ++j) {
        const __m256 wv = widen_avx2<W>(base + (r * K + k) * eb, j);
        for (int m = 0; m < M; ++m)
          acc[m][r] = _mm256_fmadd_ps(_mm256_loadu_ps(x + m * K + k + 8 * j), wv, acc[m][r]);
      }
  }
  const float unit = W == kInt8 ? 0x1p-24f : 1.f;
  for (int m = 0; m < M; ++m)
    for (int r = 0; r < R; ++r) {
      float s = hsum256(acc[m][r]) * unit;
      const char* row = base + r * K * eb;
      for (int64_t k = kv; k < K; ++k) s += x[m * K + k] * weight_scalar<W>(row, k);
      store(c, m0 + m, n0 + r, s);
    }
}

// ---------------------------------------------------------------- driver
// R rows per block. For one or two rows of x, the rows whose vectors at one
// k step fill one cache line (R * width * bytes = 64): measured best for
// one x row (2 threads, GB/s of weights: AVX-512 int8 R=2/4/8 20.8/25.3/19.9,
// bf16 R=2/4/8 27.6/23.8/23.7; AVX2 bf16 and fp16 as AVX2 int8 was before
// unpacking, R=2/4/8 18.5/20.2/23.3). AVX2 int8 steps are 32 bytes a row
// (widen_avx2), and 4 rows measured best for one x row (2-core AMD Zen 1,
// GB/s of weights, K=576 N=3072: R=2/4/8 12.5/15.5/13.1). With more
// rows the FMAs bound the loop, and what counts is enough independent
// accumulators (M x R) to cover the FMA latency within the registers (32 zmm,
// 16 ymm). AVX2 runs 5-8 rows as 4 + the rest over each block of 3 weight
// rows, still in L1 for the second pass (12 accumulators each). Measured on
// the ~125M Llama's 48 layer linears, bf16, ms: AVX2 8 rows 17.9 as 8 x 1,
// 16.2 split; AVX2 4 rows 12.0 as 4 x 2, 10.6 as 4 x 3; AVX-512 8 rows 18.0
// as 8 x 2, 16.0 as 8 x 3 (int8: 15.8, 14.7).
template <int ISA, int M>
constexpr bool kSplit = ISA == kAvx2 && M > 4;

template <int ISA, int W, int M>
constexpr int rows_per_block() {
  constexpr int line_rows = 64 / ((ISA == kAvx512 ? 16 : 8) * int(weight_bytes<W>()));
  if constexpr (ISA == kAvx512) return M <= 4 ? line_rows : 3;
  else if constexpr (kSplit<ISA, M>) return 3;
  else if constexpr (M == 1) return W == kInt8 ? 4 : line_rows;
  else return M == 2 ? 4 : 3;
}

template <int ISA, int W, int M, int R>
inline void block(const Call& c, int64_t m0, int64_t n0) {
  if constexpr (ISA == kAvx512) block_avx512<W, M, R>(c, m0, n0);
  else block_avx2<W, M, R>(c, m0, n0);
}

template <int ISA, int W, int M>
void run_rows(const Call& c, int64_t m0) {
  constexpr int R = rows_per_block<ISA, W, M>();
  const int64_t blocks = (c.N + R - 1) / R;
  const bool parallel = c.N * c.K * weight_bytes<W>() >= kParallelMinBytes;
#pragma omp parallel for schedule(static) if (parallel)
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t n0 = b * R;
    if (n0 + R <= c.N) {
      if constexpr (kSplit<ISA, M>) {
        block<ISA, W, 4, R>(c, m0, n0);
        block<ISA, W, M - 4, R>(c, m0 + 4, n0);
      } else {
        block<ISA, W, M, R>(c, m0, n0);
      }
    } else {
      for (int64_t n = n0; n < c.N; ++n) block<ISA, W, M, 1>(c, m0, n);
    }
  }
}

template <int ISA, int W>
void run(const Call& in) {
  Call c = in;
  if constexpr (ISA == kAvx2 && W == kInt8) {
    thread_local std::vector<float> xp;
    xp.resize(c.M * c.K);
    permute_x_avx2<W>(c.x, xp.data(), c.M, c.K);
    c.x = xp.data();
  }
  // x rows in groups of at most 8; each group reads the weight once.
  for (int64_t m0 = 0; m0 < c.M; m0 += 8) {
    switch (c.M - m0 < 8 ? c.M - m0 : 8) {
      case 1: run_rows<ISA, W, 1>(c, m0); break;
      case 2: run_rows<ISA, W, 2>(c, m0); break;
      case 3: run_rows<ISA, W, 3>(c, m0); break;
      case 4: run_rows<ISA, W, 4>(c, m0); break;
      case 5: run_rows<ISA, W, 5>(c, m0); break;
      case 6: run_rows<ISA, W, 6>(c, m0); break;
      case 7: run_rows<ISA, W, 7>(c, m0); break;
      default: run_rows<ISA, W, 8>(c, m0); break;
    }
  }
}

template <int W>
void run_scalar(const Call& c) {
  const bool parallel = c.N * c.K * weight_bytes<W>() >= kParallelMinBytes;
#pragma omp parallel for schedule(static) if (parallel)
  for (int64_t n = 0; n < c.N; ++n) row_scalar<W>(c, n);
}

template <int W>
void dispatch_isa(const Call& c, int isa) {
  if (isa == kAvx512) run<kAvx512, W>(c);
  else if (isa == kAvx2) run<kAvx2, W>(c);
  else run_scalar<W>(c);
}

int hardware_isa() {
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f")) return kAvx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
      __builtin_cpu_supports("f16c"))
    return kAvx2;
  return kScalar;
}

int capability_cap() {
  const char* cap = std::getenv("ATEN_CPU_CAPABILITY");
  if (cap == nullptr) return kAvx512;
  if (std::strcmp(cap, "default") == 0) return kScalar;
  if (std::strncmp(cap, "avx2", 4) == 0) return kAvx2;
  return kAvx512;
}

int g_isa = -1;

int current_isa() {
  if (g_isa < 0) {
    const int hw = hardware_isa(), cap = capability_cap();
    g_isa = hw < cap ? hw : cap;
  }
  return g_isa;
}

bool dtype_code(int32_t dtype, int* code) {
  if (dtype == aoti_torch_dtype_float32()) *code = kF32;
  else if (dtype == aoti_torch_dtype_bfloat16()) *code = kDBf16;
  else if (dtype == aoti_torch_dtype_float16()) *code = kDF16;
  else return false;
  return true;
}

}  // namespace

extern "C" {

// Which vector code runs: 2 AVX-512, 1 AVX2, 0 plain C++.
int aotllm_compact_linear_isa() { return current_isa(); }

// Tests pin each code path on one machine; capped by what the CPU has.
// Returns the ISA now in use.
int aotllm_compact_linear_set_isa(int isa) {
  const int hw = hardware_isa();
  g_isa = isa < hw ? isa : hw;
  return g_isa;
}

AOTITorchError aoti_torch_cpu_compact_linear(AtenTensorHandle x, AtenTensorHandle weight,
                                             AtenTensorHandle* scale, AtenTensorHandle* bias,
                                             AtenTensorHandle* ret0) {
  int64_t x_dim = 0, w_dim = 0;
  int64_t *x_sizes = nullptr, *x_strides = nullptr, *w_sizes = nullptr, *w_strides = nullptr;
  int32_t x_dtype = 0, w_dtype = 0;
  if (aoti_torch_get_dim(x, &x_dim) || aoti_torch_get_dim(weight, &w_dim) ||
      aoti_torch_get_sizes(x, &x_sizes) || aoti_torch_get_strides(x, &x_strides) ||
      aoti_torch_get_sizes(weight, &w_sizes) || aoti_torch_get_strides(weight, &w_strides) ||
      aoti_torch_get_dtype(x, &x_dtype) || aoti_torch_get_dtype(weight, &w_dtype))
    return AOTI_TORCH_FAILURE;
  int x_code = 0;
  if (x_dim < 1 || x_dim > kMaxDims || w_dim != 2 || !dtype_code(x_dtype, &x_code))
    return AOTI_TORCH_FAILURE;
  const int64_t K = x_sizes[x_dim - 1], N = w_sizes[0];
  if (w_sizes[1] != K || w_strides[1] != 1 || w_strides[0] != K) return AOTI_TORCH_FAILURE;
  int w_code;
  if (w_dtype == aoti_torch_dtype_int8()) w_code = kInt8;
  else if (w_dtype == aoti_torch_dtype_bfloat16()) w_code = kBf16;
  else if (w_dtype == aoti_torch_dtype_float16()) w_code = kF16;
  else return AOTI_TORCH_FAILURE;

  void *x_ptr = nullptr, *w_ptr = nullptr;
  aoti_torch_get_data_ptr(x, &x_ptr);
  aoti_torch_get_data_ptr(weight, &w_ptr);

  // The input rows in fp32, gathered through x's strides (it may be a view).
  int64_t M = 1;
  for (int64_t d = 0; d + 1 < x_dim; ++d) M *= x_sizes[d];
  thread_local std::vector<float> xf;
  xf.resize(M * K);
  const int64_t ks = x_strides[x_dim - 1];
  for (int64_t m = 0; m < M; ++m) {
    int64_t offset = 0, rest = m;
    for (int64_t d = x_dim - 2; d >= 0; --d) {
      offset += (rest % x_sizes[d]) * x_strides[d];
      rest /= x_sizes[d];
    }
    for (int64_t k = 0; k < K; ++k) xf[m * K + k] = load_scalar(x_ptr, offset + k * ks, x_code);
  }

  Call c{xf.data(), static_cast<const char*>(w_ptr), M, K, N, nullptr, 0, nullptr, 0, nullptr,
         x_code};
  for (int i = 0; i < 2; ++i) {
    AtenTensorHandle* h = i == 0 ? scale : bias;
    if (h == nullptr || *h == nullptr) continue;
    int32_t dt = 0;
    int code = 0;
    void* p = nullptr;
    if (aoti_torch_get_dtype(*h, &dt) || !dtype_code(dt, &code)) return AOTI_TORCH_FAILURE;
    aoti_torch_get_data_ptr(*h, &p);
    if (i == 0) { c.scale = p; c.scale_dtype = code; }
    else { c.bias = p; c.bias_dtype = code; }
  }

  int64_t sizes[kMaxDims], strides[kMaxDims];
  std::memcpy(sizes, x_sizes, x_dim * sizeof(int64_t));
  sizes[x_dim - 1] = N;
  int64_t stride = 1;
  for (int64_t d = x_dim - 1; d >= 0; --d) {
    strides[d] = stride;
    stride *= sizes[d];
  }
  AtenTensorHandle out = nullptr;
  if (aoti_torch_empty_strided(x_dim, sizes, strides, x_dtype,
                               aoti_torch_device_type_cpu(), 0, &out))
    return AOTI_TORCH_FAILURE;
  aoti_torch_get_data_ptr(out, &c.y);

  const int isa = current_isa();
  if (w_code == kInt8) dispatch_isa<kInt8>(c, isa);
  else if (w_code == kBf16) dispatch_isa<kBf16>(c, isa);
  else dispatch_isa<kF16>(c, isa);
  *ret0 = out;
  return AOTI_TORCH_SUCCESS;
}

}  // extern "C"

// y = x @ w.T for a few rows of x: every weight row is read from memory once for all rows.
//
// A decode step multiplies M (the batch) activation rows by each weight
// matrix; for M <= 16 that is bound by reading the weights.  BLAS kernels
// here re-read weight panels as M grows (MKL sgemm: 21 GB/s at M = 1, 14 at
// M = 8 on a 2-core AVX-512 host), so a batch-8 step cost ~2x a batch-1 one.
// This kernel walks the weight in its stored [N, K] row-major layout (the
// model's own tensor: nothing packed beside it) in panels of NR rows; each
// panel stays in L1/L2 while MR-row blocks of x are multiplied against it, so
// memory traffic is the weight once plus x (tiny).  Accumulation is fp32;
// bf16 uses AVX512-BF16 dot products where the host has them.
//
// Built by vicuna_bench/cpu_kernels.py with -march=native for the host it
// runs on; registered as vicuna_bench::small_m_linear (CPU), so eager calls
// and inductor graphs (an extern kernel) call the same code.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>
#include <immintrin.h>

#include <cstdint>
#include <cstring>

namespace {

constexpr int64_t kMaxRows = 16;

inline float bf16_to_float(uint16_t bits) {
  uint32_t wide = static_cast<uint32_t>(bits) << 16;
  float out;
  std::memcpy(&out, &wide, sizeof(out));
  return out;
}

// One lane type per (dtype, ISA): Acc holds fp32 partial sums; mac() adds
// x[k:k+Step] * w[k:k+Step] (both loaded by load_w) into it; sum() reduces it to one float.
#if defined(__AVX512F__)
struct F32Lane {
  using T = float;
  using Acc = __m512;
  static constexpr int Step = 16;
  static Acc zero() { return _mm512_setzero_ps(); }
  static Acc load_w(const T* w) { return _mm512_loadu_ps(w); }
  static void mac(Acc& acc, Acc x, Acc w) { acc = _mm512_fmadd_ps(x, w, acc); }
  static float sum(Acc acc) { return _mm512_reduce_add_ps(acc); }
};
#elif defined(__AVX2__) && defined(__FMA__)
inline float hsum256(__m256 v) {
  __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
  lo = _mm_add_ps(lo, hi);
  lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
  lo = _mm_add_ss(lo, _mm_movehdup_ps(lo));
  return _mm_cvtss_f32(lo);
}
struct F32Lane {
  using T = float;
  using Acc = __m256;
  static constexpr int Step = 8;
  static Acc zero() { return _mm256_setzero_ps(); }
  static Acc load_w(const T* w) { return _mm256_loadu_ps(w); }
  static void mac(Acc& acc, Acc x, Acc w) { acc = _mm256_fmadd_ps(x, w, acc); }
  static float sum(Acc acc) { return hsum256(acc); }
};
#endif

#if defined(__AVX512BF16__) && defined(__AVX512BW__)
// 32 bf16 pairs per instruction, products summed in fp32 (vdpbf16ps).
struct BF16Lane {
  using T = uint16_t;
  using Acc = __m512;
  static constexpr int Step = 32;
  static Acc zero() { return _mm512_setzero_ps(); }
  static __m512i load_w(const T* w) { return _mm512_loadu_si512(w); }
  static void mac(Acc& acc, __m512i x, __m512i w) { acc = _mm512_dpbf16_ps(acc, (__m512bh)x, (__m512bh)w); }
  static float sum(Acc acc) { return _mm512_reduce_add_ps(acc); }
};
#elif defined(__AVX512F__)
inline __m512 widen16(const uint16_t* p) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
}
struct BF16Lane {
  using T = uint16_t;
  using Acc = __m512;
  static constexpr int Step = 16;
  static Acc zero() { return _mm512_setzero_ps(); }
  static __m512 load_w(const T* w) { return widen16(w); }
  static void mac(Acc& acc, __m512 x, __m512 w) { acc = _mm512_fmadd_ps(x, w, acc); }
  static float sum(Acc acc) { return _mm512_reduce_add_ps(acc); }
};
#elif defined(__AVX2__) && defined(__FMA__)
inline __m256 widen8(const uint16_t* p) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p)), 16));
}
struct BF16Lane {
  using T = uint16_t;
  using Acc = __m256;
  static constexpr int Step = 8;
  static Acc zero() { return _mm256_setzero_ps(); }
  static __m256 load_w(const T* w) { return widen8(w); }
  static void mac(Acc& acc, __m256 x, __m256 w) { acc = _mm256_fmadd_ps(x, w, acc); }
  static float sum(Acc acc) { return hsum256(acc); }
};
#endif

inline float scalar_of(float v) { return v; }
inline float scalar_of(uint16_t v) { return bf16_to_float(v); }

// Prefetch (into L2) the weight panel this many panels ahead while the current one is multiplied: the
// hardware prefetcher alone left the loads exposed (fp32 M = 1: 21.5 -> 17 ms over SmolLM2's 538 MB;
// M = 8: 36 -> 26 ms; bf16 M = 1: 14 -> 10 ms; 2-core AVX-512 host, benchmarks/bench_gemm.py). 2, 4 and 8
// panels measured the same; L1 (T0) prefetch did worse than L2.
constexpr int64_t kPrefetchPanels = 2;

// out[i * N + j] = dot(x[i], w[j]) for i < MR, j < NR: one register block; prefetches pf's NR rows.

template <typename Lane, int MR, int NR>
inline void block(const typename Lane::T* x, const typename Lane::T* w, int64_t K, float* out, int64_t N,
                  const typename Lane::T* pf = nullptr) {
  typename Lane::Acc acc[MR][NR];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) acc[i][j] = Lane::zero();
  const int64_t whole = K - K % Lane::Step;
  for (int64_t k = 0; k < whole; k += Lane::Step) {
    // Every operand loaded once into a register (MR + NR loads for MR * NR products): folded into the
    // products, as the compiler otherwise does, each would be loaded NR or MR times.
    decltype(Lane::load_w(w)) wv[NR], xv[MR];
    for (int j = 0; j < NR; ++j) {
      if (pf) _mm_prefetch(reinterpret_cast<const char*>(pf + j * K + k), _MM_HINT_T1);
      wv[j] = Lane::load_w(w + j * K + k);
      asm volatile("" : "+v"(wv[j]));
    }
    for (int i = 0; i < MR; ++i) {
      xv[i] = Lane::load_w(x + i * K + k);
      asm volatile("" : "+v"(xv[i]));
    }
    for (int i = 0; i < MR; ++i)
      for (int j = 0; j < NR; ++j) Lane::mac(acc[i][j], xv[i], wv[j]);
  }
  for (int i = 0; i < MR; ++i) {
    for (int j = 0; j < NR; ++j) {
      float total = Lane::sum(acc[i][j]);
      for (int64_t k = whole; k < K; ++k) total += scalar_of(x[i * K + k]) * scalar_of(w[j * K + k]);
      out[i * N + j] = total;
    }
  }
}

// Rows [n0, n1) of the output for all M rows: panels of NR weight rows, MR x-rows at a time.
template <typename Lane, int NR>
void panel_rows(const typename Lane::T* x, const typename Lane::T* w, int64_t M, int64_t K, int64_t N, int64_t n0,
                int64_t n1, float* out) {
  for (int64_t n = n0; n < n1; n += NR) {
    const typename Lane::T* wp = w + n * K;
    int64_t m = 0;
    // Only the first row block prefetches: the others find the panel in cache.
    const typename Lane::T* pf = n + (kPrefetchPanels + 1) * NR <= n1 ? wp + kPrefetchPanels * NR * K : nullptr;
    if (M >= 4) { block<Lane, 4, NR>(x, wp, K, out + n, N, pf); m = 4; pf = nullptr; }
    for (; m + 4 <= M; m += 4) block<Lane, 4, NR>(x + m * K, wp, K, out + m * N + n, N);
    switch (M - m) {
      case 3: block<Lane, 3, NR>(x + m * K, wp, K, out + m * N + n, N, pf); break;
      case 2: block<Lane, 2, NR>(x + m * K, wp, K, out + m * N + n, N, pf); break;
      case 1: block<Lane, 1, NR>(x + m * K, wp, K, out + m * N + n, N, pf); break;
      default: break;
    }
  }
}

template <typename Lane>
void run(const typename Lane::T* x, const typename Lane::T* w, int64_t M, int64_t K, int64_t N, float* out) {
  // One row at a time needs more independent accumulators to hide FMA latency than four rows do.
  constexpr int NR_ONE = 8, NR = 4;
  const int64_t nr = M == 1 ? NR_ONE : NR;
  const int64_t panels = N / nr;
  // Each task at least ~64 KB of weights: below that the thread hand-off costs more than it saves.
  const int64_t grain = std::max<int64_t>(1, (64 << 10) / std::max<int64_t>(1, nr * K * (int64_t)sizeof(typename Lane::T)));
  at::parallel_for(0, panels, grain, [&](int64_t p0, int64_t p1) {
    if (M == 1)
      panel_rows<Lane, NR_ONE>(x, w, M, K, N, p0 * nr, p1 * nr, out);
    else
      panel_rows<Lane, NR>(x, w, M, K, N, p0 * nr, p1 * nr, out);
  });
  if (panels * nr < N) panel_rows<Lane, 1>(x, w, M, K, N, panels * nr, N, out);
}

at::Tensor small_m_linear(const at::Tensor& x, const at::Tensor& weight) {
  TORCH_CHECK(weight.dim() == 2, "small_m_linear: weight must be 2-D, got ", weight.dim(), "-D");
  TORCH_CHECK(x.size(-1) == weight.size(1), "small_m_linear: x has ", x.size(-1), " features, weight ", weight.size(1));
  TORCH_CHECK(x.scalar_type() == weight.scalar_type(), "small_m_linear: x is ", x.scalar_type(), ", weight ",
              weight.scalar_type());
  const int64_t K = weight.size(1), N = weight.size(0);
  const int64_t M = K == 0 ? 0 : x.numel() / K;
  auto out_shape = x.sizes().vec();
  out_shape.back() = N;
  const bool supported = x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16;
  if (M > kMaxRows || M == 0 || K == 0 || !supported) return at::linear(x, weight);  // BLAS is right there
  at::Tensor xc = x.reshape({M, K}).contiguous();
  at::Tensor wc = weight.contiguous();
  at::Tensor acc = at::empty({M, N}, x.options().dtype(at::kFloat));
  if (x.scalar_type() == at::kFloat) {
    run<F32Lane>(xc.data_ptr<float>(), wc.data_ptr<float>(), M, K, N, acc.data_ptr<float>());
    return acc.view(out_shape);
  }
  run<BF16Lane>(reinterpret_cast<const uint16_t*>(xc.data_ptr<at::BFloat16>()),
                reinterpret_cast<const uint16_t*>(wc.data_ptr<at::BFloat16>()), M, K, N, acc.data_ptr<float>());
  return acc.to(at::kBFloat16).view(out_shape);
}

// Which code paths this build has, for the log line and the environment record.
std::string small_m_isa() {
  std::string f32, bf16;
#if defined(__AVX512F__)
  f32 = "avx512f";
#else
  f32 = "avx2";
#endif
#if defined(__AVX512BF16__) && defined(__AVX512BW__)
  bf16 = "avx512_bf16";
#elif defined(__AVX512F__)
  bf16 = "avx512f (widened)";
#else
  bf16 = "avx2 (widened)";
#endif
  return "fp32 " + f32 + ", bf16 " + bf16;
}

}  // namespace

TORCH_LIBRARY(vicuna_bench, m) {
  m.def("small_m_linear(Tensor x, Tensor weight) -> Tensor");
  m.def("small_m_isa() -> str", &small_m_isa);  // no tensor argument: a catch-all kernel
}

TORCH_LIBRARY_IMPL(vicuna_bench, CPU, m) { m.impl("small_m_linear", &small_m_linear); }

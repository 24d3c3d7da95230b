// y = x @ w.T for a few rows of x: every weight row is read from memory once for all rows.
//
// A decode step multiplies M (the batch) activation rows by each weight
// matrix; for M <= 16 that is bound by reading the weights.  BLAS kernels
// here re-read weight panels as M grows (MKL sgemm: 21 GB/s at M = 1, 14 at
// M = 8 on a 2-core AVX-512 host), so a batch-8 step cost ~2x a batch-1 one.
// This kernel walks the weight in its stored [N, K] row-major layout (the
// model's own tensor: nothing packed beside it) in panels of NR rows; each
// panel stays in L1/L2 while MR-row blocks of x are multiplied against it, so
// memory traffic is the weight once plus x (tiny).  On AVX-512, one or two
// rows of x (a batch-1 or -2 step) read whole weight rows in order instead
// (one stream a thread); on AVX2 two rows, and one row of bf16, do too.  Accumulation is fp32; bf16 uses AVX512-BF16 dot products where
// the host has them.  Without AVX2 + FMA (aarch64, an x86 build for a plain
// x86-64 target) both dtypes run a generic lane of GCC vector extensions,
// 4 floats wide: NEON on aarch64, SSE2 on x86-64, and the same source on
// both, so the x86-64 build test checks the code an aarch64 host runs.
//
// Built by vicuna_bench/cpu_kernels.py for the CPU of the host it runs on
// (-march=native; -mcpu=native on aarch64); registered as vicuna_bench::small_m_linear (CPU), so eager calls
// and inductor graphs (an extern kernel) call the same code.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

#if defined(__x86_64__) && defined(__linux__)
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cerrno>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <string>
#include <type_traits>
#include <vector>

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

// The portable lane: 4 floats in a GCC vector (one NEON or SSE register); loads by memcpy (any alignment),
// bf16 widened by a shift as the x86 lanes do, built element by element (not __builtin_convertvector, which
// older distribution compilers lack).
typedef float Vec4f __attribute__((vector_size(16)));
typedef uint32_t Vec4u __attribute__((vector_size(16)));
struct GenericF32Lane {
  using T = float;
  using Acc = Vec4f;
  static constexpr int Step = 4;
  static Acc zero() { return Acc{0.0f, 0.0f, 0.0f, 0.0f}; }
  static Acc load_w(const T* w) {
    Acc v;
    std::memcpy(&v, w, sizeof(v));
    return v;
  }
  static void mac(Acc& acc, Acc x, Acc w) { acc += x * w; }
  static float sum(Acc acc) { return (acc[0] + acc[1]) + (acc[2] + acc[3]); }
};
struct GenericBF16Lane {
  using T = uint16_t;
  using Acc = Vec4f;
  static constexpr int Step = 4;
  static Acc zero() { return GenericF32Lane::zero(); }
  static Acc load_w(const T* w) {
    const Vec4u wide = Vec4u{w[0], w[1], w[2], w[3]} << 16;
    Acc v;
    std::memcpy(&v, &wide, sizeof(v));
    return v;
  }
  static void mac(Acc& acc, Acc x, Acc w) { acc += x * w; }
  static float sum(Acc acc) { return GenericF32Lane::sum(acc); }
};

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
// The 16 horizontal sums of v[0..15], in order, as one vector: pairwise unpacks and adds (~45 instructions for
// 16 sums, where reducing each alone costs ~8 and a dependent chain).
inline __m512 sum16(const __m512* v) {
  __m512 pair[8], quad[4];
  for (int j = 0; j < 8; ++j)
    pair[j] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * j], v[2 * j + 1]), _mm512_unpackhi_ps(v[2 * j], v[2 * j + 1]));
  for (int j = 0; j < 4; ++j) {
    const __m512d a = _mm512_castps_pd(pair[2 * j]), b = _mm512_castps_pd(pair[2 * j + 1]);
    quad[j] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)), _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
  }
  // quad[j]'s 128-bit lane c holds partial sums of v[4j..4j+3] over elements 4c..4c+3.
  const __m512 h01 = _mm512_add_ps(_mm512_shuffle_f32x4(quad[0], quad[1], 0x88), _mm512_shuffle_f32x4(quad[0], quad[1], 0xDD));
  const __m512 h23 = _mm512_add_ps(_mm512_shuffle_f32x4(quad[2], quad[3], 0x88), _mm512_shuffle_f32x4(quad[2], quad[3], 0xDD));
  return _mm512_add_ps(_mm512_shuffle_f32x4(h01, h23, 0x88), _mm512_shuffle_f32x4(h01, h23, 0xDD));
}
#else
// AVX2 runs its own blocks (run_avx2, below); there and elsewhere the lane type only names the element type.
using F32Lane = GenericF32Lane;
#endif
#if !defined(__AVX512F__) && defined(__AVX2__) && defined(__FMA__)
inline float hsum256(__m256 v) {
  __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
  lo = _mm_add_ps(lo, hi);
  lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
  lo = _mm_add_ss(lo, _mm_movehdup_ps(lo));
  return _mm_cvtss_f32(lo);
}
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
// Without vdpbf16ps: a whole vector of bf16 a step (32 here, 16 on AVX2), loaded as 32-bit pairs and widened in
// place: the pair's low element by a shift left of 16 bits, its high element by masking the low 16 bits off (each
// then exactly its fp32 value).  x and w are split alike, so the products pair up; they are summed in fp32 in
// another order than one element at a time.  Against widening 16 (8) elements a load with vpmovzxwd + shift
// (SmolLM2's step matrices, bench_gemm-style chain, 3 rounds alternated in one process, time ratio new / old):
// AVX-512F without BF16 (-march=skylake-avx512) M = 1, 2, 4, 8, 16: 0.86, 0.83, 0.91, 0.98, 0.85; AVX2
// (-march=haswell): 0.92, 0.90, 0.87, 0.87, 0.85.
struct BF16Lane {
  using T = uint16_t;
  using Acc = __m512;
  static constexpr int Step = 32;
  static Acc zero() { return _mm512_setzero_ps(); }
  static __m512i load_w(const T* w) { return _mm512_loadu_si512(w); }
  static void mac(Acc& acc, __m512i x, __m512i w) {
    const __m512i hi = _mm512_set1_epi32(static_cast<int>(0xFFFF0000u));
    acc = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_slli_epi32(x, 16)),
                          _mm512_castsi512_ps(_mm512_slli_epi32(w, 16)), acc);
    acc = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_and_si512(x, hi)), _mm512_castsi512_ps(_mm512_and_si512(w, hi)),
                          acc);
  }
  static float sum(Acc acc) { return _mm512_reduce_add_ps(acc); }
};
#else
using BF16Lane = GenericBF16Lane;
#endif

inline float scalar_of(float v) { return v; }
inline float scalar_of(uint16_t v) { return bf16_to_float(v); }

// Prefetch (into L2) the weight panel this many panels ahead while the current one is multiplied: the
// hardware prefetcher alone left the loads exposed (fp32 M = 1: 21.5 -> 17 ms over SmolLM2's 538 MB;
// M = 8: 36 -> 26 ms; bf16 M = 1: 14 -> 10 ms; 2-core AVX-512 host, benchmarks/bench_gemm.py). 2, 4 and 8
// panels measured the same; L1 (T0) prefetch did worse than L2.
constexpr int64_t kPrefetchPanels = 2;

// Prefetch one cache line into L2: prefetcht1 on x86; elsewhere gcc's builtin (prfm pldl2keep on aarch64).
inline void prefetch_l2(const void* p) {
#if defined(__x86_64__) || defined(__i386__)
  _mm_prefetch(static_cast<const char*>(p), _MM_HINT_T1);
#else
  __builtin_prefetch(p, 0, 2);
#endif
}

// Besides the panel ahead into L2, each weight row of a register block this many bytes ahead into L1 (prefetcht0):
// from L2, a stand-alone copy of the 8 x 3 fp32 block ran at ~100-116 GFLOP/s a core without it and with it 7-9%
// faster (256-1024 bytes ahead), and streaming, 8 rows need about half that rate.  Measured on the 2-core AMX host
// (2026-12-07), one engine, the prefetch switched between generations, next token with / without: fp32 batch 4
// 0.973 and 0.963 (512 / 1024 bytes; 5 of 5 each), batch 8 0.987, 0.975, 0.988 (512) and 0.962, 0.987 (1024);
// bf16 on the vector blocks (AMX off) batch 4 0.979 (4 of 4), batch 8 0.991 (3 of 4).  AVX-512 builds only: the
// only ones measured (AVX2 runs its own blocks; NEON's were not timed with it).
#if defined(__AVX512F__)
constexpr int64_t kBlockL1Ahead = 512;
#endif

// Keeps v in a register: x86 otherwise folds a load into each FMA's memory operand (loading it once per use);
// elsewhere (aarch64's FMLA takes registers only) nothing to do.
template <typename V>
inline void pin_register(V& v) {
#if defined(__x86_64__) || defined(__i386__)
  asm volatile("" : "+v"(v));
#else
  (void)v;
#endif
}

// out[i * N + j] = dot(x[i], w[j]) for i < MR, j < NR: one register block; prefetches pf's NR rows.

template <typename Lane, int MR, int NR, typename O>
inline void block(const typename Lane::T* x, const typename Lane::T* w, int64_t K, O* out, int64_t N,
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
      if (pf) prefetch_l2(pf + j * K + k);
#if defined(__AVX512F__)
      _mm_prefetch(reinterpret_cast<const char*>(w + j * K + k) + kBlockL1Ahead, _MM_HINT_T0);
#endif
      wv[j] = Lane::load_w(w + j * K + k);
      pin_register(wv[j]);
    }
    if constexpr (MR * NR > 16) {
      // A wide block (all 5-8 rows x 3 weight rows: up to 24 accumulators) has no registers left for every row
      // of x at once: each is loaded just before its NR products.
      for (int i = 0; i < MR; ++i) {
        const auto xi = Lane::load_w(x + i * K + k);
        for (int j = 0; j < NR; ++j) Lane::mac(acc[i][j], xi, wv[j]);
      }
    } else {
      for (int i = 0; i < MR; ++i) {
        xv[i] = Lane::load_w(x + i * K + k);
        pin_register(xv[i]);
      }
      for (int i = 0; i < MR; ++i)
        for (int j = 0; j < NR; ++j) Lane::mac(acc[i][j], xv[i], wv[j]);
    }
  }
  float sums[MR][NR];
#if defined(__AVX512F__)
  if constexpr (MR * NR >= 16 && std::is_same_v<typename Lane::Acc, __m512>) {
    // 16 reductions at once: ~45 instructions, not ~160; a last group of fewer than 16 padded with zeros.
    constexpr int NA = MR * NR, NG = (NA + 15) / 16;
    __m512 flat[NG * 16];
    for (int a = 0; a < NG * 16; ++a) flat[a] = a < NA ? (&acc[0][0])[a] : _mm512_setzero_ps();
    alignas(64) float all[NG * 16];
    for (int g = 0; g < NG; ++g) _mm512_store_ps(all + 16 * g, sum16(flat + 16 * g));
    std::memcpy(&sums[0][0], all, sizeof(sums));
  } else
#endif
  {
    for (int i = 0; i < MR; ++i)
      for (int j = 0; j < NR; ++j) sums[i][j] = Lane::sum(acc[i][j]);
  }
  for (int i = 0; i < MR; ++i) {
    for (int j = 0; j < NR; ++j) {
      float total = sums[i][j];
      for (int64_t k = whole; k < K; ++k) total += scalar_of(x[i * K + k]) * scalar_of(w[j * K + k]);
      out[i * N + j] = static_cast<O>(total);  // bf16: round to nearest even, as Tensor.to does
    }
  }
}

// Rows [n0, n1) of the output for all M rows: panels of NR weight rows, MR x-rows at a time.
template <typename Lane, int NR, typename O>
void panel_rows(const typename Lane::T* x, const typename Lane::T* w, int64_t M, int64_t K, int64_t N, int64_t n0,
                int64_t n1, O* out) {
  for (int64_t n = n0; n < n1; n += NR) {
    const typename Lane::T* wp = w + n * K;
    int64_t m = 0;
    // Only the first row block prefetches: the others find the panel in cache.
    const typename Lane::T* pf = n + (kPrefetchPanels + 1) * NR <= n1 ? wp + kPrefetchPanels * NR * K : nullptr;
    if (M >= 4) { block<Lane, 4, NR, O>(x, wp, K, out + n, N, pf); m = 4; pf = nullptr; }
    for (; m + 4 <= M; m += 4) block<Lane, 4, NR, O>(x + m * K, wp, K, out + m * N + n, N);
    switch (M - m) {
      case 3: block<Lane, 3, NR, O>(x + m * K, wp, K, out + m * N + n, N, pf); break;
      case 2: block<Lane, 2, NR, O>(x + m * K, wp, K, out + m * N + n, N, pf); break;
      case 1: block<Lane, 1, NR, O>(x + m * K, wp, K, out + m * N + n, N, pf); break;
      default: break;
    }
  }
}

#if defined(__AVX512F__)
// 5-8 rows: every row against a panel of NR_WIDE weight rows in one register block, so the panel is used the
// moment it arrives and memory streams while the FMAs run.  (Two 4-row blocks per panel, the second from cache,
// alternated memory-bound and FMA-bound phases: fp32 M = 8 took 1.50x M = 1, 16 GB/s.)
constexpr int NR_WIDE = 3;

template <typename Lane, int MR, typename O>
void panel_all_rows(const typename Lane::T* x, const typename Lane::T* w, int64_t K, int64_t N, int64_t n0,
                    int64_t n1, O* out) {
  for (int64_t n = n0; n < n1; n += NR_WIDE) {
    const typename Lane::T* wp = w + n * K;
    const typename Lane::T* pf =
        n + (kPrefetchPanels + 1) * NR_WIDE <= n1 ? wp + kPrefetchPanels * NR_WIDE * K : nullptr;
    block<Lane, MR, NR_WIDE, O>(x, wp, K, out + n, N, pf);
  }
}
#endif

#if defined(__AVX512F__)
// 1-2 rows of x: each weight row read front to back, one row after the next, so every thread streams one
// contiguous run of memory, which the hardware prefetcher follows at the read probe's rate; the row's products with
// the MR rows of x (in L1) are formed as it streams, and the sums of G consecutive weight rows (G * MR <= 16) are
// reduced together.  The panels above read NR rows side by side (NR streams a thread): against them, A/B in one
// process over SmolLM2's matrices (2-core AVX-512 host, read probe ~31 GB/s), M = 1: bf16 21.6 -> 22.8 GB/s,
// fp32 24.9 -> 27.1; M = 2: bf16 20.9 -> 24.3, fp32 24.7 -> 27.6; a whole bf16 / fp32 batch-1 decode step 0.92x /
// 0.91x.  From M = 3 the x loads (MR per weight vector) cost more than the streams save (M = 4: 1.2-1.4x the
// panels' time; M = 8: 1.9-2.1x), so 3-16 rows keep the register-blocked panels.
constexpr int64_t kInOrderRows = 2;
// Each line of the stream this many bytes ahead into L2 (prefetcht1; a prefetch past the tensor's end never faults).
// The hardware prefetcher alone left it at ~0.8 of the frozen oneDNN path's bandwidth on the 2-core AMX host:
// bf16, SmolLM2's step, 5 rounds alternated, ratio to no software prefetch at M = 1 / 2: T0 512 B ahead 0.93 / 0.91,
// T0 2 KB 0.93 / 0.89, L2 2 KB 0.88 / 0.81, L2 8 KB 0.86 / 0.72; a second run, L2 8 / 16 / 32 / 64 KB 0.83-0.84 /
// 0.70 (the frozen path 0.71 at M = 2).
constexpr int64_t kInOrderAhead = 8 << 10;

template <typename Lane, int MR, typename O>
void rows_in_order(const typename Lane::T* x, const typename Lane::T* w, int64_t K, int64_t N, int64_t n0,
                   int64_t n1, O* out) {
  // One sum per output and row of x.  Two sums for a lone row (two chains, to hide the FMA's latency) streamed slower:
  // SmolLM2's shapes, M = 1, 600 MB of copies a shape, 7 rounds alternated in one process on the 2-core AMX host
  // (twenty-first pass), time one chain / two: fp32 0.83-0.94, bf16 0.82-0.88, each shape faster in 7 of 7, and as
  // fast as MKL's sgemv (which had streamed 12-16% faster than the two chains).  The stream, not the FMA, bounds it.
  constexpr int G = 16 / MR;
  constexpr int64_t S = Lane::Step;
  const int64_t whole = K - K % S;
  __m512 flat[16];
  alignas(64) float sums[16];
  for (int64_t n = n0; n < n1; n += G) {
    const int rows = static_cast<int>(std::min<int64_t>(G, n1 - n));
    for (int r = 0; r < rows; ++r) {
      const typename Lane::T* wr = w + (n + r) * K;
      __m512 acc[MR];
      for (int i = 0; i < MR; ++i) acc[i] = _mm512_setzero_ps();
      for (int64_t k = 0; k < whole; k += S) {
        prefetch_l2(reinterpret_cast<const char*>(wr + k) + kInOrderAhead);
        const auto wv = Lane::load_w(wr + k);
        for (int i = 0; i < MR; ++i) Lane::mac(acc[i], Lane::load_w(x + i * K + k), wv);
      }
      for (int i = 0; i < MR; ++i) flat[r * MR + i] = acc[i];
    }
    for (int a = rows * MR; a < 16; ++a) flat[a] = _mm512_setzero_ps();
    _mm512_store_ps(sums, sum16(flat));
    for (int r = 0; r < rows; ++r) {
      const typename Lane::T* wr = w + (n + r) * K;
      for (int i = 0; i < MR; ++i) {
        float total = sums[r * MR + i];
        for (int64_t k = whole; k < K; ++k) total += scalar_of(x[i * K + k]) * scalar_of(wr[k]);
        out[i * N + n + r] = static_cast<O>(total);
      }
    }
  }
}

#endif

#if !defined(__AVX512F__) && defined(__AVX2__) && defined(__FMA__)
#define VB_GEMM_AVX2 1
// AVX2 register blocks.  AVX2 has 16 vector registers, and the blocks above are shaped for AVX-512's 32: built for
// AVX2, a 4 x 4 block (16 accumulators, 4 weight and 4 x vectors, and bf16's widened halves) kept most of its
// accumulators on the stack, a store and a reload each step.  Here a block holds MR x NR accumulators, NR weight
// vectors and one x vector: fp32 4 x 3 from 3 rows up (16 registers), 2 x 5 for two rows; bf16, which needs one
// more for the widening mask, 4 x 2 and 2 x 4; one row 1 x 8, its weights taken straight into the FMAs.  bf16 x
// is widened once a call (below), so the loop widens only the weight.  Measured on the emulated AVX2 host (2
// cores), new time / old: a whole decode step (SmolLM2, --compile on, 4 rounds alternated in one engine) batch 8
// fp32 0.876, bf16 0.912, batch 1 within 1%; the products alone with the weights in L2 (1536 x 576 bf16,
// 768 x 576 fp32) fp32 M = 4, 8, 16: 0.65, 0.67, 0.52, bf16 M = 2, 4, 8, 16: 0.89, 0.89, 0.97, 0.80; streamed
// from memory (the bench_gemm chain) the same time as before at every M (the stream, not the FMAs, bounds it).

// The h-th fp32 vector of a step of w: fp32, the 8 floats there; bf16 (16 elements a step), the low elements of
// its 32-bit pairs (h = 0, a shift) or the high ones (h = 1, a mask), the AVX-512F BF16Lane's widening 8 pairs wide.
inline __m256 wide_w(const float* w, int) { return _mm256_loadu_ps(w); }
inline __m256 wide_w(const uint16_t* w, int h) {
  const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w));
  return _mm256_castsi256_ps(h == 0 ? _mm256_slli_epi32(v, 16)
                                    : _mm256_and_si256(v, _mm256_set1_epi32(static_cast<int>(0xFFFF0000u))));
}

// bf16 x as the AVX2 products read it: fp32, each 16-element group stored as its 8 even-index elements then its
// 8 odd-index ones (the halves wide_w gives of a weight vector); whole groups only (the tail is summed from x).
void widen_x_split(const uint16_t* x, int64_t M, int64_t K, float* xs) {
  const int64_t whole = K - K % 16;
  for (int64_t i = 0; i < M; ++i)
    for (int64_t k = 0; k < whole; k += 16) {
      _mm256_storeu_ps(xs + i * whole + k, wide_w(x + i * K + k, 0));
      _mm256_storeu_ps(xs + i * whole + k + 8, wide_w(x + i * K + k, 1));
    }
}

// out[i * N + j] = dot(x[i], w[j]) for i < MR, j < NR; xs is x as the products read it (row stride xs_stride),
// x itself serves the tail; prefetches pf's NR rows into L2.
template <typename T, int MR, int NR, typename O>
inline void block_avx2(const float* xs, int64_t xs_stride, const T* x, const T* w, int64_t K, O* out, int64_t N,
                       const T* pf) {
  constexpr int S = 32 / sizeof(T), H = sizeof(float) / sizeof(T);  // elements a step, fp32 vectors a step
  __m256 acc[MR][NR];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) acc[i][j] = _mm256_setzero_ps();
  const int64_t whole = K - K % S;
  for (int64_t k = 0; k < whole; k += S) {
    if (pf && (k * sizeof(T)) % 64 == 0)
      for (int j = 0; j < NR; ++j) prefetch_l2(pf + j * K + k);
    for (int h = 0; h < H; ++h) {
      if constexpr (MR == 1) {
        const __m256 xv = _mm256_loadu_ps(xs + k + 8 * h);
        for (int j = 0; j < NR; ++j) acc[0][j] = _mm256_fmadd_ps(xv, wide_w(w + j * K + k, h), acc[0][j]);
      } else {
        __m256 wv[NR];
        for (int j = 0; j < NR; ++j) {
          wv[j] = wide_w(w + j * K + k, h);
          pin_register(wv[j]);
        }
        for (int i = 0; i < MR; ++i) {
          __m256 xv = _mm256_loadu_ps(xs + i * xs_stride + k + 8 * h);
          if constexpr (NR > 1) pin_register(xv);
          for (int j = 0; j < NR; ++j) acc[i][j] = _mm256_fmadd_ps(xv, wv[j], acc[i][j]);
        }
      }
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) {
      float total = hsum256(acc[i][j]);
      for (int64_t k = whole; k < K; ++k) total += scalar_of(x[i * K + k]) * scalar_of(w[j * K + k]);
      out[i * N + j] = static_cast<O>(total);  // bf16: round to nearest even, as Tensor.to does
    }
}

// Output columns [n0, n1) (a whole number of NR-row panels) for all M rows, MR rows at a time.
template <typename T, int MR, int NR, typename O>
void panels_avx2(const float* xs, int64_t xs_stride, const T* x, const T* w, int64_t M, int64_t K, int64_t N,
                 int64_t n0, int64_t n1, O* out) {
  static_assert(MR <= 4, "the rest of the rows is handled for MR <= 4");
  for (int64_t n = n0; n < n1; n += NR) {
    const T* wp = w + n * K;
    // Only the first row block prefetches: the others find the panel in cache.
    const T* pf = n + (kPrefetchPanels + 1) * NR <= n1 ? wp + kPrefetchPanels * NR * K : nullptr;
    int64_t m = 0;
    for (; m + MR <= M; m += MR, pf = nullptr)
      block_avx2<T, MR, NR, O>(xs + m * xs_stride, xs_stride, x + m * K, wp, K, out + m * N + n, N, pf);
    const float* xr = xs + m * xs_stride;
    O* o = out + m * N + n;
    switch (M - m) {  // the rows left after whole MR-row blocks (MR is 4 at most)
      case 3: if constexpr (MR > 3) block_avx2<T, 3, NR, O>(xr, xs_stride, x + m * K, wp, K, o, N, pf); break;
      case 2: if constexpr (MR > 2) block_avx2<T, 2, NR, O>(xr, xs_stride, x + m * K, wp, K, o, N, pf); break;
      case 1: if constexpr (MR > 1) block_avx2<T, 1, NR, O>(xr, xs_stride, x + m * K, wp, K, o, N, pf); break;
      default: break;
    }
  }
}

// The 8 horizontal sums of v[0..7], in order, as one vector (6 hadds, 2 lane permutes, 1 add).
inline __m256 sum8(const __m256* v) {
  const __m256 a = _mm256_hadd_ps(_mm256_hadd_ps(v[0], v[1]), _mm256_hadd_ps(v[2], v[3]));
  const __m256 b = _mm256_hadd_ps(_mm256_hadd_ps(v[4], v[5]), _mm256_hadd_ps(v[6], v[7]));
  // a's low 128-bit lane: v[0..3] over elements 0-3; its high lane: over elements 4-7 (b likewise for v[4..7]).
  return _mm256_add_ps(_mm256_permute2f128_ps(a, b, 0x20), _mm256_permute2f128_ps(a, b, 0x31));
}

// Each line of a weight row's stream this many bytes ahead into L2 (as kInOrderAhead for the AVX-512 stream).
constexpr int64_t kInOrderAheadAvx2 = 8 << 10;

// 1-2 rows of x on AVX2: each weight row read front to back, one after the next (the AVX-512 build's rows_in_order),
// where the panels read 8 (one row) or 4-5 (two) weight rows side by side.  64 bytes of the row a step, as two
// chains of sums (two fp32 vectors, or a bf16 vector's two widened halves); the sums of 8 / MR rows reduced together.
// Measured against the panels (AVX2 build under emulate_host.py avx2 on the 2-core AMD EPYC Zen 4 host, SmolLM2's
// decode products and head from memory, alternated in one process, time stream / panels, rounds faster): bf16
// M = 1: 0.928 (11 of 11), 0.940 (8 of 11), 0.971 (5 of 9); M = 2: 0.903 (5 of 9); fp32 M = 2: 0.860 (9 of 9); fp32
// M = 1: 1.138 and 1.137 (3 of 11 each), so one fp32 row keeps the panels.
template <typename T, int MR, typename O>
void rows_in_order_avx2(const float* xs, int64_t xs_stride, const T* x, const T* w, int64_t K, int64_t N, int64_t n0,
                        int64_t n1, O* out) {
  constexpr int S = 32 / sizeof(T), H = sizeof(float) / sizeof(T), G = 8 / MR;
  const int64_t whole = K - K % (2 * S);
  for (int64_t n = n0; n < n1; n += G) {
    const int rows = static_cast<int>(std::min<int64_t>(G, n1 - n));
    __m256 flat[8];
    for (int r = 0; r < rows; ++r) {
      const T* wr = w + (n + r) * K;
      __m256 acc[MR][2];
      for (int i = 0; i < MR; ++i) acc[i][0] = acc[i][1] = _mm256_setzero_ps();
      for (int64_t k = 0; k < whole; k += 2 * S) {
        prefetch_l2(reinterpret_cast<const char*>(wr + k) + kInOrderAheadAvx2);
        for (int s = 0; s < 2; ++s)
          for (int h = 0; h < H; ++h) {
            const __m256 wv = wide_w(wr + k + s * S, h);
            for (int i = 0; i < MR; ++i)
              acc[i][(s * H + h) & 1] =
                  _mm256_fmadd_ps(_mm256_loadu_ps(xs + i * xs_stride + k + s * S + 8 * h), wv, acc[i][(s * H + h) & 1]);
          }
      }
      for (int i = 0; i < MR; ++i) flat[r * MR + i] = _mm256_add_ps(acc[i][0], acc[i][1]);
    }
    for (int a = rows * MR; a < 8; ++a) flat[a] = _mm256_setzero_ps();
    alignas(32) float sums[8];
    _mm256_store_ps(sums, sum8(flat));
    for (int r = 0; r < rows; ++r) {
      const T* wr = w + (n + r) * K;
      for (int i = 0; i < MR; ++i) {
        float total = sums[r * MR + i];
        for (int64_t k = whole; k < K; ++k) total += scalar_of(x[i * K + k]) * scalar_of(wr[k]);
        out[i * N + n + r] = static_cast<O>(total);
      }
    }
  }
}

template <typename T, typename O>
void run_avx2(const T* x, const T* w, int64_t M, int64_t K, int64_t N, O* out) {
  const float* xs;
  int64_t xs_stride;
  thread_local std::vector<float> widened;
  if constexpr (std::is_same_v<T, float>) {
    xs = x;
    xs_stride = K;
  } else {
    xs_stride = K - K % 16;
    widened.resize(static_cast<size_t>(M * xs_stride));
    widen_x_split(x, M, K, widened.data());
    xs = widened.data();
  }
  constexpr bool f32 = std::is_same_v<T, float>;
  // Two rows, and one row of bf16: each thread streams one contiguous run of whole weight rows.  One fp32 row stays
  // on the 1 x 8 panels, which measured faster there (at rows_in_order_avx2, above).
  if (M == 2 || (M == 1 && !f32)) {
    const int64_t grain = std::max<int64_t>(1, (64 << 10) / std::max<int64_t>(1, K * (int64_t)sizeof(T)));
    at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) {
      if (M == 1) return rows_in_order_avx2<T, 1, O>(xs, xs_stride, x, w, K, N, n0, n1, out);
      rows_in_order_avx2<T, 2, O>(xs, xs_stride, x, w, K, N, n0, n1, out);
    });
    return;
  }
  // bf16 needs a register for the widening mask: 4 x 2 / 2 x 4 where fp32 takes 4 x 3 / 2 x 5.
  const int64_t nr = M == 1 ? 8 : M == 2 ? (f32 ? 5 : 4) : (f32 ? 3 : 2);
  const int64_t panels = N / nr;
  const int64_t grain = std::max<int64_t>(1, (64 << 10) / std::max<int64_t>(1, nr * K * (int64_t)sizeof(T)));
  at::parallel_for(0, panels, grain, [&](int64_t p0, int64_t p1) {
    const int64_t n0 = p0 * nr, n1 = p1 * nr;
    if (M == 1) return panels_avx2<T, 1, 8, O>(xs, xs_stride, x, w, M, K, N, n0, n1, out);
    if constexpr (f32) {
      if (M == 2) return panels_avx2<T, 2, 5, O>(xs, xs_stride, x, w, M, K, N, n0, n1, out);
      panels_avx2<T, 4, 3, O>(xs, xs_stride, x, w, M, K, N, n0, n1, out);
    } else {
      if (M == 2) return panels_avx2<T, 2, 4, O>(xs, xs_stride, x, w, M, K, N, n0, n1, out);
      panels_avx2<T, 4, 2, O>(xs, xs_stride, x, w, M, K, N, n0, n1, out);
    }
  });
  if (panels * nr < N) panels_avx2<T, 4, 1, O>(xs, xs_stride, x, w, M, K, N, panels * nr, N, out);
}
#endif

template <typename Lane, typename O>
void run(const typename Lane::T* x, const typename Lane::T* w, int64_t M, int64_t K, int64_t N, O* out) {
#if defined(VB_GEMM_AVX2)
  return run_avx2<typename Lane::T, O>(x, w, M, K, N, out);  // blocks sized for AVX2's 16 registers
#else
  // One row at a time needs more independent accumulators to hide FMA latency than four rows do.
  constexpr int NR_ONE = 8, NR = 4;
  // Each task at least ~64 KB of weights (units of `rows` weight rows): below that the thread hand-off costs more
  // than it saves.
  const auto grain_of = [K](int64_t rows) {
    return std::max<int64_t>(1, (64 << 10) / std::max<int64_t>(1, rows * K * (int64_t)sizeof(typename Lane::T)));
  };
#if defined(__AVX512F__)
  if (M <= kInOrderRows) {  // each thread streams one contiguous run of whole weight rows
    at::parallel_for(0, N, grain_of(1), [&](int64_t n0, int64_t n1) {
      if (M == 1) return rows_in_order<Lane, 1, O>(x, w, K, N, n0, n1, out);
      rows_in_order<Lane, 2, O>(x, w, K, N, n0, n1, out);
    });
    return;
  }
#endif
  bool wide = false;
#if defined(__AVX512F__)
  wide = M >= 5 && M <= 8;
#endif
  const int64_t nr = M == 1 ? NR_ONE : wide ? 3 : NR;
  const int64_t panels = N / nr;
  at::parallel_for(0, panels, grain_of(nr), [&](int64_t p0, int64_t p1) {
#if defined(__AVX512F__)
    if (wide) {
      switch (M) {
        case 5: return panel_all_rows<Lane, 5, O>(x, w, K, N, p0 * nr, p1 * nr, out);
        case 6: return panel_all_rows<Lane, 6, O>(x, w, K, N, p0 * nr, p1 * nr, out);
        case 7: return panel_all_rows<Lane, 7, O>(x, w, K, N, p0 * nr, p1 * nr, out);
        default: return panel_all_rows<Lane, 8, O>(x, w, K, N, p0 * nr, p1 * nr, out);
      }
    }
#endif
    if (M == 1)
      panel_rows<Lane, NR_ONE, O>(x, w, M, K, N, p0 * nr, p1 * nr, out);
    else
      panel_rows<Lane, NR, O>(x, w, M, K, N, p0 * nr, p1 * nr, out);
  });
  if (panels * nr < N) panel_rows<Lane, 1, O>(x, w, M, K, N, panels * nr, N, out);
#endif
}

// ---------------------------------------------------------------------------------------------------------------
// AMX tiles (bf16), reading the model's own [N, K] weight: the product is formed transposed, out^T = W x^T, so
// the weight is the A operand (a tile of 16 weight rows x 32 k, loaded straight from the row-major tensor with
// the row stride K) and x the B operand.  B must be VNNI-packed ([k / 2][m] pairs of consecutive k): that is x
// (M <= 16 rows, a few KB), packed once a call.  (Taking W as B, as out = x W^T would, needs each B row to hold
// one k pair of 16 weight rows: a 16 x 16 transpose of 4-byte pairs per tile, i.e. a packed weight copy.)
// Compiled where the compiler knows AMX (function target attributes: the rest of the library keeps its -march),
// run only where cpuid has AMX-TILE + AMX-BF16 and Linux granted this process the tile data state.
#if (defined(__x86_64__) && !defined(VICUNA_BENCH_NO_AMX) && defined(__linux__)) && \
    ((defined(__clang__) && __clang_major__ >= 12) || (!defined(__clang__) && defined(__GNUC__) && __GNUC__ >= 11))
#define VB_AMX_BUILT 1
#endif

// Rows of x for which bf16 products take the AMX path: [lo, hi], set by small_m_set_amx_rows (0, 0: none).
std::atomic<int64_t> g_amx_lo{0}, g_amx_hi{0};

#if defined(VB_AMX_BUILT)
constexpr long kArchGetXcompPerm = 0x1022, kArchReqXcompPerm = 0x1023;
constexpr int kXfeatureXtiledata = 18;

// "usable", or why not (asked once a process: cpuid, then the kernel's permission for the tile data).
std::string amx_probe() {
  unsigned a = 0, b = 0, c = 0, d = 0;
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return "cpuid leaf 7 unavailable";
  const bool tile = d & (1u << 24), bf16 = d & (1u << 22);
  if (!tile || !bf16) return "the CPU has no AMX-TILE/AMX-BF16 (cpuid)";
  if (!(b & (1u << 16))) return "the CPU has AMX but no AVX512F (cpuid; the tiles' write-back uses it)";
  if (syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) != 0)
    return std::string("Linux refused the AMX tile state (arch_prctl ARCH_REQ_XCOMP_PERM: ") + std::strerror(errno) +
           ")";
  unsigned long granted = 0;
  if (syscall(SYS_arch_prctl, kArchGetXcompPerm, &granted) != 0 || !(granted & (1ul << kXfeatureXtiledata)))
    return "Linux did not grant the AMX tile state (ARCH_GET_XCOMP_PERM)";
  return "usable";
}
#endif

const std::string& amx_status() {
#if defined(VB_AMX_BUILT)
  static const std::string status = amx_probe();
#else
  static const std::string status = "not built (the compiler lacks AMX target attributes, or VICUNA_BENCH_NO_AMX)";
#endif
  return status;
}

#if defined(VB_AMX_BUILT)
struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

constexpr int64_t kAmxChunk = 32;  // k per tile product (64 bytes of bf16 a tile row)

// bf16 bits of 16 floats, rounded to nearest even as c10::BFloat16 rounds (NaN -> 0x7FC0).
__attribute__((target("avx512f"))) inline __m256i bf16_round16(__m512 v) {
  const __m512i u = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7FFF)), lsb), 16);
  r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
  return _mm512_cvtepi32_epi16(r);
}

// Tile use: C tiles 0 and 1 (16 weight rows x M sums each: a panel of kAmxGroups x 16 weight rows), B tile 4 (x's
// chunk), A tiles 5 and 6 (the weight rows).  Two groups (32 weight rows, 32 streams of 64 bytes a chunk) measured
// ahead of four (64 streams), of one and of one group with four k-split accumulators: SmolLM2's bf16 step on the
// 2-core AMX host, 5 rounds alternated, ratio to the vector kernel at M = 1 / 2 / 8 / 16: two groups 0.80 / 0.73 /
// 0.72 / 0.45, four 0.86 / 0.77 / 0.78 / 0.46, one 0.81 / 0.74 / 0.74 / 0.46, one k-split 0.85 / 0.78 / 0.76 / 0.47.
constexpr int kAmxGroups = 2;
// No software prefetch: the hardware prefetchers follow a panel's 16 * kAmxGroups row streams on their own.  Earlier
// passes prefetched the panel two ahead into L2 (prefetcht1, a slice per chunk) and each row's chunk four ahead into
// L1 (prefetcht0), measured then at 0.95-0.98 of none.  Re-measured on the 2-core AMX host (2026-12-07, SmolLM2's
// products chained, 5 rounds alternated in one process, time with neither over time with both): 550 MB of
// weights (out of L3) M = 4 / 8 / 16: 0.94 / 0.92 / 0.92; in L3, M = 8, three runs 0.85-1.05; at M = 8, 550 MB, only
// the L2 panel took 1.09x and only the L1 chunks 1.07x the time of neither; the whole bf16 batch-8 decode step 0.959
// and 0.976 (5 of 5 rounds each).  Loading the next chunk into a second set of tiles (double buffering) measured
// 1.05 with neither.

// Weight rows [n0, n0 + 16 * G) against all M rows of x over the first `chunks` whole chunks of k; then the k tail
// and out[m][n0 + 16 g .. + 16] written 16 bf16 at a time (a gather down column m of the stored C tile; the scalar
// write-back it replaced cost M = 16 a fifth of its time: 0.57 -> 0.46 of the vector kernel).  Tiles configured by
// the caller.
template <int G>
__attribute__((target("amx-tile,amx-bf16,avx512f"))) void amx_panel(const uint16_t* xp, const uint16_t* x,
                                                                     const uint16_t* w, int64_t M, int64_t K,
                                                                     int64_t N, int64_t n0, int64_t chunks,
                                                                     c10::BFloat16* out) {
  static_assert(G == 1 || G == 2, "C tiles 0 and 1");
  const long wstride = K * 2, xstride = M * 4;
  _tile_zero(0);
  if (G > 1) _tile_zero(1);
  for (int64_t c = 0; c < chunks; ++c) {
    const uint16_t* wc = w + n0 * K + c * kAmxChunk;
    _tile_loadd(4, xp + c * 16 * M * 2, xstride);
    _tile_loadd(5, wc, wstride);
    _tile_dpbf16ps(0, 5, 4);
    if (G > 1) {
      _tile_loadd(6, wc + 16 * K, wstride);
      _tile_dpbf16ps(1, 6, 4);
    }
  }
  alignas(64) float sums[kAmxGroups][16][kMaxRows];
  _tile_stored(0, &sums[0][0][0], kMaxRows * 4);
  if (G > 1) _tile_stored(1, &sums[1][0][0], kMaxRows * 4);
  asm volatile("" ::: "memory");  // the tile stores are asm without a memory operand: read sums after them
  const int64_t whole = chunks * kAmxChunk;
  if (whole < K)
    for (int g = 0; g < G; ++g)
      for (int r = 0; r < 16; ++r) {
        const uint16_t* wr = w + (n0 + g * 16 + r) * K;
        for (int64_t m = 0; m < M; ++m) {
          float tail = 0.0f;
          for (int64_t k = whole; k < K; ++k) tail += bf16_to_float(x[m * K + k]) * bf16_to_float(wr[k]);
          sums[g][r][m] += tail;
        }
      }
  const __m512i column = _mm512_mullo_epi32(
      _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15), _mm512_set1_epi32(kMaxRows));
  for (int g = 0; g < G; ++g)
    for (int64_t m = 0; m < M; ++m)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + m * N + n0 + g * 16),
                          bf16_round16(_mm512_i32gather_ps(column, &sums[g][0][m], 4)));
}

__attribute__((target("amx-tile,amx-bf16"))) void amx_configure(int64_t M) {
  TileConfig cfg;
  for (int t = 0; t < kAmxGroups; ++t) {  // C: 16 weight rows x M fp32
    cfg.rows[t] = 16;
    cfg.colsb[t] = static_cast<uint16_t>(M * 4);
  }
  cfg.rows[4] = 16;  // B: 16 k pairs x M pairs
  cfg.colsb[4] = static_cast<uint16_t>(M * 4);
  for (int t = 5; t < 7; ++t) {  // A: 16 weight rows x 32 k
    cfg.rows[t] = 16;
    cfg.colsb[t] = 64;
  }
  // gcc's _tile_loadconfig names only the first 8 bytes of the config as its memory operand, so without this the
  // compiler may drop the other stores (an x86-64 build did: ldtilecfg then faulted on an invalid config).
  asm volatile("" : : "r"(&cfg) : "memory");
  _tile_loadconfig(&cfg);
}

__attribute__((target("amx-tile,amx-bf16"))) void amx_release() { _tile_release(); }

// out = x @ w^T for 1 <= M <= 16 bf16 rows: panels of 16 * kAmxGroups (then 16) weight rows on AMX tiles, threads
// over panels; the last N % 16 weight rows by the vector kernel.
void run_amx(const uint16_t* x, const uint16_t* w, int64_t M, int64_t K, int64_t N, c10::BFloat16* out) {
  const int64_t chunks = K / kAmxChunk;
  // x^T VNNI-packed: xp[c][r][m][2] = x[m][c * 32 + 2r + {0, 1}].  (An AVX-512 scatter of it measured the same.)
  std::vector<uint16_t> xp(std::max<int64_t>(1, chunks * 16 * M * 2));
  for (int64_t c = 0; c < chunks; ++c)
    for (int64_t r = 0; r < 16; ++r)
      for (int64_t m = 0; m < M; ++m) {
        xp[((c * 16 + r) * M + m) * 2] = x[m * K + c * kAmxChunk + 2 * r];
        xp[((c * 16 + r) * M + m) * 2 + 1] = x[m * K + c * kAmxChunk + 2 * r + 1];
      }
  asm volatile("" ::: "memory");  // the tile loads are asm without a memory operand: xp written before them
  constexpr int64_t kWide = 16 * kAmxGroups;
  const int64_t wide = N / kWide, narrow = (N - wide * kWide) / 16, units = wide + narrow;
  const int64_t panel_bytes = kWide * K * 2;
  const int64_t grain = std::max<int64_t>(1, (64 << 10) / std::max<int64_t>(1, panel_bytes));
  at::parallel_for(0, units, grain, [&](int64_t u0, int64_t u1) {
    amx_configure(M);
    for (int64_t u = u0; u < u1; ++u) {
      if (u < wide)
        amx_panel<kAmxGroups>(xp.data(), x, w, M, K, N, u * kWide, chunks, out);
      else
        amx_panel<1>(xp.data(), x, w, M, K, N, wide * kWide + (u - wide) * 16, chunks, out);
    }
    amx_release();
  });
  const int64_t done = wide * kWide + narrow * 16;
  if (done < N) panel_rows<BF16Lane, 1, c10::BFloat16>(x, w, M, K, N, done, N, out);
}

// ---------------------------------------------------------------------------------------------------------------
// More than kMaxRows bf16 rows (a prefill) on AMX tiles: out = x W^T with x as the A operand (16 rows of x a tile,
// read in place with the row stride K) and the weight as B, VNNI-packed one panel of 32 weight rows at a time into
// a buffer of this thread (64 bytes per column of the weight: 36 KB at SmolLM2's K = 576, 864 KB at Vicuna-13B's
// down projection; never a copy of the model).  The panel's rows are read from memory
// once, while being packed (the next panel prefetched into L2 meanwhile); every pair of x blocks then multiplies
// the packed panel in cache, two x blocks by two 16-row weight groups at a time (C tiles 0-3, A tiles 4-5, B tiles
// 6-7: each tile loaded is used twice).  C tiles are [row of x][weight row], the output's own order.  at::linear on
// the model's unpacked weight has oneDNN reorder the whole weight on every call instead (a write and a second read
// of it); inductor's frozen path reads a packed second copy.
//
// Measured on the 2-core AMX host (SmolLM2's 30 layers' products at 256 rows, eager, 5 rounds alternated in one
// process, time / at::linear's): this form 0.79-0.82 in two runs (1.33-1.45 TFLOP/s); without the next panel's L2
// prefetch 0.94 (a third of its time in the gathers that pack the weight, waiting on memory).  x as B instead (x
// packed, the weight the A operand in place, as run_amx does for few rows; C tiles transposed on the way out by
// gathers): 0.87-0.93 with each panel alone, 0.98-1.03 with groups of panels in L2 and their prefetch issued a slice at
// a time (the prefetches stalled).  Against inductor's frozen GEMMs (a packed second copy; its AMX micro-kernels), in
// bench_paths' chain with the head at 256 rows: 0.89 of at::linear against 0.67; the engine's whole first token: 0.94
// of the frozen path's (docs/PERFORMANCE.md, sixteenth pass).  Then the tile loop in blocks of k (amx_k_blocks): at
// K = 576 a pair of x blocks and the panel, 36 KB each, did not share L1, so both were read from L2 on every tile
// load; in two blocks they do, and the 30 layers at 256 rows went from 0.82 to 0.70 of at::linear (seventeenth
// pass).
constexpr int64_t kAmxBlock = 16;  // rows of x per A tile

__attribute__((target("amx-tile,amx-bf16"))) void amx_configure_gemm() {
  TileConfig cfg;
  for (int t = 0; t < 8; ++t) {  // C 16 rows of x x 16 weight rows (fp32); A 16 rows x 32 k; B 16 k pairs x 16
    cfg.rows[t] = 16;
    cfg.colsb[t] = 64;
  }
  asm volatile("" : : "r"(&cfg) : "memory");  // see amx_configure
  _tile_loadconfig(&cfg);
}

// r[j] (16 32-bit elements each) <- the transpose: r[m] element j = the old r[j] element m.  Four rounds of 16
// shuffles: 32-bit and 64-bit interleaves within 128-bit lanes, then the lanes moved across four registers.
__attribute__((target("avx512f"))) inline void transpose16_epi32(__m512i (&r)[16]) {
  __m512i t[16];
  for (int i = 0; i < 16; i += 2) {  // per lane L: {a[4L], b[4L], a[4L+1], b[4L+1]} and {a[4L+2], ...}
    t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {  // r[4q + e], lane L: element 4L + e of rows 4q .. 4q + 3
    r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
    r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
    r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
    r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
  }
  for (int e = 0; e < 4; ++e) {  // out row 4L + e, lane q = lane L of r[4q + e]
    const __m512i u0 = _mm512_shuffle_i32x4(r[e], r[4 + e], 0x44), u1 = _mm512_shuffle_i32x4(r[e], r[4 + e], 0xEE);
    const __m512i u2 = _mm512_shuffle_i32x4(r[8 + e], r[12 + e], 0x44);
    const __m512i u3 = _mm512_shuffle_i32x4(r[8 + e], r[12 + e], 0xEE);
    t[e] = _mm512_shuffle_i32x4(u0, u2, 0x88);
    t[4 + e] = _mm512_shuffle_i32x4(u0, u2, 0xDD);
    t[8 + e] = _mm512_shuffle_i32x4(u1, u3, 0x88);
    t[12 + e] = _mm512_shuffle_i32x4(u1, u3, 0xDD);
  }
  for (int i = 0; i < 16; ++i) r[i] = t[i];
}

// bp[g][c][r][j] (32-bit pairs) = W[n0 + 16 g + j][32 c + 2 r + {0, 1}] for the G groups of 16 weight rows: for
// each chunk, the 16 rows' 64 bytes loaded whole and transposed as 16 x 16 pairs in registers (any K, odd
// included: the rows are read unaligned).  It replaced a gather per tile row (16 dwords from 16 weight rows): with
// it SmolLM2's four prefill products, each weight fresh from memory, took 0.87-0.94 of the time at 17-256 rows and
// 0.92-0.97 at 2048 (7 rounds alternated, faster in 7 of 7 but one 6 of 7; docs/PERFORMANCE.md, twenty-second pass).
__attribute__((target("avx512f"))) void pack_weight_panel(const uint16_t* w, int64_t K, int64_t n0, int G,
                                                          int64_t chunks, uint32_t* bp) {
  for (int g = 0; g < G; ++g) {
    const uint16_t* base = w + (n0 + 16 * g) * K;
    for (int64_t c = 0; c < chunks; ++c) {
      __m512i r[16];
      for (int j = 0; j < 16; ++j) r[j] = _mm512_loadu_si512(base + j * K + c * kAmxChunk);
      transpose16_epi32(r);
      uint32_t* dst = bp + (g * chunks + c) * 256;
      for (int j = 0; j < 16; ++j) _mm512_store_si512(reinterpret_cast<__m512i*>(dst + j * 16), r[j]);
    }
  }
}

// x blocks xb[0], xb[1] (B of them, 16 rows each, row stride K) against the packed panel's G groups over chunks
// [c0, c1) of k; C tile 2 i + g (x block i, group g) starts from init[2 i + g] (zero where init is null) and is
// stored to sums[2 i + g].  pf_bytes from pf are prefetched into L2 a slice per chunk.
template <int G, int B>
__attribute__((target("amx-tile,amx-bf16"))) void amx_gemm_tiles(const uint16_t* const* xb, int64_t K,
                                                                  const uint32_t* bp, int64_t chunks, int64_t c0,
                                                                  int64_t c1, const float (*init)[16][16],
                                                                  float (*sums)[16][16], const char* pf,
                                                                  int64_t pf_bytes) {
  const long xstride = K * 2;
  const int64_t pf_step = c1 > c0 ? (pf_bytes / (c1 - c0) + 63) / 64 * 64 : 0;
  if (init) {
    _tile_loadd(0, &init[0][0][0], 64);
    if (G > 1) _tile_loadd(1, &init[1][0][0], 64);
    if (B > 1) _tile_loadd(2, &init[2][0][0], 64);
    if (G > 1 && B > 1) _tile_loadd(3, &init[3][0][0], 64);
  } else {
    _tile_zero(0);
    if (G > 1) _tile_zero(1);
    if (B > 1) _tile_zero(2);
    if (G > 1 && B > 1) _tile_zero(3);
  }
  for (int64_t c = c0; c < c1; ++c) {
    if (pf)
      for (int64_t o = (c - c0) * pf_step; o < std::min<int64_t>((c - c0 + 1) * pf_step, pf_bytes); o += 64)
        prefetch_l2(pf + o);
    _tile_loadd(6, bp + c * 256, 64);
    if (G > 1) _tile_loadd(7, bp + (chunks + c) * 256, 64);
    _tile_loadd(4, xb[0] + c * kAmxChunk, xstride);
    _tile_dpbf16ps(0, 4, 6);
    if (G > 1) _tile_dpbf16ps(1, 4, 7);
    if (B > 1) {
      _tile_loadd(5, xb[1] + c * kAmxChunk, xstride);
      _tile_dpbf16ps(2, 5, 6);
      if (G > 1) _tile_dpbf16ps(3, 5, 7);
    }
  }
  _tile_stored(0, &sums[0][0][0], 64);
  if (G > 1) _tile_stored(1, &sums[1][0][0], 64);
  if (B > 1) _tile_stored(2, &sums[2][0][0], 64);
  if (G > 1 && B > 1) _tile_stored(3, &sums[3][0][0], 64);
  asm volatile("" ::: "memory");  // the tile stores are asm without a memory operand: read sums after them
}

// The k blocks a panel is taken in: whole K up to 12 chunks (384 k: a pair of x blocks and the panel, 24 KB each,
// share L1) and from 33 chunks (1056 k) up; between, equal blocks of at most 12 chunks, each pair's C tiles kept in
// a buffer between blocks, so that the pair's slice of x and the panel's slice stay in L1 together.  Measured on the
// AMX host (one core, the tile loop alone on data in L2, GFLOP/s whole K -> blocked): K = 576 1260 -> 1670 (two
// blocks of 9), 768 1285 -> 1500, 960 1442 -> 1565; no gain at 384 (it fits) nor at 1536-13824 (1466 -> 1550 at
// 1536, within the run's noise; 1464 -> 1334 at 5120).
constexpr int64_t kAmxKBlockChunks = 12, kAmxKBlockedMostChunks = 32;

int64_t amx_k_blocks(int64_t chunks) {
  if (chunks <= kAmxKBlockChunks || chunks > kAmxKBlockedMostChunks) return 1;
  return (chunks + kAmxKBlockChunks - 1) / kAmxKBlockChunks;
}

// Weight rows [n0, n0 + 16 G) (packed into bp here) against every block of x (the last one, if partial, from
// xtail), in amx_k_blocks blocks of k (cbuf: the pairs' C tiles between blocks, 4 KB a pair); the next next_bytes
// of weight from `next` prefetched into L2 meanwhile.  Tiles configured by the caller.
__attribute__((target("amx-tile,amx-bf16,avx512f,avx512bf16"))) void amx_gemm_panel(
    const uint16_t* x, const uint16_t* xtail, const uint16_t* w, int64_t M, int64_t K, int64_t N, int64_t n0, int G,
    uint32_t* bp, float* cbuf, const char* next, int64_t next_bytes, c10::BFloat16* out) {
  const int64_t chunks = K / kAmxChunk, blocks = (M + kAmxBlock - 1) / kAmxBlock, whole = chunks * kAmxChunk;
  const int64_t pairs = (blocks + 1) / 2, kblocks = amx_k_blocks(chunks);
  const int64_t slice = (next_bytes / (pairs * kblocks) + 63) / 64 * 64;
  pack_weight_panel(w, K, n0, G, chunks, bp);
  asm volatile("" ::: "memory");  // bp written before the tile loads read it
  alignas(64) float sums[4][16][16];  // [2 i + g][row of x][weight row]
  auto* kept = reinterpret_cast<float (*)[4][16][16]>(cbuf);  // [pair] the C tiles between k blocks
  int64_t step = 0;  // (k block, pair) visits so far: the prefetch's slice
  for (int64_t kb = 0; kb < kblocks; ++kb) {
    const int64_t c0 = chunks * kb / kblocks, c1 = chunks * (kb + 1) / kblocks;
    const bool last = kb + 1 == kblocks;
    for (int64_t b = 0; b < blocks; b += 2, ++step) {
      const int nb = b + 2 <= blocks ? 2 : 1;
      const uint16_t* xb[2] = {nullptr, nullptr};
      for (int i = 0; i < nb; ++i)
        xb[i] = xtail && b + i == blocks - 1 ? xtail : x + (b + i) * kAmxBlock * K;
      const int64_t off = step * slice;
      const char* pf = off < next_bytes ? next + off : nullptr;
      const int64_t pf_bytes = pf ? std::min(slice, next_bytes - off) : 0;
      const float (*init)[16][16] = kb > 0 ? kept[b / 2] : nullptr;
      float (*dst)[16][16] = last ? sums : kept[b / 2];
      if (G == 2 && nb == 2) amx_gemm_tiles<2, 2>(xb, K, bp, chunks, c0, c1, init, dst, pf, pf_bytes);
      else if (G == 2) amx_gemm_tiles<2, 1>(xb, K, bp, chunks, c0, c1, init, dst, pf, pf_bytes);
      else if (nb == 2) amx_gemm_tiles<1, 2>(xb, K, bp, chunks, c0, c1, init, dst, pf, pf_bytes);
      else amx_gemm_tiles<1, 1>(xb, K, bp, chunks, c0, c1, init, dst, pf, pf_bytes);
      if (!last) continue;
      // Each row's 16 G sums rounded by vcvt(ne2)ps2bf16 (every AMX host has AVX512_BF16) and written at once: both
      // groups of a row are one 64-byte line of the output.  Round to nearest even, as bf16_round16, but a denormal
      // sum becomes zero: AMX's own sums hold none (its FP32 results are flushed), only a k tail's could.  Measured
      // against bf16_round16 and a 32-byte store a group (2-core AMX host, SmolLM2's four prefill products resident,
      // 7 rounds alternated in one process, new / old, two runs): 256 rows 0.961 / 0.987, 512 0.959 / 0.970, 1024
      // 0.974 / 0.956 (7 of 7), 2048 0.998; the outputs bitwise equal (docs/PERFORMANCE.md, twentieth pass).
      for (int i = 0; i < nb; ++i)
        for (int64_t r = 0; r < kAmxBlock; ++r) {
          const int64_t m = (b + i) * kAmxBlock + r;
          if (m >= M) break;
          if (whole < K)
            for (int g = 0; g < G; ++g)
              for (int j = 0; j < 16; ++j) {
                const uint16_t* wr = w + (n0 + 16 * g + j) * K;
                float tail = 0.0f;
                for (int64_t k = whole; k < K; ++k) tail += bf16_to_float(x[m * K + k]) * bf16_to_float(wr[k]);
                sums[2 * i + g][r][j] += tail;
              }
          const __m512 low = _mm512_load_ps(sums[2 * i][r]);
          if (G == 2)
            _mm512_storeu_si512(out + m * N + n0,
                                (__m512i)_mm512_cvtne2ps_pbh(_mm512_load_ps(sums[2 * i + 1][r]), low));
          else
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + m * N + n0), (__m256i)_mm512_cvtneps_pbh(low));
        }
    }
  }
}

// out = x @ w^T for one part (below) of more than kMaxRows bf16 rows: threads over panels of 32 (then 16) weight
// rows (each its own share, then what another has left), each panel packed once and multiplied by every block of
// x; the k tail (K % 32) added from x and w; the last N % 16 weight rows by the vector kernel.
void run_amx_gemm_rows(const uint16_t* x, const uint16_t* w, int64_t M, int64_t K, int64_t N, c10::BFloat16* out) {
  const int64_t chunks = K / kAmxChunk;
  // The last block of x, if partial, copied with zero rows after it (a tile reads 16 rows).
  const int64_t tail_rows = M % kAmxBlock;
  std::vector<uint16_t> xtail(tail_rows ? kAmxBlock * K : 0, 0);
  if (tail_rows) std::memcpy(xtail.data(), x + (M - tail_rows) * K, tail_rows * K * 2);
  asm volatile("" ::: "memory");  // the tile loads are asm without a memory operand: xtail written before them
  const int64_t wide = N / 32, narrow = (N - wide * 32) / 16, units = wide + narrow;
  // Each thread's share of the panels (a lane) as one range [front, back) packed in an atomic word: its thread takes
  // from the front, and a thread whose own lane is done takes from the backs of the others'.  Panels only move where
  // a thread falls behind, so the shares keep their order and the next-panel prefetch otherwise.  On this 2-core VM
  // a thread's core at times ran the tiles at half speed or less for seconds (the 30 layers at 256 rows: 57 ms
  // where they took 28-29, one thread's time, while at::linear on the same two threads did not slow); with a busy
  // process on one core, fixed halves took 1.56x as long as this; idle, the two are level (1.00, seventeenth pass).
  const int64_t lanes = std::max<int64_t>(1, std::min<int64_t>(units, at::get_num_threads()));
  std::vector<std::atomic<uint64_t>> ranges(lanes);
  for (int64_t l = 0; l < lanes; ++l)
    ranges[l].store(static_cast<uint64_t>(units * l / lanes) << 32 | static_cast<uint64_t>(units * (l + 1) / lanes));
  auto take = [&](int64_t l, bool from_front, int64_t& got) {
    uint64_t cur = ranges[l].load();
    for (;;) {
      const int64_t f = static_cast<int64_t>(cur >> 32), b = static_cast<int64_t>(cur & 0xffffffffu);
      if (f >= b) return false;
      const uint64_t next = from_front ? static_cast<uint64_t>(f + 1) << 32 | static_cast<uint64_t>(b)
                                       : static_cast<uint64_t>(f) << 32 | static_cast<uint64_t>(b - 1);
      if (ranges[l].compare_exchange_weak(cur, next)) {
        got = from_front ? f : b - 1;
        return true;
      }
    }
  };
  at::parallel_for(0, lanes, 1, [&](int64_t u0, int64_t u1) {
    // The packed panel in a buffer this thread keeps (grown, never zeroed: every element is written before it is
    // read), so a prefill's ~120 products do not each map, fault in and unmap a fresh one: allocated per call, the
    // compiled products took 1.35x as long (the eager ones, whose frees kept the heap warm, did not).
    struct AlignedDelete {
      void operator()(uint32_t* p) const { ::operator delete[](p, std::align_val_t(64)); }
    };
    static thread_local std::unique_ptr<uint32_t[], AlignedDelete> buffer;
    static thread_local int64_t capacity = 0;
    // the panel (2 groups x chunks x 1 KB), then the pairs' C tiles between k blocks (4 KB a pair)
    const int64_t panel = 2 * chunks * 256, kept = amx_k_blocks(chunks) > 1 ? (M + 31) / 32 * 1024 : 0;
    const int64_t need = std::max<int64_t>(1, panel + kept);
    if (need > capacity) {
      // 64-byte aligned: the packing's stores need it, and each tile row is then one cache line
      buffer.reset(new (std::align_val_t(64)) uint32_t[need]);
      capacity = need;
    }
    amx_configure_gemm();
    // Panel u; where this thread takes panel u + 1 next, that one is prefetched into L2 a slice per pair of x blocks.
    auto panel_at = [&](int64_t u, bool then_next) {
      const int G = u < wide ? 2 : 1;
      const int64_t n0 = u < wide ? u * 32 : wide * 32 + (u - wide) * 16;
      const int64_t next_lo = n0 + 16 * G;
      const int64_t next_bytes = then_next ? std::min<int64_t>(32, N - next_lo) * K * 2 : 0;
      amx_gemm_panel(x, tail_rows ? xtail.data() : nullptr, w, M, K, N, n0, G, buffer.get(),
                     reinterpret_cast<float*>(buffer.get() + panel), reinterpret_cast<const char*>(w + next_lo * K),
                     next_bytes, out);
    };
    for (int64_t lane = u0; lane < u1; ++lane) {  // one lane a thread, unless fewer threads came
      int64_t u = 0;
      while (take(lane, true, u)) {
        const int64_t back = static_cast<int64_t>(ranges[lane].load(std::memory_order_relaxed) & 0xffffffffu);
        panel_at(u, u + 1 < back);
      }
    }
    for (int64_t d = 1; d < lanes; ++d) {  // then the others' last panels, from their backs
      const int64_t lane = (u0 + d) % lanes;
      int64_t u = 0;
      while (take(lane, false, u)) panel_at(u, false);
    }
    amx_release();
  });
  const int64_t done = wide * 32 + narrow * 16;
  if (done < N) panel_rows<BF16Lane, 1, c10::BFloat16>(x, w, M, K, N, done, N, out);
}

// Every panel re-reads all of x: more rows than ~768 KB of x at a time (a long or batched prefill) would come from
// L3 each time, so they are taken in equal parts of at most that many (a multiple of 32 rows).  SmolLM2's products
// at 2048 rows (eager, 5 rounds alternated, time / at::linear's): whole 1.88, parts of 192 KB 1.84, 384 KB 1.65,
// 768 KB 1.44-1.47; with the k blocks (7 rounds, time / 768 KB parts') 384 KB 1.19, 1.5 MB 1.06, 3 MB 1.58.
// (at::linear's reorder of the weight is spread over more rows there: the AMX GEMM is chosen only up to
// cpu_kernels.AMX_GEMM_ROWS.)
constexpr int64_t kAmxGemmXBytes = 768 << 10;

void run_amx_gemm(const uint16_t* x, const uint16_t* w, int64_t M, int64_t K, int64_t N, c10::BFloat16* out) {
  const int64_t most = std::max<int64_t>(32, kAmxGemmXBytes / (2 * K) / 32 * 32);
  const int64_t parts = (M + most - 1) / most, rows = ((M + parts - 1) / parts + 31) / 32 * 32;
  for (int64_t m0 = 0; m0 < M; m0 += rows)
    run_amx_gemm_rows(x + m0 * K, w, std::min(rows, M - m0), K, N, out + m0 * N);
}


#endif

// Whether a bf16 product of M rows takes the AMX tiles now.
bool amx_takes(int64_t M) {
#if defined(VB_AMX_BUILT)
  return M >= g_amx_lo.load(std::memory_order_relaxed) && M <= g_amx_hi.load(std::memory_order_relaxed);
#else
  (void)M;
  return false;
#endif
}

// bf16 products of kMaxRows + 1 .. g_amx_gemm_hi rows (a prefill) on the AMX tiles (run_amx_gemm) instead of
// at::linear (0: none): set by small_m_set_amx_gemm (the per-host choice of cpu_kernels.py).
std::atomic<int64_t> g_amx_gemm_hi{0};

// Products of up to hi rows (more than kMaxRows) on the AMX GEMM, 0 for none; false (and nothing set) where AMX is
// asked for and not usable here.
bool small_m_set_amx_gemm(int64_t hi) {
  TORCH_CHECK(hi == 0 || hi > kMaxRows, "small_m_set_amx_gemm: need 0 (none) or more than ", kMaxRows,
              " rows, got ", hi);
  if (hi != 0 && amx_status() != "usable") return false;
  g_amx_gemm_hi = hi;
  return true;
}

// Use the AMX path for bf16 products of lo..hi rows (0, 0: never); false (and nothing set) where AMX is not
// usable here (small_m_amx says why).
bool small_m_set_amx_rows(int64_t lo, int64_t hi) {
  if (lo == 0 && hi == 0) {
    g_amx_lo = 0;
    g_amx_hi = 0;
    return true;
  }
  TORCH_CHECK(1 <= lo && lo <= hi && hi <= kMaxRows, "small_m_set_amx_rows: need 1 <= lo <= hi <= ", kMaxRows,
              ", got ", lo, ", ", hi);
  if (amx_status() != "usable") return false;
  g_amx_lo = lo;
  g_amx_hi = hi;
  return true;
}

std::string small_m_amx() { return amx_status(); }

// bf16 products of more than kMaxRows rows (a prefill) where the host has no bf16 dot product (AVX2, AVX-512F
// without BF16, aarch64 without BF16): ATen's bf16 GEMM there runs a dot product of widened scalars
// (bf16_dot_with_fp32_arith on AVX2: 57% of a batch-1 generation's profile).  Instead x is widened to fp32 once
// and the weight one block of rows at a time (at most 2 MiB of fp32: a transient, never a second copy of the model),
// each block multiplied by BLAS sgemm straight into its columns of an fp32 output, rounded to bf16 at the end.
// SmolLM2's 30 layers at 256 rows (2 threads): emulated AVX2 2136 -> 274 ms, AVX-512 without BF16 913 -> 344; with
// avx512_bf16 ATen's own (oneDNN) 325 against 343, so those hosts keep it.  Blocks of 256 KB / 1 MB / 4 MB / 32 MB:
// 426 / 329 / 293 / 282 ms (emulated).  On a real AVX2 host (AMD EPYC Zen 3) blocks of 8 MB left the process
// 1.37-1.40x weights + KV resident after serving bf16 (4 probes) and 2 MiB blocks 1.28-1.29x (14 of 15; one 1.33),
// the first token within that host's noise (2 MiB / 8 MB by run: 1.04 1.00 1.08 0.95): docs/PERFORMANCE.md, ninth
// pass.
// Set by small_m_set_bf16_fp32_gemm (the per-host choice of cpu_kernels.py).
std::atomic<bool> g_bf16_fp32_gemm{false};
constexpr int64_t kFp32BlockBytes = 2 << 20;

bool small_m_set_bf16_fp32_gemm(bool on) {
  g_bf16_fp32_gemm = on;
  return on;
}

at::Tensor bf16_linear_in_fp32(const at::Tensor& x2d, const at::Tensor& w) {
  const int64_t M = x2d.size(0), K = x2d.size(1), N = w.size(0);
  const at::Tensor x32 = x2d.to(at::kFloat);
  at::Tensor out32 = at::empty({M, N}, x2d.options().dtype(at::kFloat));
  const int64_t rows = std::max<int64_t>(1, kFp32BlockBytes / std::max<int64_t>(1, K * 4));
  for (int64_t n0 = 0; n0 < N; n0 += rows) {
    const int64_t n = std::min(rows, N - n0);
    at::Tensor columns = out32.narrow(1, n0, n);  // row stride N: sgemm writes it in place (ldc = N)
    at::mm_out(columns, x32, w.narrow(0, n0, n).to(at::kFloat).t());
  }
  return out32.to(at::kBFloat16);
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
  // bf16 prefills of up to g_amx_gemm_hi rows: the AMX GEMM (AMX hosts)
  bool amx_gemm = false;
#if defined(VB_AMX_BUILT)
  amx_gemm = M > kMaxRows && K > 0 && x.scalar_type() == at::kBFloat16 &&
             M <= g_amx_gemm_hi.load(std::memory_order_relaxed);
#endif
  if (!amx_gemm && M > kMaxRows && K > 0 && x.scalar_type() == at::kBFloat16 &&
      g_bf16_fp32_gemm.load(std::memory_order_relaxed))
    return bf16_linear_in_fp32(x.reshape({M, K}), weight).view(out_shape);
  if (!amx_gemm && (M > kMaxRows || M == 0 || K == 0 || !supported))
    return at::linear(x, weight);  // BLAS is right there
  at::Tensor xc = x.reshape({M, K}).contiguous();
  at::Tensor wc = weight.contiguous();
  // The output in x's dtype, written by the kernel (bf16 rounded there): no fp32 buffer and no conversion op
  // after it (~121 products a SmolLM2 step, each a dispatcher call and an allocation less).
  at::Tensor out = at::empty({M, N}, x.options());
  if (x.scalar_type() == at::kFloat) {
    run<F32Lane, float>(xc.data_ptr<float>(), wc.data_ptr<float>(), M, K, N, out.data_ptr<float>());
    return out.view(out_shape);
  }
#if defined(VB_AMX_BUILT)
  if (amx_gemm) {
    run_amx_gemm(reinterpret_cast<const uint16_t*>(xc.data_ptr<at::BFloat16>()),
                 reinterpret_cast<const uint16_t*>(wc.data_ptr<at::BFloat16>()), M, K, N,
                 out.data_ptr<c10::BFloat16>());
    return out.view(out_shape);
  }
  if (amx_takes(M)) {
    run_amx(reinterpret_cast<const uint16_t*>(xc.data_ptr<at::BFloat16>()),
            reinterpret_cast<const uint16_t*>(wc.data_ptr<at::BFloat16>()), M, K, N, out.data_ptr<c10::BFloat16>());
    return out.view(out_shape);
  }
#endif
  run<BF16Lane, c10::BFloat16>(reinterpret_cast<const uint16_t*>(xc.data_ptr<at::BFloat16>()),
                               reinterpret_cast<const uint16_t*>(wc.data_ptr<at::BFloat16>()), M, K, N,
                               out.data_ptr<c10::BFloat16>());
  return out.view(out_shape);
}

// ---------------------------------------------------------------------------------------------------------------
// Decode attention: one query token per row over the slots of its KV cache that hold tokens.
//
// q [B, H, 1, D]; k, v [B, Hkv, L, D] (the cache, any L); key_valid [B, L] (bool).  Query head h uses kv head
// h / (H / Hkv).  Only slots with key_valid set are read: a row's cost follows its filled length, not the cache
// bucket's (SDPA reads all L slots under a mask: at batch 8, 512 slots, 30 layers of SmolLM2 it took 19-22 ms
// where reading the keys and values takes 3-6).  Scores and softmax in fp32; a row with no valid slot gives 0;
// NaN in the query or in a valid key or value gives NaN where SDPA does (a blow-up stays visible); bf16 outputs
// rounded to nearest even.
//
// One task is (row b, kv head g, part s): the H / Hkv query heads of group g against part s of row b's valid
// slots, so each key and value is read once for all heads that share it.  A row is cut into parts only when
// there are fewer (b, g) pairs than threads can share evenly (batch 1); the parts' softmax partials (max, sum,
// unnormalised output) are then merged as in flash-decoding.  On AVX-512 the scores take 8-16 keys at a time
// for up to 3 heads (keys loaded once per head block, the sums reduced 16 at a time), bf16 scores use
// vdpbf16ps where the host has it, exp is a vector polynomial, and the next keys and values are prefetched
// (the loads were left exposed: 30 layers at batch 8 took 10.3 ms from memory against 3.3 ms from cache); on AVX2 the
// same blocks run 8 lanes wide with a polynomial exp of their own; elsewhere generic loops.

template <typename T>
inline float to_f(T v);
template <>
inline float to_f<float>(float v) { return v; }
template <>
inline float to_f<c10::BFloat16>(c10::BFloat16 v) { return static_cast<float>(v); }

// Keys or values this many slots ahead are prefetched into L2 while the current ones are used.
constexpr int64_t kAttnPrefetchSlots = 32;

inline void prefetch_row(const void* p, int64_t bytes) {
  const char* c = static_cast<const char*>(p);
  for (int64_t o = 0; o < bytes; o += 64) prefetch_l2(c + o);
}

// scores[r * n + i] = q[r] . k[slots[i]] for r < rep, i < n (q in fp32).
template <typename T>
void scores_generic(const float* q, const T* k, int64_t row_stride, const int64_t* slots, int64_t n, int64_t rep,
                    int64_t D, float* scores) {
  for (int64_t i = 0; i < n; ++i) {
    const T* kl = k + slots[i] * row_stride;
    for (int64_t r = 0; r < rep; ++r) {
      const float* qr = q + r * D;
      float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
      for (int64_t d = 0; d < D; ++d) dot += qr[d] * to_f(kl[d]);
      scores[r * n + i] = dot;
    }
  }
}

// acc[r * D + d] += sum_i p[r * n + i] * v[slots[i]][d].
template <typename T>
void values_generic(const float* p, const T* v, int64_t row_stride, const int64_t* slots, int64_t n, int64_t rep,
                    int64_t D, float* acc) {
  for (int64_t i = 0; i < n; ++i) {
    const T* vl = v + slots[i] * row_stride;
    for (int64_t r = 0; r < rep; ++r) {
      const float pr = p[r * n + i];
      float* ar = acc + r * D;
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) ar[d] += pr * to_f(vl[d]);
    }
  }
}

// In place: s[i] = exp(s[i] * scale - max); returns (max, sum) of the scaled scores.
inline void softmax_generic(float* s, int64_t n, float scale, float* top_out, float* total_out) {
  float top = -INFINITY;
  for (int64_t i = 0; i < n; ++i) top = std::max(top, s[i] * scale);
  float total = 0.0f;
  for (int64_t i = 0; i < n; ++i) {
    s[i] = std::exp(s[i] * scale - top);
    total += s[i];
  }
  *top_out = top;
  *total_out = total;
}

#if defined(__AVX512F__)
inline __m512 load16f(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16f(const c10::BFloat16* p) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
}

// exp(x) for x <= 0 (softmax after subtracting the max), within ~2 ulp: x = n ln2 + r, |r| <= ln2 / 2, exp(r)
// by Cephes' expf polynomial, times 2^n by vscalefps (which flushes to 0 far below the fp32 range).  NaN in, NaN
// out: vmaxps returns its second operand when either is NaN, so the clamp keeps x there (a NaN score, from a NaN
// query or valid key, must make the output NaN as in SDPA, not exp(-104) = 0).
inline __m512 exp512(__m512 x) {
  x = _mm512_max_ps(_mm512_set1_ps(-104.0f), x);
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(p, n);
}

inline void softmax_avx512(float* s, int64_t n, float scale, float* top_out, float* total_out) {
  const __m512 sc = _mm512_set1_ps(scale);
  __m512 topv = _mm512_set1_ps(-INFINITY);
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) topv = _mm512_max_ps(topv, _mm512_mul_ps(_mm512_loadu_ps(s + i), sc));
  float top = _mm512_reduce_max_ps(topv);
  for (int64_t j = i; j < n; ++j) top = std::max(top, s[j] * scale);
  const __m512 tv = _mm512_set1_ps(top);
  __m512 totv = _mm512_setzero_ps();
  for (i = 0; i + 16 <= n; i += 16) {
    const __m512 e = exp512(_mm512_fmsub_ps(_mm512_loadu_ps(s + i), sc, tv));
    _mm512_storeu_ps(s + i, e);
    totv = _mm512_add_ps(totv, e);
  }
  if (i < n) {
    const __mmask16 m = (__mmask16)((1u << (n - i)) - 1);
    const __m512 e = exp512(_mm512_fmsub_ps(_mm512_maskz_loadu_ps(m, s + i), sc, tv));
    _mm512_mask_storeu_ps(s + i, m, e);
    totv = _mm512_add_ps(totv, _mm512_maskz_mov_ps(m, e));
  }
  *top_out = top;
  *total_out = _mm512_reduce_add_ps(totv);
}

// How a key row is read for scores: fp32 q against fp32 keys or widened bf16 keys, 16 elements a step; or
// (AVX512-BF16) bf16 q against bf16 keys, 32 a step by vdpbf16ps (products exact, sums in fp32).
template <typename T>
struct WideKey {
  using Q = float;
  using Vec = __m512;
  static constexpr int Step = 16;
  static Vec load_q(const Q* q) { return _mm512_loadu_ps(q); }
  static Vec load_k(const T* k) { return load16f(k); }
  static __m512 mac(__m512 acc, Vec q, Vec k) { return _mm512_fmadd_ps(q, k, acc); }
};
#if defined(__AVX512BF16__) && defined(__AVX512BW__)
struct DotBF16Key {
  using Q = c10::BFloat16;
  using Vec = __m512i;
  static constexpr int Step = 32;
  static Vec load_q(const Q* q) { return _mm512_loadu_si512(q); }
  static Vec load_k(const c10::BFloat16* k) { return _mm512_loadu_si512(k); }
  static __m512 mac(__m512 acc, Vec q, Vec k) { return _mm512_dpbf16_ps(acc, (__m512bh)q, (__m512bh)k); }
};
#endif

// Scores of RB query heads against KB keys at a time: RB * KB accumulators (<= 24 of the 32 registers), each
// key chunk loaded once for the RB heads; the partial sums reduced 16 at a time by sum16.
template <typename KL, typename T, int RB, int KB>
void scores_block_rows(const typename KL::Q* q, const T* k, int64_t row_stride, const int64_t* slots, int64_t n,
                       int64_t D, float* scores, int64_t score_stride) {
  static_assert(RB * KB <= 32 && (RB * KB) % 8 == 0, "register block");
  constexpr int NA = RB * KB, NG = (NA + 15) / 16;
  for (int64_t i0 = 0; i0 < n; i0 += KB) {
    const int count = static_cast<int>(std::min<int64_t>(KB, n - i0));
    const T* rows[KB];
    for (int j = 0; j < KB; ++j) rows[j] = k + slots[i0 + std::min(j, count - 1)] * row_stride;
    if (i0 + kAttnPrefetchSlots < n) {
      const int64_t ahead = std::min<int64_t>(KB, n - i0 - kAttnPrefetchSlots);
      for (int64_t j = 0; j < ahead; ++j)
        prefetch_row(k + slots[i0 + kAttnPrefetchSlots + j] * row_stride, D * (int64_t)sizeof(T));
    }
    __m512 acc[NG * 16];
    for (int a = 0; a < NG * 16; ++a) acc[a] = _mm512_setzero_ps();
    for (int64_t d = 0; d < D; d += KL::Step) {
      typename KL::Vec qv[RB];
      for (int r = 0; r < RB; ++r) qv[r] = KL::load_q(q + r * D + d);
      for (int j = 0; j < KB; ++j) {
        const typename KL::Vec kv = KL::load_k(rows[j] + d);
        for (int r = 0; r < RB; ++r) acc[r * KB + j] = KL::mac(acc[r * KB + j], qv[r], kv);
      }
    }
    alignas(64) float sums[NG * 16];
    for (int g = 0; g < NG; ++g) _mm512_store_ps(sums + 16 * g, sum16(acc + 16 * g));
    // Masked vector moves: a scalar loop here became `rep movs`, whose start-up cost dwarfed 8 floats.
    const __mmask16 keep = static_cast<__mmask16>((1u << count) - 1);
    for (int r = 0; r < RB; ++r)
      _mm512_mask_storeu_ps(scores + r * score_stride + i0, keep, _mm512_maskz_loadu_ps(keep, sums + r * KB));
  }
}

template <typename KL, typename T>
void scores_avx512(const typename KL::Q* q, const T* k, int64_t row_stride, const int64_t* slots, int64_t n,
                   int64_t rep, int64_t D, float* scores) {
  int64_t r = 0;
  for (; r + 3 <= rep; r += 3)
    scores_block_rows<KL, T, 3, 8>(q + r * D, k, row_stride, slots, n, D, scores + r * n, n);
  if (rep - r == 2) scores_block_rows<KL, T, 2, 8>(q + r * D, k, row_stride, slots, n, D, scores + r * n, n);
  if (rep - r == 1) scores_block_rows<KL, T, 1, 16>(q + r * D, k, row_stride, slots, n, D, scores + r * n, n);
}

// The values' vector (values_block_rows, below): 16 fp32 lanes; blocks of up to 4 heads.
struct AttnVec {
  using V = __m512;
  static constexpr int W = 16, Heads = 4;
  static V zero() { return _mm512_setzero_ps(); }
  static V set1(float x) { return _mm512_set1_ps(x); }
  static V fmadd(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  template <typename T>
  static V load(const T* p) { return load16f(p); }
  static void store(float* p, V v) { _mm512_storeu_ps(p, v); }
};
#endif

#if !defined(__AVX512F__) && defined(__AVX2__) && defined(__FMA__)
// AVX2 (16 vector registers, no masks, no vscalefps): the same blocking as the AVX-512 path above, 8 lanes wide, in
// place of the generic loops there.  A whole decode step against the generic loops, alternated in one engine (this
// 2-core AMX host built with -march=haswell, ATen and oneDNN capped at AVX2; SmolLM2, 256 in / 64 out, 3-4 rounds):
// bf16 batch 1 / 8: 0.96 / 0.91 of the time; fp32: 0.97 / 0.93.
inline __m256 load8f(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8f(const c10::BFloat16* p) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p)), 16));
}

// exp(x) for x <= 0 as exp512 (Cephes' polynomial), 2^n built in the exponent field: x is clamped at -87 (n >= -126,
// a normal number; exp(-87) = 1.6e-38 where exp512 flushes below -104 to 0, both nothing beside the softmax's
// largest term, 1).  NaN in, NaN out: vmaxps keeps its second operand x when it is NaN, and the polynomial of a
// NaN r is NaN whatever garbage n's conversion made of 2^n.
inline __m256 exp256(__m256 x) {
  x = _mm256_max_ps(_mm256_set1_ps(-87.0f), x);
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i pow2n = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(pow2n));
}

inline float hmax256(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_movehdup_ps(m));
  return _mm_cvtss_f32(m);
}

inline void softmax_avx2(float* s, int64_t n, float scale, float* top_out, float* total_out) {
  const __m256 sc = _mm256_set1_ps(scale);
  __m256 topv = _mm256_set1_ps(-INFINITY);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) topv = _mm256_max_ps(topv, _mm256_mul_ps(_mm256_loadu_ps(s + i), sc));
  float top = hmax256(topv);
  for (int64_t j = i; j < n; ++j) top = std::max(top, s[j] * scale);
  // A NaN score may or may not reach top (as in softmax_generic); either way its exp is NaN, and so is the total.
  const __m256 tv = _mm256_set1_ps(top);
  __m256 totv = _mm256_setzero_ps();
  for (i = 0; i + 8 <= n; i += 8) {
    const __m256 e = exp256(_mm256_fmsub_ps(_mm256_loadu_ps(s + i), sc, tv));
    _mm256_storeu_ps(s + i, e);
    totv = _mm256_add_ps(totv, e);
  }
  float total = hsum256(totv);
  for (; i < n; ++i) {
    s[i] = std::exp(s[i] * scale - top);
    total += s[i];
  }
  *top_out = top;
  *total_out = total;
}

// Scores of RB query heads against KB keys at a time (RB * KB = 8 accumulators, reduced together by sum8).
template <typename T, int RB, int KB>
void scores_block_rows_avx2(const float* q, const T* k, int64_t row_stride, const int64_t* slots, int64_t n,
                            int64_t D, float* scores, int64_t score_stride) {
  static_assert(RB * KB == 8, "one sum8 a block");
  for (int64_t i0 = 0; i0 < n; i0 += KB) {
    const int count = static_cast<int>(std::min<int64_t>(KB, n - i0));
    const T* rows[KB];
    for (int j = 0; j < KB; ++j) rows[j] = k + slots[i0 + std::min(j, count - 1)] * row_stride;
    if (i0 + kAttnPrefetchSlots < n) {
      const int64_t ahead = std::min<int64_t>(KB, n - i0 - kAttnPrefetchSlots);
      for (int64_t j = 0; j < ahead; ++j)
        prefetch_row(k + slots[i0 + kAttnPrefetchSlots + j] * row_stride, D * (int64_t)sizeof(T));
    }
    __m256 acc[8];
    for (int a = 0; a < 8; ++a) acc[a] = _mm256_setzero_ps();
    for (int64_t d = 0; d < D; d += 8) {
      __m256 qv[RB];
      for (int r = 0; r < RB; ++r) qv[r] = _mm256_loadu_ps(q + r * D + d);
      for (int j = 0; j < KB; ++j) {
        const __m256 kv = load8f(rows[j] + d);
        for (int r = 0; r < RB; ++r) acc[r * KB + j] = _mm256_fmadd_ps(qv[r], kv, acc[r * KB + j]);
      }
    }
    alignas(32) float sums[8];
    _mm256_store_ps(sums, sum8(acc));
    for (int r = 0; r < RB; ++r)
      for (int j = 0; j < count; ++j) scores[r * score_stride + i0 + j] = sums[r * KB + j];
  }
}

template <typename T>
void scores_avx2(const float* q, const T* k, int64_t row_stride, const int64_t* slots, int64_t n, int64_t rep,
                 int64_t D, float* scores) {
  int64_t r = 0;
  for (; r + 2 <= rep; r += 2)
    scores_block_rows_avx2<T, 2, 4>(q + r * D, k, row_stride, slots, n, D, scores + r * n, n);
  if (r < rep) scores_block_rows_avx2<T, 1, 8>(q + r * D, k, row_stride, slots, n, D, scores + r * n, n);
}

// The values' vector: 8 fp32 lanes; blocks of up to 2 heads (2 x 4 sums, 4 value vectors and a broadcast: 13 of
// the 16 registers).
struct AttnVec {
  using V = __m256;
  static constexpr int W = 8, Heads = 2;
  static V zero() { return _mm256_setzero_ps(); }
  static V set1(float x) { return _mm256_set1_ps(x); }
  static V fmadd(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  template <typename T>
  static V load(const T* p) { return load8f(p); }
  static void store(float* p, V v) { _mm256_storeu_ps(p, v); }
};
#define VB_ATTN_AVX2 1
#endif

#if defined(__AVX512F__) || defined(VB_ATTN_AVX2)
// acc[r * D + d] += sum_i p[r * n + i] * v[slots[i]][d] for RB heads: 4 vectors of columns at a time (64 on
// AVX-512, 32 on AVX2), the sums in registers across all slots, each value chunk loaded once for the RB heads.
template <typename T, int RB>
void values_block_rows(const float* p, const T* v, int64_t row_stride, const int64_t* slots, int64_t n, int64_t D,
                       float* acc, int64_t p_stride) {
  using A = AttnVec;
  constexpr int64_t cols = 4 * A::W;
  for (int64_t d0 = 0; d0 < D; d0 += cols) {
    const int chunks = static_cast<int>(std::min<int64_t>(cols, D - d0) / A::W);
    typename A::V sum[RB][4];
    for (int r = 0; r < RB; ++r)
      for (int c = 0; c < 4; ++c) sum[r][c] = A::zero();
    for (int64_t i = 0; i < n; ++i) {
      if (d0 == 0 && i + kAttnPrefetchSlots < n)
        prefetch_row(v + slots[i + kAttnPrefetchSlots] * row_stride, D * (int64_t)sizeof(T));
      const T* vi = v + slots[i] * row_stride + d0;
      typename A::V vv[4];
      for (int c = 0; c < 4; ++c) vv[c] = c < chunks ? A::load(vi + A::W * c) : A::zero();
      for (int r = 0; r < RB; ++r) {
        const typename A::V pr = A::set1(p[r * p_stride + i]);
        for (int c = 0; c < 4; ++c) sum[r][c] = A::fmadd(pr, vv[c], sum[r][c]);
      }
    }
    for (int r = 0; r < RB; ++r)
      for (int c = 0; c < chunks; ++c) A::store(acc + r * D + d0 + A::W * c, sum[r][c]);
  }
}

// The last rep % Heads heads: one block of that many.
template <typename T, int RB>
void values_rest(const float* p, const T* v, int64_t row_stride, const int64_t* slots, int64_t n, int64_t left,
                 int64_t D, float* acc, int64_t p_stride) {
  if constexpr (RB > 0) {
    if (left == RB) return values_block_rows<T, RB>(p, v, row_stride, slots, n, D, acc, p_stride);
    values_rest<T, RB - 1>(p, v, row_stride, slots, n, left, D, acc, p_stride);
  }
}

template <typename T>
void values_vec(const float* p, const T* v, int64_t row_stride, const int64_t* slots, int64_t n, int64_t rep,
                int64_t D, float* acc) {
  constexpr int H = AttnVec::Heads;
  int64_t r = 0;
  for (; r + H <= rep; r += H) values_block_rows<T, H>(p + r * n, v, row_stride, slots, n, D, acc + r * D, n);
  values_rest<T, H - 1>(p + r * n, v, row_stride, slots, n, rep - r, D, acc + r * D, n);
}
#endif

// The partial softmax of one task: per head, the max and sum of exp over its slots and the unnormalised output.
struct Partial {
  float* top;    // [rep]
  float* total;  // [rep]
  float* acc;    // [rep * D]
};

template <typename T>
void attend_part(const T* qrow, int64_t q_head_stride, int64_t q_d_stride, const T* kb, const T* vb,
                 int64_t k_row_stride, int64_t v_row_stride, const int64_t* slots, int64_t n, int64_t rep, int64_t D,
                 float scale, std::vector<float>& qf, std::vector<c10::BFloat16>& qh, std::vector<float>& scores,
                 Partial out) {
  std::fill(out.acc, out.acc + rep * D, 0.0f);
  for (int64_t r = 0; r < rep; ++r) {
    out.top[r] = -INFINITY;
    out.total[r] = 0.0f;
  }
  if (n == 0) return;
  scores.resize(rep * n);
  bool done = false;
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
#if defined(__AVX512BF16__) && defined(__AVX512BW__)
    if (D % 32 == 0) {
      qh.resize(rep * D);
      for (int64_t r = 0; r < rep; ++r)
        for (int64_t d = 0; d < D; ++d) qh[r * D + d] = qrow[r * q_head_stride + d * q_d_stride];
      scores_avx512<DotBF16Key, T>(qh.data(), kb, k_row_stride, slots, n, rep, D, scores.data());
      done = true;
    }
#endif
  }
#endif
  if (!done) {
    qf.resize(rep * D);
    for (int64_t r = 0; r < rep; ++r)
      for (int64_t d = 0; d < D; ++d) qf[r * D + d] = to_f(qrow[r * q_head_stride + d * q_d_stride]);
#if defined(__AVX512F__)
    if (D % 16 == 0) {
      scores_avx512<WideKey<T>, T>(qf.data(), kb, k_row_stride, slots, n, rep, D, scores.data());
      done = true;
    }
#endif
#if defined(VB_ATTN_AVX2)
    if (D % 8 == 0) {
      scores_avx2<T>(qf.data(), kb, k_row_stride, slots, n, rep, D, scores.data());
      done = true;
    }
#endif
    if (!done) scores_generic<T>(qf.data(), kb, k_row_stride, slots, n, rep, D, scores.data());
  }
  for (int64_t r = 0; r < rep; ++r) {
#if defined(__AVX512F__)
    softmax_avx512(scores.data() + r * n, n, scale, out.top + r, out.total + r);
#elif defined(VB_ATTN_AVX2)
    softmax_avx2(scores.data() + r * n, n, scale, out.top + r, out.total + r);
#else
    softmax_generic(scores.data() + r * n, n, scale, out.top + r, out.total + r);
#endif
  }
#if defined(__AVX512F__) || defined(VB_ATTN_AVX2)
  if (D % AttnVec::W == 0) return values_vec<T>(scores.data(), vb, v_row_stride, slots, n, rep, D, out.acc);
#endif
  values_generic<T>(scores.data(), vb, v_row_stride, slots, n, rep, D, out.acc);
}

// 1 / (a head's sum of exp): 0 for a head with no slot (its output is 0), NaN for a NaN sum (a NaN score: SDPA's
// NaN, which `total > 0 ? 1 / total : 0` turned into 0).
inline float inverse_total(float total) { return total == 0.0f ? 0.0f : 1.0f / total; }

template <typename T>
void decode_attention_rows(const T* q, const T* k, const T* v, const bool* valid, T* out, int64_t B, int64_t H,
                           int64_t Hkv, int64_t L, int64_t D, const int64_t* qs, const int64_t* ks, const int64_t* vs,
                           const int64_t* os, int64_t valid_stride) {
  const int64_t rep = H / Hkv;
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  // Every row's valid slots, once.
  std::vector<int64_t> slots, start(B + 1, 0);
  slots.reserve(B * L);
  int64_t longest = 0;
  for (int64_t b = 0; b < B; ++b) {
    const bool* row_valid = valid + b * valid_stride;
    for (int64_t l = 0; l < L; ++l)
      if (row_valid[l]) slots.push_back(l);
    start[b + 1] = static_cast<int64_t>(slots.size());
    longest = std::max(longest, start[b + 1] - start[b]);
  }
  // Parts per row: 1 when the (b, g) pairs already keep every thread busy, else enough that the tasks split
  // evenly over the threads (batch 1 of SmolLM2: 3 kv heads on 2 threads -> 2 parts each), each >= 64 slots.
  const int64_t threads = at::get_num_threads(), pairs = B * Hkv;
  int64_t parts = 1;
  if (threads > 1 && pairs < 4 * threads) {
    while ((pairs * parts) % threads != 0 && parts < threads) ++parts;
    while (pairs * parts < 2 * threads) parts *= 2;
    parts = std::max<int64_t>(1, std::min(parts, longest / 64));
  }
  std::vector<float> partials;
  if (parts > 1) partials.resize(pairs * parts * rep * (D + 2));
  at::parallel_for(0, pairs * parts, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> qf, scores, own(rep * (D + 2));
    std::vector<c10::BFloat16> qh;
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t pair = t / parts, s = t % parts, b = pair / Hkv, g = pair % Hkv;
      const int64_t n_row = start[b + 1] - start[b];
      const int64_t lo = n_row * s / parts, hi = n_row * (s + 1) / parts;
      float* base = parts > 1 ? partials.data() + t * rep * (D + 2) : own.data();
      const Partial part{base, base + rep, base + 2 * rep};
      attend_part<T>(q + b * qs[0] + g * rep * qs[1], qs[1], qs[3], k + b * ks[0] + g * ks[1],
                     v + b * vs[0] + g * vs[1], ks[2], vs[2], slots.data() + start[b] + lo, hi - lo, rep, D, scale,
                     qf, qh, scores, part);
      if (parts == 1) {
        for (int64_t r = 0; r < rep; ++r) {
          const float inv = inverse_total(part.total[r]);
          T* orow = out + b * os[0] + (g * rep + r) * os[1];
          for (int64_t d = 0; d < D; ++d) orow[d * os[3]] = static_cast<T>(part.acc[r * D + d] * inv);
        }
      }
    }
  });
  if (parts == 1) return;
  // Merge the parts of each (b, g, head): rescale each part's sums to the common max.
  for (int64_t pair = 0; pair < pairs; ++pair) {
    const int64_t b = pair / Hkv, g = pair % Hkv;
    for (int64_t r = 0; r < rep; ++r) {
      float top = -INFINITY;
      for (int64_t s = 0; s < parts; ++s) top = std::max(top, partials[(pair * parts + s) * rep * (D + 2) + r]);
      std::vector<float> merged(D, 0.0f);
      float total = 0.0f;
      for (int64_t s = 0; s < parts; ++s) {
        const float* base = partials.data() + (pair * parts + s) * rep * (D + 2);
        if (base[rep + r] == 0.0f) continue;  // a part with no slot
        const float w = std::exp(base[r] - top);
        total += w * base[rep + r];
        for (int64_t d = 0; d < D; ++d) merged[d] += w * base[2 * rep + r * D + d];
      }
      const float inv = inverse_total(total);
      T* orow = out + b * os[0] + (g * rep + r) * os[1];
      for (int64_t d = 0; d < D; ++d) orow[d * os[3]] = static_cast<T>(merged[d] * inv);
    }
  }
}

at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const at::Tensor& key_valid) {
  TORCH_CHECK(q.dim() == 4 && q.size(2) == 1, "decode_attention: q must be [B, H, 1, D], got ", q.sizes());
  TORCH_CHECK(k.dim() == 4 && v.sizes() == k.sizes(), "decode_attention: k and v must be the same [B, Hkv, L, D]");
  TORCH_CHECK(k.size(1) > 0, "decode_attention: the cache ", k.sizes(), " has no kv heads");
  TORCH_CHECK(k.size(0) == q.size(0) && k.size(3) == q.size(3) && q.size(1) % k.size(1) == 0,
              "decode_attention: q ", q.sizes(), " does not fit the cache ", k.sizes());
  TORCH_CHECK(key_valid.scalar_type() == at::kBool && key_valid.dim() == 2 && key_valid.size(0) == q.size(0) &&
                  key_valid.size(1) == k.size(2),
              "decode_attention: key_valid must be bool [B, L], got ", key_valid.sizes());
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && k.scalar_type() == v.scalar_type(),
              "decode_attention: q, k, v dtypes differ");
  TORCH_CHECK(k.stride(3) == 1 && v.stride(3) == 1, "decode_attention: the cache's last dimension must be dense");
  at::Tensor valid = key_valid.stride(1) == 1 ? key_valid : key_valid.contiguous();
  at::Tensor out = at::empty_like(q, at::MemoryFormat::Contiguous);
  if (out.numel() == 0) return out;  // no row, head or element: nothing to read (and no D to scale by)
  const int64_t qs[4] = {q.stride(0), q.stride(1), q.stride(2), q.stride(3)};
  const int64_t ks[4] = {k.stride(0), k.stride(1), k.stride(2), k.stride(3)};
  const int64_t vs[4] = {v.stride(0), v.stride(1), v.stride(2), v.stride(3)};
  const int64_t os[4] = {out.stride(0), out.stride(1), out.stride(2), out.stride(3)};
  const int64_t B = q.size(0), H = q.size(1), Hkv = k.size(1), L = k.size(2), D = q.size(3);
  if (q.scalar_type() == at::kFloat) {
    decode_attention_rows<float>(q.data_ptr<float>(), k.data_ptr<float>(), v.data_ptr<float>(),
                                 valid.data_ptr<bool>(), out.data_ptr<float>(), B, H, Hkv, L, D, qs, ks, vs, os,
                                 valid.stride(0));
  } else if (q.scalar_type() == at::kBFloat16) {
    decode_attention_rows<c10::BFloat16>(q.data_ptr<c10::BFloat16>(), k.data_ptr<c10::BFloat16>(),
                                         v.data_ptr<c10::BFloat16>(), valid.data_ptr<bool>(),
                                         out.data_ptr<c10::BFloat16>(), B, H, Hkv, L, D, qs, ks, vs, os,
                                         valid.stride(0));
  } else {
    TORCH_CHECK(false, "decode_attention: fp32 or bf16 only, got ", q.scalar_type());
  }
  return out;
}

// Which code paths this build has, for the log line and the environment record.
std::string small_m_isa() {
  std::string f32, bf16;
#if defined(__AVX512F__)
  f32 = "avx512f";
#elif defined(__AVX2__) && defined(__FMA__)
  f32 = "avx2";
#else
  f32 = "generic";
#endif
#if defined(__AVX512BF16__) && defined(__AVX512BW__)
  bf16 = "avx512_bf16";
#elif defined(__AVX512F__)
  bf16 = "avx512f (widened)";
#elif defined(__AVX2__) && defined(__FMA__)
  bf16 = "avx2 (widened)";
#else
  bf16 = "generic (widened)";
#endif
  return "fp32 " + f32 + ", bf16 " + bf16;
}

// The cores' peak rate of fp32 fused multiply-adds at this build's vector width, GFLOP/s: every thread of
// at::parallel_for runs `iterations` rounds of 12 independent FMA chains (enough to cover the FMA latency of the
// cores we build for: 4-5 cycles, 2 units), with nothing read from memory.  The ceiling a product's GFLOP/s is
// compared with (benchmarks/bench_gemm.py); not used by the engine.
#if defined(__AVX512F__)
using PeakVec = __m512;
inline PeakVec peak_set(float v) { return _mm512_set1_ps(v); }
inline PeakVec peak_fma(PeakVec a, PeakVec b, PeakVec c) { return _mm512_fmadd_ps(a, b, c); }
inline float peak_first(PeakVec v) { return _mm512_cvtss_f32(v); }
#elif defined(__AVX2__) && defined(__FMA__)
using PeakVec = __m256;
inline PeakVec peak_set(float v) { return _mm256_set1_ps(v); }
inline PeakVec peak_fma(PeakVec a, PeakVec b, PeakVec c) { return _mm256_fmadd_ps(a, b, c); }
inline float peak_first(PeakVec v) { return _mm256_cvtss_f32(v); }
#else
// Elsewhere (aarch64: NEON's 128-bit FMLA) gcc's vector extension: C++ contracts a * b + c into one FMA
// (-ffp-contract=fast is g++'s default).
typedef float PeakVec __attribute__((vector_size(16)));
inline PeakVec peak_set(float v) { return PeakVec{v, v, v, v}; }
inline PeakVec peak_fma(PeakVec a, PeakVec b, PeakVec c) { return a * b + c; }
inline float peak_first(PeakVec v) { return v[0]; }
#endif

// One thread's chains, out of line with twelve named accumulators: written as an array inside the parallel lambda,
// gcc kept them on the stack in the OpenMP-outlined copy (a store and reload per FMA: a third of the rate).
__attribute__((noinline)) float fma_chains(int64_t iterations) {
  const PeakVec x = peak_set(1.0000001f), y = peak_set(1e-7f);
  PeakVec a0 = peak_set(0), a1 = peak_set(1), a2 = peak_set(2), a3 = peak_set(3), a4 = peak_set(4), a5 = peak_set(5),
          a6 = peak_set(6), a7 = peak_set(7), a8 = peak_set(8), a9 = peak_set(9), a10 = peak_set(10),
          a11 = peak_set(11);
  for (int64_t i = 0; i < iterations; ++i) {
    a0 = peak_fma(a0, x, y); a1 = peak_fma(a1, x, y); a2 = peak_fma(a2, x, y); a3 = peak_fma(a3, x, y);
    a4 = peak_fma(a4, x, y); a5 = peak_fma(a5, x, y); a6 = peak_fma(a6, x, y); a7 = peak_fma(a7, x, y);
    a8 = peak_fma(a8, x, y); a9 = peak_fma(a9, x, y); a10 = peak_fma(a10, x, y); a11 = peak_fma(a11, x, y);
#if defined(__x86_64__) || defined(__i386__)
    // Each FMA kept (the chains cannot be folded across iterations) and every accumulator in a register.
    asm volatile("" : "+v"(a0), "+v"(a1), "+v"(a2), "+v"(a3), "+v"(a4), "+v"(a5), "+v"(a6), "+v"(a7), "+v"(a8),
                 "+v"(a9), "+v"(a10), "+v"(a11));
#else
    asm volatile("" : "+w"(a0), "+w"(a1), "+w"(a2), "+w"(a3), "+w"(a4), "+w"(a5), "+w"(a6), "+w"(a7), "+w"(a8),
                 "+w"(a9), "+w"(a10), "+w"(a11));
#endif
  }
  return peak_first(a0) + peak_first(a1) + peak_first(a2) + peak_first(a3) + peak_first(a4) + peak_first(a5) +
         peak_first(a6) + peak_first(a7) + peak_first(a8) + peak_first(a9) + peak_first(a10) + peak_first(a11);
}

double small_m_fma_rate(int64_t iterations) {
  TORCH_CHECK(iterations > 0, "small_m_fma_rate: iterations must be positive, got ", iterations);
  constexpr int kChains = 12;
  const int threads = at::get_num_threads();
  std::vector<float> sink(threads, 0.0f);
  const auto started = std::chrono::steady_clock::now();
  at::parallel_for(0, threads, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) sink[t] = fma_chains(iterations);
  });
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count();
  volatile float keep = 0.0f;
  for (float v : sink) keep = keep + v;  // the chains' results are used
  (void)keep;
  const double flops = 2.0 * kChains * (sizeof(PeakVec) / sizeof(float)) * static_cast<double>(iterations) * threads;
  return flops / seconds / 1e9;
}

}  // namespace

TORCH_LIBRARY(vicuna_bench, m) {
  m.def("small_m_linear(Tensor x, Tensor weight) -> Tensor");
  m.def("decode_attention(Tensor q, Tensor k, Tensor v, Tensor key_valid) -> Tensor");
  m.def("small_m_isa() -> str", &small_m_isa);  // no tensor argument: a catch-all kernel
  m.def("small_m_amx() -> str", &small_m_amx);
  m.def("small_m_set_amx_rows(int lo, int hi) -> bool", &small_m_set_amx_rows);
  m.def("small_m_set_bf16_fp32_gemm(bool on) -> bool", &small_m_set_bf16_fp32_gemm);
  m.def("small_m_set_amx_gemm(int hi) -> bool", &small_m_set_amx_gemm);
  m.def("small_m_fma_rate(int iterations) -> float", &small_m_fma_rate);
}

TORCH_LIBRARY_IMPL(vicuna_bench, CPU, m) {
  m.impl("small_m_linear", &small_m_linear);
  m.impl("decode_attention", &decode_attention);
}

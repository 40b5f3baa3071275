// A CPU emulation of the parts of the CUDA execution model the stripe kernels use, so that the
// unmodified kernels (kernels.cuh) and launchers (ops.h) run in tests on machines without a GPU.
//
// * Every CUDA thread of a block is an OS thread; blocks run one after another. __syncthreads is
//   a real barrier, so missing or divergent barriers show up (a barrier that is not reached by
//   every thread within kBarrierTimeout aborts with a message instead of hanging).
// * Dynamic shared memory is one buffer per launch, filled with 0xFF bytes (NaN as floats)
//   before every block, so a kernel that reads shared memory it did not write gets NaNs.
// * wmma is emulated collectively: every lane holds the whole 16x16 tile, loads and computes it,
//   and lane 0 stores it. The pointer alignment (32 bytes) and leading-dimension rules of the
//   CUDA documentation are checked on every load and store.
// * __half and __nv_bfloat16 are 16-bit storage types with round-to-nearest-even conversions.
// * Asynchronous copies (async_copy_16 / _commit / _wait, cp.async on the device) land in shared
//   memory only when a wait retires their group, the latest moment the hardware allows, so a
//   kernel that reads a buffer before waiting for it reads stale or poisoned bytes. Destinations
//   must lie in shared memory and both addresses be 16-byte aligned.
//
// It checks the kernels' logic (indexing, borders, barriers, tiling, shared-memory use); it says
// nothing about their speed.
#pragma once

#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <mutex>
#include <thread>
#include <type_traits>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)

namespace stripeconv_emu {

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

inline thread_local dim3 tl_thread_idx, tl_block_idx;
inline dim3 g_block_dim, g_grid_dim;
inline unsigned char* g_shared = nullptr;
inline size_t g_shared_bytes = 0;

// This thread's asynchronous copies: those not yet committed, and the committed groups in order.
struct AsyncCopy {
  unsigned char* dst;
  const unsigned char* src;  // nullptr: zero fill
};
inline thread_local std::vector<AsyncCopy> tl_uncommitted;
inline thread_local std::deque<std::vector<AsyncCopy>> tl_in_flight;

// A reusable barrier for the threads of one block, with a timeout that reports a deadlock.
class BlockBarrier {
 public:
  explicit BlockBarrier(int count) : count_(count) {}
  // Returns whether every thread passed a true `predicate` (__syncthreads_and). The result of a
  // generation cannot be overwritten before this thread has read it: the next generation needs
  // this thread to arrive.
  bool wait(bool predicate = true) {
    std::unique_lock<std::mutex> lock(mutex_);
    const long generation = generation_;
    all_ = all_ && predicate;
    if (++arrived_ == count_) {
      arrived_ = 0;
      result_ = all_;
      all_ = true;
      ++generation_;
      cv_.notify_all();
      return result_;
    }
    if (!cv_.wait_for(lock, std::chrono::seconds(60), [&] { return generation_ != generation; })) {
      std::fprintf(stderr, "stripeconv CUDA emulation: __syncthreads not reached by every thread of block "
                           "(%u, %u, %u) within 60 s (divergent barrier?)\n",
                   tl_block_idx.x, tl_block_idx.y, tl_block_idx.z);
      std::abort();
    }
    return result_;
  }

 private:
  std::mutex mutex_;
  std::condition_variable cv_;
  int count_, arrived_ = 0;
  long generation_ = 0;
  bool all_ = true, result_ = true;
};

inline BlockBarrier* g_barrier = nullptr;

inline unsigned lane_id() {
  const unsigned linear = tl_thread_idx.x + g_block_dim.x * (tl_thread_idx.y + g_block_dim.y * tl_thread_idx.z);
  return linear % 32;
}

// Runs kernel(args...) over the grid. Blocks run in order; the block's threads run concurrently.
template <typename... Params, typename... Args>
void run_grid(void (*kernel)(Params...), dim3 grid, dim3 block, size_t shared_bytes, Args... args) {
  const int nthreads = static_cast<int>(block.x * block.y * block.z);
  std::vector<unsigned char> shared(shared_bytes + 128);
  unsigned char* base = shared.data() + (128 - reinterpret_cast<uintptr_t>(shared.data()) % 128) % 128;
  BlockBarrier barrier(nthreads);
  g_block_dim = block;
  g_grid_dim = grid;
  g_shared = base;
  g_shared_bytes = shared_bytes;
  g_barrier = &barrier;
  const size_t nblocks = size_t(grid.x) * grid.y * grid.z;
  std::vector<std::thread> threads;
  threads.reserve(nthreads);
  for (int t = 0; t < nthreads; ++t) {
    threads.emplace_back([&, t] {
      tl_thread_idx = dim3(t % block.x, (t / block.x) % block.y, t / (block.x * block.y));
      for (size_t b = 0; b < nblocks; ++b) {
        if (t == 0) std::memset(base, 0xFF, shared_bytes);  // poison: unwritten reads give NaN
        barrier.wait();
        tl_block_idx = dim3(b % grid.x, (b / grid.x) % grid.y, b / (size_t(grid.x) * grid.y));
        tl_uncommitted.clear();  // copies a block never waited for do not reach the next one
        tl_in_flight.clear();
        kernel(args...);
        barrier.wait();  // the block is done before the next one reuses shared memory
      }
    });
  }
  for (auto& thread : threads) thread.join();
  g_barrier = nullptr;
}

}  // namespace stripeconv_emu

using stripeconv_emu::dim3;
#define threadIdx (stripeconv_emu::tl_thread_idx)
#define blockIdx (stripeconv_emu::tl_block_idx)
#define blockDim (stripeconv_emu::g_block_dim)
#define gridDim (stripeconv_emu::g_grid_dim)

inline void __syncthreads() { stripeconv_emu::g_barrier->wait(); }

// A kernel's own invariant, checked in the emulation only (kernels.cuh makes it a no-op on GPUs).
#define STRIPECONV_EMU_CHECK(condition, what)                                   \
  do {                                                                          \
    if (!(condition)) {                                                         \
      std::fprintf(stderr, "stripeconv CUDA emulation: %s\n", what);            \
      std::abort();                                                             \
    }                                                                           \
  } while (0)
inline int __syncthreads_and(int predicate) { return stripeconv_emu::g_barrier->wait(predicate != 0); }

// ------------------------------------------------------------------------------ async copies
template <bool kCacheL1>
void async_copy_16(void* dst, const void* src, bool valid) {
  using namespace stripeconv_emu;
  auto* d = static_cast<unsigned char*>(dst);
  if (d < g_shared || d + 16 > g_shared + g_shared_bytes || reinterpret_cast<uintptr_t>(d) % 16 != 0 ||
      (valid && reinterpret_cast<uintptr_t>(src) % 16 != 0)) {
    std::fprintf(stderr, "stripeconv CUDA emulation: async_copy_16 needs a 16-byte aligned shared destination and "
                         "global source, got %p <- %p\n", dst, src);
    std::abort();
  }
  tl_uncommitted.push_back({d, valid ? static_cast<const unsigned char*>(src) : nullptr});
}

inline void async_copy_commit() {
  stripeconv_emu::tl_in_flight.push_back(std::move(stripeconv_emu::tl_uncommitted));
  stripeconv_emu::tl_uncommitted.clear();
}

template <int kPending>
void async_copy_wait() {
  auto& groups = stripeconv_emu::tl_in_flight;
  while (groups.size() > size_t(kPending)) {
    for (const auto& copy : groups.front()) {
      if (copy.src != nullptr)
        std::memcpy(copy.dst, copy.src, 16);
      else
        std::memset(copy.dst, 0, 16);
    }
    groups.pop_front();
  }
}

// ---------------------------------------------------------------------------------- 16-bit types
struct __half {
  uint16_t bits;
};
struct __nv_bfloat16 {
  uint16_t bits;
};

inline float stripeconv_emu_bits_to_float(uint32_t bits) {
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}
inline uint32_t stripeconv_emu_float_to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

inline float __bfloat162float(__nv_bfloat16 h) { return stripeconv_emu_bits_to_float(uint32_t(h.bits) << 16); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  uint32_t u = stripeconv_emu_float_to_bits(f);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return __nv_bfloat16{uint16_t((u >> 16) | 0x40)};  // NaN stays NaN
  u += 0x7FFFu + ((u >> 16) & 1u);
  return __nv_bfloat16{uint16_t(u >> 16)};
}

inline float __half2float(__half h) {
  const uint32_t sign = uint32_t(h.bits & 0x8000u) << 16, exp = (h.bits >> 10) & 0x1Fu, man = h.bits & 0x3FFu;
  if (exp == 0x1F) return stripeconv_emu_bits_to_float(sign | 0x7F800000u | (man << 13));
  if (exp == 0) {  // subnormal or zero: man * 2^-24
    const float v = float(man) * 5.9604644775390625e-8f;
    return sign ? -v : v;
  }
  return stripeconv_emu_bits_to_float(sign | ((exp + 112u) << 23) | (man << 13));
}
inline __half __float2half_rn(float f) {
  const uint32_t u = stripeconv_emu_float_to_bits(f), sign = (u >> 16) & 0x8000u;
  const uint32_t absu = u & 0x7FFFFFFFu;
  if (absu > 0x7F800000u) return __half{uint16_t(sign | 0x7E00u)};
  if (absu >= 0x477FF000u) return __half{uint16_t(sign | 0x7C00u)};  // rounds to infinity
  if (absu < 0x38800000u) {                                           // subnormal half: round(|f| * 2^24)
    const float scaled = stripeconv_emu_bits_to_float(absu) * 16777216.0f;
    const float r = std::nearbyint(scaled);  // default rounding mode: to nearest even
    return __half{uint16_t(sign | uint32_t(r))};
  }
  uint32_t v = absu - (112u << 23);
  v += 0xFFFu + ((v >> 13) & 1u);
  return __half{uint16_t(sign | (v >> 13))};
}

// ---------------------------------------------------------------------------------------- wmma
namespace nvcuda {
namespace wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  static constexpr int rows = std::is_same<Use, matrix_b>::value ? K : M;
  static constexpr int cols = std::is_same<Use, matrix_a>::value ? K : N;
  static constexpr int num_elements = rows * cols / 32;  // a lane's share (accumulators)
  float v[rows * cols];  // the whole tile, row-major
};

inline void check_pointer(const void* p, unsigned ldm, unsigned multiple, const char* what) {
  if (reinterpret_cast<uintptr_t>(p) % 32 != 0) {
    std::fprintf(stderr, "stripeconv CUDA emulation: wmma %s pointer %p is not 256-bit aligned\n", what, p);
    std::abort();
  }
  if (ldm % multiple != 0) {
    std::fprintf(stderr, "stripeconv CUDA emulation: wmma %s ldm %u is not a multiple of %u\n", what, ldm, multiple);
    std::abort();
  }
}

inline float to_float(float x) { return x; }
inline float to_float(__half x) { return __half2float(x); }
inline float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename Use, int M, int N, int K, typename T, typename L>
void fill_fragment(fragment<Use, M, N, K, T, L>& f, float value) {
  for (float& x : f.v) x = value;
}

template <typename Use, int M, int N, int K, typename T, typename L, typename P>
void load_matrix_sync(fragment<Use, M, N, K, T, L>& f, const P* p, unsigned ldm) {
  check_pointer(p, ldm, 16 / sizeof(P), "load");
  using F = fragment<Use, M, N, K, T, L>;
  constexpr bool col = std::is_same<L, col_major>::value;
  for (int r = 0; r < F::rows; ++r)
    for (int c = 0; c < F::cols; ++c) f.v[r * F::cols + c] = to_float(col ? p[c * ldm + r] : p[r * ldm + c]);
}

template <int M, int N, int K>
void load_matrix_sync(fragment<accumulator, M, N, K, float>& f, const float* p, unsigned ldm, layout_t layout) {
  check_pointer(p, ldm, 4, "load");
  for (int r = 0; r < M; ++r)
    for (int c = 0; c < N; ++c) f.v[r * N + c] = layout == mem_col_major ? p[c * ldm + r] : p[r * ldm + c];
}

template <int M, int N, int K>
void store_matrix_sync(float* p, const fragment<accumulator, M, N, K, float>& f, unsigned ldm, layout_t layout) {
  check_pointer(p, ldm, 4, "store");
  if (stripeconv_emu::lane_id() != 0) return;  // one lane writes the tile the whole warp holds
  for (int r = 0; r < M; ++r)
    for (int c = 0; c < N; ++c) (layout == mem_col_major ? p[c * ldm + r] : p[r * ldm + c]) = f.v[r * N + c];
}

template <int M, int N, int K, typename T, typename LA, typename LB>
void mma_sync(fragment<accumulator, M, N, K, float>& d, const fragment<matrix_a, M, N, K, T, LA>& a,
              const fragment<matrix_b, M, N, K, T, LB>& b, const fragment<accumulator, M, N, K, float>& c) {
  float out[M * N];
  for (int r = 0; r < M; ++r)
    for (int col = 0; col < N; ++col) {
      float acc = c.v[r * N + col];
      for (int k = 0; k < K; ++k) acc += a.v[r * K + k] * b.v[k * N + col];
      out[r * N + col] = acc;
    }
  std::memcpy(d.v, out, sizeof(out));
}

}  // namespace wmma
}  // namespace nvcuda

// Element i of this lane's share of an accumulator: a lane-dependent scatter of the tile (unlike
// any hardware's), so that kernels must learn the layout rather than assume one.
template <int M, int N, int K>
float accumulator_element(const nvcuda::wmma::fragment<nvcuda::wmma::accumulator, M, N, K, float>& f, int i) {
  const int lane = int(stripeconv_emu::lane_id());
  return f.v[((i * 32 + (lane * 5 + i * 11) % 32) * 37) % (M * N)];
}

// CUDA kernels of stripe_conv2d. Pure CUDA: no torch headers (the launchers are in ops.h).
//
// Layouts: activations NHWC (channels_last), packed weight [S, Cg] with rows ordered by kernel
// position p = i * kw + j, then filter (stripeconv/packing.py). The mask-derived metadata is
// built on the device (build_rows_kernel), so no call reads the mask on the host:
//   prefix[p][f]   first packed row of position p whose filter is >= f   ([K, N + 1])
//   row_filter[r]  filter of packed row r                                ([S])
// The rows of position p and filters [f0, f1) are therefore the range [prefix[p][f0], prefix[p][f1]).
//
// Every kernel is a GEMM over shared-memory tiles, C[m][n] = sum_k A[m][k] * B[n][k], computed by
// 4 warps on a 64 x 64 tile (each warp 32 x 32, or 16 x 64 when at most 48 columns are valid):
// wmma tensor cores for fp16/bf16 (fp32 accumulation), CUDA-core FMAs for fp32 and fp64. A is
// held K-major; B K-major in the forward and MN-major in the backward kernels, whichever
// matches its rows in global memory. Every kernel
// runs its K steps as a software pipeline over two operand buffers (run_pipeline): the next
// step's tiles load while the current one multiplies, the contiguous operands of 16-bit types
// by 16-byte asynchronous copies (cp.async, zero-filled outside the input), the gathered ones
// and those of other types by element loads. The kernels differ in what they gather:
//
// forward (position-major, zero wasted stripes at any mask): a block owns 64 output pixels and a
//   block of nb filters whose fp32 outputs live in shared memory. For each position p it multiplies
//   the shifted input rows by the packed rows of p in chunks of 64 (only the filters that keep p,
//   so nothing is computed for pruned stripes; chunks are cut at 16-column granularity) and adds
//   each chunk's columns into the accumulator of the chunk's filters, straight from the warps'
//   registers; consecutive chunks of the same filters (dense and filter-pruned blocks) sum in
//   registers and are added once. Borders: masked loads.
// grad input (output-stationary over grad_input): a block owns 64 pixels of one stride phase and
//   64 input channels and reduces over the packed rows of the positions whose taps land on that
//   phase, gathering grad_output at the rows' filters. No work is spent on other phases.
// grad weight: a block owns 64 packed rows of one (position, group) and 64 channels and reduces
//   over a split of the output pixels into an fp32 workspace; reduce_splits_kernel sums the
//   splits in a fixed order (deterministic).
#pragma once

#ifndef STRIPECONV_CUDA_EMULATION
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>
#endif
#include <stdint.h>

#include <type_traits>

#ifndef STRIPECONV_EMU_CHECK
#define STRIPECONV_EMU_CHECK(condition, what) ((void)0)
#endif

namespace stripeconv_cuda {

constexpr int kThreads = 128;  // 4 warps: 2 x 2 warp blocks of 32 x 32, or 4 x 1 of 16 x 64 (WarpBlock)
constexpr int kTileM = 64;
constexpr int kTileN = 64;
constexpr int kTileK = 32;
constexpr int kStageLd = kTileN + 4;  // fp32 staging tile: a multiple of 4 (wmma), rows 32-byte aligned

// Geometry of one call; activations are NHWC, C and N count all groups.
struct ConvShape {
  int B, C, H, W;
  int N, Ho, Wo;
  int kh, kw, sh, sw, pt, pl, dh, dw;
  int groups, Cg, Ng;
  int S;  // packed rows
};

// ------------------------------------------------------------------------------ numeric types
template <typename T>
struct Num;
template <>
struct Num<float> {
  using Acc = float;
  static __device__ __forceinline__ float to_acc(float v) { return v; }
  static __device__ __forceinline__ float from_acc(float v) { return v; }
};
template <>
struct Num<double> {
  using Acc = double;
  static __device__ __forceinline__ double to_acc(double v) { return v; }
  static __device__ __forceinline__ double from_acc(double v) { return v; }
};
template <>
struct Num<__half> {
  using Acc = float;
  static __device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
  static __device__ __forceinline__ __half from_acc(float v) { return __float2half_rn(v); }
};
template <>
struct Num<__nv_bfloat16> {
  using Acc = float;
  static __device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }
  static __device__ __forceinline__ __nv_bfloat16 from_acc(float v) { return __float2bfloat16_rn(v); }
};

__host__ __device__ constexpr int64_t align_up(int64_t x, int64_t a) { return (x + a - 1) / a * a; }

// How an operand tile in shared memory holds its 64 x kTileK block: K-major, t[mn][k] (A, and B
// of the forward, whose rows are K-contiguous in global memory), or MN-major, t[k][mn] (B of the
// backward kernels, whose global rows run along N). 16-bit rows are padded by 8 elements, which
// keeps wmma's 32-byte and the asynchronous copies' 16-byte alignment and spreads the banks;
// 4- and 8-byte rows by one element.
enum class Major { kK, kMN };

template <typename T, Major kMajor>
struct OperandTile {
  static_assert(kTileM == kTileN, "A and B tiles share one shape");
  static constexpr int kLd = (kMajor == Major::kK ? kTileK : kTileN) + (sizeof(T) == 2 ? 8 : 1);
  static constexpr int64_t kBytes = align_up(int64_t(kMajor == Major::kK ? kTileN : kTileK) * kLd * sizeof(T), 128);
  // Offset of element (mn, k).
  static __host__ __device__ constexpr int at(int mn, int k) { return kMajor == Major::kK ? mn * kLd + k : k * kLd + mn; }
};

// 16-byte copies global -> shared that bypass registers (cp.async): only 16-bit operand tiles have
// 16-byte aligned rows (OperandTile), and the source must hold 8 aligned channels.
template <typename T>
__host__ __device__ constexpr bool async_copyable() {
  return sizeof(T) == 2;
}

#ifndef STRIPECONV_CUDA_EMULATION
// Copies 16 bytes from src to shared dst, or writes 16 zero bytes without reading src when !valid.
// kCacheL1: keep the line in L1 (operands that neighbouring steps read again).
template <bool kCacheL1>
__device__ __forceinline__ void async_copy_16(void* dst, const void* src, bool valid) {
#if __CUDA_ARCH__ >= 800
  const unsigned dst_shared = unsigned(__cvta_generic_to_shared(dst)), src_bytes = valid ? 16 : 0;
  if (kCacheL1)
    asm volatile("cp.async.ca.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst_shared), "l"(src), "r"(src_bytes));
  else
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst_shared), "l"(src), "r"(src_bytes));
#else
  *reinterpret_cast<uint4*>(dst) = valid ? *reinterpret_cast<const uint4*>(src) : make_uint4(0, 0, 0, 0);
#endif
}
// Closes the group of this thread's copies issued since the last commit.
__device__ __forceinline__ void async_copy_commit() {
#if __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::);
#endif
}
// Waits until at most kPending of this thread's committed groups are still in flight.
template <int kPending>
__device__ __forceinline__ void async_copy_wait() {
#if __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending));
#endif
}
#endif

#ifdef STRIPECONV_CUDA_EMULATION
__device__ __forceinline__ unsigned char* dynamic_smem() { return stripeconv_emu::g_shared; }
#else
__device__ __forceinline__ unsigned char* dynamic_smem() {
  extern __shared__ __align__(128) unsigned char smem[];
  return smem;
}
#endif

// The block of the 64 x 64 tile a warp computes: 32 rows from `row` and the 32 columns from col
// (2 x 2 warps), or, when the warp tile can split rows (Tile::kSplitsRows) and at most 48
// columns are valid, 16 rows and all columns (4 x 1 warps). On a tile of n valid columns the
// busiest warp then does ceil(n / 16) fragment products per 16-deep step instead of
// 2 * min(2, ceil(min(n, 32) / 16)): a chunk of few kept filters costs in proportion to them,
// and all four warps (and SM sub-partitions) work. Above 48 columns the 2 x 2 split does as
// many products with fewer fragment loads.
struct WarpBlock {
  int row, col, rows;
};
template <typename Tile>
__device__ __forceinline__ WarpBlock warp_block(int n_valid) {
  const int warp = threadIdx.x >> 5;
  if (Tile::kSplitsRows && n_valid <= 48) return {warp * 16, 0, 16};
  return {(warp >> 1) * 32, (warp & 1) * 32, 32};
}

// The shared-memory tiles every kernel multiplies: the fp32 (fp64) staging tile [64][kStageLd]
// the warps store their results to (kStaged; the forward adds its results from registers
// instead), and kBuffers pairs of operand tiles A (K-major) and B (kBMajor); two buffers when
// the next step's operands load while the current ones multiply (run_pipeline). 128-byte
// aligned regions.
template <typename T, int kBuffers, Major kBMajor, bool kStaged = true>
struct GemmTiles {
  using Acc = typename Num<T>::Acc;
  using ATile = OperandTile<T, Major::kK>;
  using BTile = OperandTile<T, kBMajor>;
  static constexpr int64_t kStageBytes = kStaged ? align_up(int64_t(kTileM) * kStageLd * sizeof(Acc), 128) : 0;
  static constexpr int64_t kBufferBytes = ATile::kBytes + BTile::kBytes;
  static constexpr int64_t kBytes = kStageBytes + kBuffers * kBufferBytes;

  Acc* stage;
  unsigned char* operands;
  unsigned char* end;  // the first byte after the tiles

  __device__ static GemmTiles carve(unsigned char* p) {
    return {reinterpret_cast<Acc*>(p), p + kStageBytes, p + kBytes};
  }
  __device__ T* a(int buffer) const { return reinterpret_cast<T*>(operands + buffer * kBufferBytes); }
  __device__ T* b(int buffer) const { return reinterpret_cast<T*>(operands + buffer * kBufferBytes + ATile::kBytes); }

  // After the block has loaded a K step into the buffer: each warp multiplies its block of the
  // tile (warp_block; the tile has n_valid valid columns), then the buffer is free for the next loads.
  template <typename Tile>
  __device__ void multiply(Tile& tile, int n_valid, int buffer) const {
    const WarpBlock wb = warp_block<Tile>(n_valid);
    __syncthreads();
    tile.template mma<kBMajor>(a(buffer) + ATile::at(wb.row, 0), b(buffer) + BTile::at(wb.col, 0), kTileK,
                               n_valid - wb.col, wb.rows);
    __syncthreads();
  }
  // Each warp's results into its block of the staging tile, visible to the whole block. n_valid:
  // as in the multiplications that produced them.
  template <typename Tile>
  __device__ void stage_results(const Tile& tile, int n_valid) const {
    static_assert(kStaged, "these tiles have no staging tile");
    const WarpBlock wb = warp_block<Tile>(n_valid);
    tile.store(stage + wb.row * kStageLd + wb.col, kStageLd, wb.rows);
    __syncthreads();
  }
  // Calls f(row, col, value) for each result of the tile in a column below n_valid, straight
  // from the registers of the warp that holds it (no staging tile, no barrier). n_valid: as in
  // the multiplications that produced them.
  template <typename Tile, typename F>
  __device__ void for_each_result(const Tile& tile, int n_valid, F&& f) const {
    const WarpBlock wb = warp_block<Tile>(n_valid);
    tile.for_each(wb.rows, n_valid - wb.col, [&](int row, int col, Acc v) { f(wb.row + row, wb.col + col, v); });
  }
};

// Runs a block's K steps through two operand buffers: while step i is computed from one buffer,
// the operands of step i + 1 load into the other (by asynchronous copies where load issues
// them). Steps: a copyable cursor with done() and next(). load(step, buffer) fills the buffer;
// compute(step, buffer) must begin with the barrier that publishes the buffer and end with one
// after its last read of it (GemmTiles::multiply does both).
template <typename Steps, typename Load, typename Compute>
__device__ void run_pipeline(Steps step, Load&& load, Compute&& compute) {
  Steps loading = step;
  if (!loading.done()) {
    load(loading, 0);
    loading.next();
  }
  async_copy_commit();
  for (int buffer = 0; !step.done(); step.next(), buffer ^= 1) {
    if (!loading.done()) {  // the other buffer was freed by the barrier ending the last compute
      load(loading, buffer ^ 1);
      loading.next();
    }
    async_copy_commit();
    async_copy_wait<1>();  // this thread's copies of `step` have landed; compute's barrier publishes them
    compute(step, buffer);
  }
}

// ------------------------------------------------------------------------- warp tile products
#ifndef STRIPECONV_CUDA_EMULATION
// Element i of this lane's part of a wmma accumulator (the emulation maps lanes its own way).
template <typename Fragment>
__device__ __forceinline__ float accumulator_element(const Fragment& f, int i) {
  return f.x[i];
}
#endif

// A warp's block of C += A * B^T over kdim (a multiple of 16), 32 x 32, or 16 x 64 when rows is
// 16 (WarpBlock): a and b point at the warp's block of a K-major A tile and of a kBMajor B tile
// (OperandTile). Columns at or beyond n_valid need not be computed. store() writes the same block.

// CUDA cores: each lane owns a 4 x 8 block (8 x 4 lanes).
template <typename T>
struct WarpTile {
  using Acc = typename Num<T>::Acc;
  static constexpr bool kSplitsRows = false;  // always 32 rows
  Acc c[4][8];

  __device__ void zero() {
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 8; ++j) c[i][j] = Acc(0);
  }
  template <Major kBMajor>
  __device__ void mma(const T* a, const T* b, int kdim, int n_valid, int /*rows: 32*/) {
    using A = OperandTile<T, Major::kK>;
    using B = OperandTile<T, kBMajor>;
    if (n_valid <= 0) return;
    const int lane = threadIdx.x & 31, r0 = (lane >> 2) * 4, c0 = (lane & 3) * 8;
    for (int k = 0; k < kdim; ++k) {
      Acc av[4], bv[8];
#pragma unroll
      for (int i = 0; i < 4; ++i) av[i] = Num<T>::to_acc(a[A::at(r0 + i, k)]);
#pragma unroll
      for (int j = 0; j < 8; ++j) bv[j] = Num<T>::to_acc(b[B::at(c0 + j, k)]);
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 8; ++j) c[i][j] += av[i] * bv[j];
    }
  }
  __device__ void learn_layout(const float*) {}  // the lanes' elements are known: see mma
  template <typename F>
  __device__ void for_each(int /*rows: 32*/, int n_valid, F&& f) const {
    const int lane = threadIdx.x & 31, r0 = (lane >> 2) * 4, c0 = (lane & 3) * 8;
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 8; ++j)
        if (c0 + j < n_valid) f(r0 + i, c0 + j, c[i][j]);
  }
  __device__ void store(Acc* out, int ldc, int /*rows: 32*/) const {
    const int lane = threadIdx.x & 31, r0 = (lane >> 2) * 4, c0 = (lane & 3) * 8;
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 8; ++j) out[(r0 + i) * ldc + c0 + j] = c[i][j];
  }
};

// Tensor cores: four wmma 16x16x16 fragments with fp32 accumulators, as a 32 x 32 block (2 x 2)
// or a 16 x 64 one (1 x 4, rows == 16). A K-major B tile is a col_major K x N matrix for wmma,
// an MN-major one row_major. The two shapes are separate code paths, so that every fragment
// index is a compile-time constant and the fragments stay in registers.
template <typename T>
struct WmmaWarpTile {
  using Acc = float;
  using AccFragment = nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float>;
  static constexpr bool kSplitsRows = true;
  static constexpr int kElements = AccFragment::num_elements;
  static_assert(kElements * 32 == 16 * 16, "each accumulator element is held by exactly one lane");
  static_assert(kElements % 4 == 0, "element indices pack four to a word");
  AccFragment c[4];
  uint32_t element_index[kElements / 4];  // row * 16 + col of x[i], one byte each

  // wmma leaves unspecified which element of a 16 x 16 accumulator a lane holds at x[i]; this
  // learns it from a fragment loaded from `indices`: 256 floats 0..255, row-major, 32-byte aligned.
  __device__ void learn_layout(const float* indices) {
    AccFragment f;
    nvcuda::wmma::load_matrix_sync(f, indices, 16, nvcuda::wmma::mem_row_major);
#pragma unroll
    for (int w = 0; w < kElements / 4; ++w) {
      element_index[w] = 0;
#pragma unroll
      for (int b = 0; b < 4; ++b) element_index[w] |= uint32_t(accumulator_element(f, w * 4 + b)) << (8 * b);
    }
  }
  // f(row, col, value) for this lane's elements of the warp's block (shape `rows`) in columns
  // below n_valid. learn_layout must have run.
  template <typename F>
  __device__ void for_each(int rows, int n_valid, F&& f) const {
    if (rows == 16)
      for_each_shape<1, 4>(n_valid, f);
    else
      for_each_shape<2, 2>(n_valid, f);
  }

  __device__ void zero() {
#pragma unroll
    for (int i = 0; i < 4; ++i) nvcuda::wmma::fill_fragment(c[i], 0.0f);
  }
  template <Major kBMajor>
  __device__ void mma(const T* a, const T* b, int kdim, int n_valid, int rows) {
    const int ncols = n_valid > 0 ? (n_valid + 15) / 16 : 0;
    if (rows == 16)
      mma_shape<kBMajor, 1, 4>(a, b, kdim, ncols);
    else
      mma_shape<kBMajor, 2, 2>(a, b, kdim, ncols);
  }
  __device__ void store(float* out, int ldc, int rows) const {
    if (rows == 16)
      store_shape<1, 4>(out, ldc);
    else
      store_shape<2, 2>(out, ldc);
  }

 private:
  // Fragment (i, j) of a kRows x kCols block is c[i * kCols + j]; columns from ncols on are skipped.
  template <Major kBMajor, int kRows, int kCols>
  __device__ void mma_shape(const T* a, const T* b, int kdim, int ncols) {
    using namespace nvcuda;
    using A = OperandTile<T, Major::kK>;
    using B = OperandTile<T, kBMajor>;
    using BLayout = typename std::conditional<kBMajor == Major::kK, wmma::col_major, wmma::row_major>::type;
    if (ncols <= 0) return;
    for (int k = 0; k < kdim; k += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa[kRows];
#pragma unroll
      for (int i = 0; i < kRows; ++i) wmma::load_matrix_sync(fa[i], a + A::at(i * 16, k), A::kLd);
#pragma unroll
      for (int j = 0; j < kCols; ++j) {
        if (j >= ncols) break;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, BLayout> fb;
        wmma::load_matrix_sync(fb, b + B::at(j * 16, k), B::kLd);
#pragma unroll
        for (int i = 0; i < kRows; ++i) wmma::mma_sync(c[i * kCols + j], fa[i], fb, c[i * kCols + j]);
      }
    }
  }
  template <int kRows, int kCols, typename F>
  __device__ void for_each_shape(int n_valid, F& f) const {
#pragma unroll
    for (int i = 0; i < kRows; ++i)
#pragma unroll
      for (int j = 0; j < kCols; ++j) {
        if (j * 16 >= n_valid) break;
#pragma unroll
        for (int e = 0; e < kElements; ++e) {
          const int index = (element_index[e / 4] >> (8 * (e % 4))) & 255, col = j * 16 + (index & 15);
          if (col < n_valid) f(i * 16 + (index >> 4), col, accumulator_element(c[i * kCols + j], e));
        }
      }
  }
  template <int kRows, int kCols>
  __device__ void store_shape(float* out, int ldc) const {
#pragma unroll
    for (int i = 0; i < kRows; ++i)
#pragma unroll
      for (int j = 0; j < kCols; ++j)
        nvcuda::wmma::store_matrix_sync(out + i * 16 * ldc + j * 16, c[i * kCols + j], ldc, nvcuda::wmma::mem_row_major);
  }
};

// fp16 wmma needs sm_70, bf16 sm_80; older devices use the CUDA-core tile.
template <typename T>
struct TileFor {
  using type = WarpTile<T>;
};
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 700
template <>
struct TileFor<__half> {
  using type = WmmaWarpTile<__half>;
};
#endif
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
template <>
struct TileFor<__nv_bfloat16> {
  using type = WmmaWarpTile<__nv_bfloat16>;
};
#endif

// ------------------------------------------------------------------------------- metadata
// One block: per position the kept filters in order (row_filter) and the prefix table.
// Rows beyond S (a mask that does not match the packed weight) are not written.
__global__ void build_rows_kernel(const unsigned char* __restrict__ mask, int N, int K, int S,
                                  int* __restrict__ prefix, int* __restrict__ row_filter) {
  int* position_start = reinterpret_cast<int*>(dynamic_smem());  // [K]
  for (int p = threadIdx.x; p < K; p += blockDim.x) {
    int count = 0;
    for (int f = 0; f < N; ++f) count += mask[int64_t(f) * K + p] != 0;
    position_start[p] = count;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    int total = 0;
    for (int p = 0; p < K; ++p) {
      const int count = position_start[p];
      position_start[p] = total;
      total += count;
    }
  }
  __syncthreads();
  for (int p = threadIdx.x; p < K; p += blockDim.x) {
    int r = position_start[p];
    int* row = prefix + int64_t(p) * (N + 1);
    for (int f = 0; f < N; ++f) {
      row[f] = r < S ? r : S;
      if (mask[int64_t(f) * K + p]) {
        if (r < S) row_filter[r] = f;
        ++r;
      }
    }
    row[N] = r < S ? r : S;
  }
}

// ---------------------------------------------------------------------------------- forward
// The forward's K steps in order. The kept rows of each position p among the block's filters
// [f_begin, f_end) are cut into chunks of <= kTileN rows; chunk slot q of p holds its rows
// [q * kTileN, (q + 1) * kTileN). The steps run slot by slot, and within a slot position by
// position, each chunk in kTileK-channel steps. Slot-major order puts the chunks that can hold
// the same filters next to each other: when the block's filters keep all their positions
// (dense, or filter-pruned masks), slot q of every position holds the same filters.
struct ForwardSteps {
  const int* prefix;
  int prefix_ld, f_begin, f_end, K, Cg;
  int q, p, r0, r_end, c0;
  bool finished;

  __device__ ForwardSteps(const int* prefix_, const ConvShape& s, int f_begin_, int f_end_)
      : prefix(prefix_), prefix_ld(s.N + 1), f_begin(f_begin_), f_end(f_end_), K(s.kh * s.kw), Cg(s.Cg), q(0),
        c0(0), finished(false) {
    seek(0);
  }
  __device__ bool done() const { return finished; }
  __device__ int rows() const { return r_end - r0 < kTileN ? r_end - r0 : kTileN; }
  __device__ bool chunk_begins() const { return c0 == 0; }
  __device__ bool chunk_ends() const { return c0 + kTileK >= Cg; }
  __device__ void next() {
    if ((c0 += kTileK) < Cg) return;
    c0 = 0;
    seek(p + 1);
  }

 private:
  // The first chunk at or after (slot q, position from): a position with more than q * kTileN rows.
  __device__ void seek(int from) {
    for (;; ++q, from = 0) {
      for (p = from; p < K; ++p) {
        const int begin = prefix[int64_t(p) * prefix_ld + f_begin], end = prefix[int64_t(p) * prefix_ld + f_end];
        if (end - begin > q * kTileN) {
          r0 = begin + q * kTileN;
          r_end = end;
          return;
        }
      }
      if (from == 0) {  // no position has slot q, so none has a later one
        finished = true;
        return;
      }
    }
  }
};

// Whether the chunk after `step` (which is at its chunk's last channel step) holds the same
// filters in the same order, so that its products can add into the same warp tiles. A barrier:
// every thread of the block must call it.
__device__ __forceinline__ bool next_chunk_has_same_filters(const ForwardSteps& step,
                                                            const int* __restrict__ row_filter) {
  static_assert(kThreads >= kTileN, "one thread per chunk row");
  ForwardSteps next = step;
  next.next();
  const int rows = step.rows();
  if (next.done() || next.rows() != rows) return false;  // uniform across the block
  const int j = threadIdx.x;
  return __syncthreads_and(j >= rows || row_filter[next.r0 + j] == row_filter[step.r0 + j]) != 0;
}

// Pixel rows of a forward block: batch index (-1 past the last pixel) and the top-left input
// coordinate of the pixel's receptive field.
struct PixelRows {
  const int* b;
  const int* h;
  const int* w;
};

// Loads one step's operands: a[m][k] = x at pixel m shifted to the step's position, channel
// c0 + k of group g (zero outside the input and past Cg); b[n][k] = packed row r0 + n (zero past
// the chunk). `vectorized`: 16-byte asynchronous copies (async_copyable T, Cg a multiple of 8,
// x and w 16-byte aligned); otherwise element loads through registers.
template <typename T>
__device__ void load_forward_step(const T* __restrict__ x, const T* __restrict__ w, const ConvShape& s, int g,
                                  const ForwardSteps& step, PixelRows px, T* a, T* b, bool vectorized) {
  using A = OperandTile<T, Major::kK>;
  using B = OperandTile<T, Major::kK>;
  const int tid = threadIdx.x, rows = step.rows(), c0 = step.c0;
  const int ih = (step.p / s.kw) * s.dh, iw = (step.p % s.kw) * s.dw;
  const T* xg = x + int64_t(g) * s.Cg;
  if (async_copyable<T>() && vectorized) {
    constexpr int kVec = 16 / sizeof(T), kVecsPerRow = kTileK / kVec;
    for (int v = tid; v < kTileM * kVecsPerRow; v += kThreads) {
      const int m = v / kVecsPerRow, k = (v % kVecsPerRow) * kVec, c = c0 + k;
      const int bi = px.b[m], h = px.h[m] + ih, wc = px.w[m] + iw;
      const bool inside = bi >= 0 && c < s.Cg && h >= 0 && h < s.H && wc >= 0 && wc < s.W;
      async_copy_16<true>(a + A::at(m, k), inside ? xg + ((int64_t(bi) * s.H + h) * s.W + wc) * s.C + c : x, inside);
    }
    for (int v = tid; v < kTileN * kVecsPerRow; v += kThreads) {
      const int n = v / kVecsPerRow, k = (v % kVecsPerRow) * kVec, c = c0 + k;
      const bool kept = n < rows && c < s.Cg;
      async_copy_16<false>(b + B::at(n, k), kept ? w + int64_t(step.r0 + n) * s.Cg + c : w, kept);
    }
    return;
  }
  const T zero = Num<T>::from_acc(typename Num<T>::Acc(0));
  for (int idx = tid; idx < kTileM * kTileK; idx += kThreads) {
    const int m = idx / kTileK, k = idx % kTileK, c = c0 + k;
    const int bi = px.b[m], h = px.h[m] + ih, wc = px.w[m] + iw;
    const bool inside = bi >= 0 && c < s.Cg && h >= 0 && h < s.H && wc >= 0 && wc < s.W;
    a[A::at(m, k)] = inside ? xg[((int64_t(bi) * s.H + h) * s.W + wc) * s.C + c] : zero;
  }
  for (int idx = tid; idx < kTileN * kTileK; idx += kThreads) {
    const int n = idx / kTileK, k = idx % kTileK, c = c0 + k;
    b[B::at(n, k)] = (n < rows && c < s.Cg) ? w[int64_t(step.r0 + n) * s.Cg + c] : zero;
  }
}

// The forward adds the warps' results into its accumulator from their registers: no staging tile.
template <typename T>
using ForwardTiles = GemmTiles<T, 2, Major::kK, false>;

// Shared memory: acc [64][nb], the GEMM tiles, pixel rows and chunk columns, and the 16 x 16
// index tile the warps learn their accumulator layout from.
template <typename T>
__host__ __device__ constexpr int64_t forward_smem_bytes(int nb) {
  using Acc = typename Num<T>::Acc;
  return align_up(int64_t(kTileM) * nb * sizeof(Acc), 128) + ForwardTiles<T>::kBytes +
         align_up((3 * kTileM + kTileN) * 4, 128) + 16 * 16 * 4;
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    forward_kernel(const T* __restrict__ x, const T* __restrict__ w, const T* __restrict__ bias,
                   const int* __restrict__ prefix, const int* __restrict__ row_filter, T* __restrict__ y,
                   ConvShape s, int nb, bool vectorized) {
  using Acc = typename Num<T>::Acc;
  unsigned char* smem = dynamic_smem();
  Acc* acc = reinterpret_cast<Acc*>(smem);
  const ForwardTiles<T> tiles = ForwardTiles<T>::carve(smem + align_up(int64_t(kTileM) * nb * sizeof(Acc), 128));
  int* row_b = reinterpret_cast<int*>(tiles.end);
  int* row_h = row_b + kTileM;
  int* row_w = row_h + kTileM;
  int* chunk_col = row_w + kTileM;  // accumulator column of each chunk row, -1 past the chunk
  // after the row arrays: the 16 x 16 tile of indices 0..255 (WmmaWarpTile::learn_layout)
  const int64_t row_bytes = align_up((3 * kTileM + kTileN) * 4, 128);
  float* indices = reinterpret_cast<float*>(reinterpret_cast<unsigned char*>(row_b) + row_bytes);
  const PixelRows px{row_b, row_h, row_w};

  const int tid = threadIdx.x;
  const int g = blockIdx.z, f0 = blockIdx.y * nb, fg0 = g * s.Ng + f0;
  const int fcount = s.Ng - f0 < nb ? s.Ng - f0 : nb;
  const int m0 = blockIdx.x * kTileM, M = s.B * s.Ho * s.Wo;

  for (int idx = tid; idx < kTileM * nb; idx += kThreads) acc[idx] = Acc(0);
  for (int m = tid; m < kTileM; m += kThreads) {
    const int pix = m0 + m;
    if (pix < M) {
      const int b = pix / (s.Ho * s.Wo), rem = pix % (s.Ho * s.Wo);
      row_b[m] = b;
      row_h[m] = (rem / s.Wo) * s.sh - s.pt;
      row_w[m] = (rem % s.Wo) * s.sw - s.pl;
    } else {
      row_b[m] = -1;
    }
  }
  for (int e = tid; e < 16 * 16; e += kThreads) indices[e] = float(e);
  __syncthreads();

  typename TileFor<T>::type tile;
  tile.learn_layout(indices);
  bool tile_added = true;  // the warp tiles hold no products that the accumulator lacks
  run_pipeline(
      ForwardSteps(prefix, s, fg0, fg0 + fcount),
      [&](const ForwardSteps& step, int buffer) {
        load_forward_step(x, w, s, g, step, px, tiles.a(buffer), tiles.b(buffer), vectorized);
      },
      [&](const ForwardSteps& step, int buffer) {
        if (step.chunk_begins() && tile_added) {  // chunk_col's last readers passed the barrier ending the last chunk
          tile.zero();
          for (int j = tid; j < kTileN; j += kThreads) chunk_col[j] = j < step.rows() ? row_filter[step.r0 + j] - fg0 : -1;
        }
        tiles.multiply(tile, step.rows(), buffer);
        if (step.chunk_ends()) {
          // Chunks of the same filters (slot q of the positions of a dense or filter-pruned
          // block) sum in the warp tiles: the accumulator is updated once for all of them.
          tile_added = !next_chunk_has_same_filters(step, row_filter);
          if (!tile_added) return;
          // Each (pixel, chunk row) is held by one lane, and each chunk row is a different
          // filter, so no two threads add into the same accumulator element.
          tiles.for_each_result(tile, step.rows(), [&](int m, int j, Acc v) {
            STRIPECONV_EMU_CHECK(j < step.rows() && chunk_col[j] >= 0, "forward: a result outside the chunk");
            acc[m * nb + chunk_col[j]] += v;
          });
          __syncthreads();  // the next chunk rewrites chunk_col and adds into acc
        }
      });

  for (int idx = tid; idx < kTileM * fcount; idx += kThreads) {
    const int m = idx / fcount, n = idx % fcount;
    if (row_b[m] < 0) continue;
    Acc v = acc[m * nb + n];
    if (bias != nullptr) v += Num<T>::to_acc(bias[fg0 + n]);
    y[int64_t(m0 + m) * s.N + fg0 + n] = Num<T>::from_acc(v);
  }
}

// ------------------------------------------------------------------------------- grad input
// The K steps of a grad input block of stride phase (a, cph) and group g: the positions whose
// taps land on the phase, and the chunks of <= kTileK packed rows each keeps in the group.
struct GradInputSteps {
  const int* prefix;
  int prefix_ld, f_begin, f_end, K, kw, dh, dw, sh, sw, top, left;
  int p, r0, r_end, oh, ow;  // the rows [r0, r_end) of p; grad_output offset (oh, ow) of the phase

  __device__ GradInputSteps(const int* prefix_, const ConvShape& s, int g, int a, int cph)
      : prefix(prefix_), prefix_ld(s.N + 1), f_begin(g * s.Ng), f_end((g + 1) * s.Ng), K(s.kh * s.kw), kw(s.kw),
        dh(s.dh), dw(s.dw), sh(s.sh), sw(s.sw), top(a + s.pt), left(cph + s.pl) {
    seek(0);
  }
  __device__ bool done() const { return p >= K; }
  __device__ void next() {
    if ((r0 += kTileK) < r_end) return;
    seek(p + 1);
  }

 private:
  __device__ void seek(int from) {
    for (p = from; p < K; ++p) {
      // Input row a + sh * r receives output row (a + pt - i * dh) / sh + r when that divides.
      const int th = top - (p / kw) * dh, tw = left - (p % kw) * dw;
      if (((th % sh) + sh) % sh != 0 || ((tw % sw) + sw) % sw != 0) continue;
      r0 = prefix[int64_t(p) * prefix_ld + f_begin];
      r_end = prefix[int64_t(p) * prefix_ld + f_end];
      if (r0 < r_end) {
        oh = th / sh, ow = tw / sw;
        return;
      }
    }
  }
};

template <typename T>
using BackwardTiles = GemmTiles<T, 2, Major::kMN>;

// Blocks per SM the backward kernels budget registers for: 16-bit blocks take about 37 KB of
// shared memory, so four fit (and ptxas, given that budget, does not spill to reach a lower count).
template <typename T>
__host__ __device__ constexpr int backward_blocks_per_sm() {
  return sizeof(T) == 2 ? 4 : 1;
}

template <typename T>
__host__ __device__ constexpr int64_t grad_input_smem_bytes() {
  return BackwardTiles<T>::kBytes + align_up(3 * kTileM * 4, 128);
}

// grid: (pixel tiles of the largest phase, channel tiles, groups * sh * sw). `vectorized`: the
// packed weight rows arrive by 16-byte asynchronous copies (16-bit, Cg a multiple of 8, aligned).
template <typename T>
__global__ void __launch_bounds__(kThreads, backward_blocks_per_sm<T>())
    grad_input_kernel(const T* __restrict__ dy, const T* __restrict__ w, const int* __restrict__ prefix,
                      const int* __restrict__ row_filter, T* __restrict__ dx, ConvShape s, bool vectorized) {
  using A = OperandTile<T, Major::kK>;
  using B = OperandTile<T, Major::kMN>;
  const int phases = s.sh * s.sw, phase = blockIdx.z % phases, g = blockIdx.z / phases;
  const int a = phase / s.sw, cph = phase % s.sw;
  const int hp = a < s.H ? (s.H - a + s.sh - 1) / s.sh : 0, wp = cph < s.W ? (s.W - cph + s.sw - 1) / s.sw : 0;
  const int m0 = blockIdx.x * kTileM;
  if (m0 >= s.B * hp * wp) return;  // uniform across the block: this phase has fewer pixels

  const BackwardTiles<T> tiles = BackwardTiles<T>::carve(dynamic_smem());
  int* row_b = reinterpret_cast<int*>(tiles.end);
  int* row_r = row_b + kTileM;
  int* row_q = row_r + kTileM;

  const int tid = threadIdx.x;
  const int c0 = blockIdx.y * kTileN, Mp = s.B * hp * wp;
  const T zero = Num<T>::from_acc(typename Num<T>::Acc(0));
  for (int m = tid; m < kTileM; m += kThreads) {
    const int pix = m0 + m;
    if (pix < Mp) {
      row_b[m] = pix / (hp * wp);
      row_r[m] = (pix % (hp * wp)) / wp;
      row_q[m] = pix % wp;
    } else {
      row_b[m] = -1;
    }
  }
  __syncthreads();

  typename TileFor<T>::type tile;
  tile.zero();
  run_pipeline(
      GradInputSteps(prefix, s, g, a, cph),
      [&](const GradInputSteps& step, int buffer) {
        // a[m][k] = grad_output at pixel m of the phase shifted by (oh, ow), filter of row r0 + k
        T* at = tiles.a(buffer);
        for (int idx = tid; idx < kTileM * kTileK; idx += kThreads) {
          const int m = idx / kTileK, k = idx % kTileK;
          const int b = row_b[m], ho = row_r[m] + step.oh, wo = row_q[m] + step.ow;
          const bool inside = b >= 0 && step.r0 + k < step.r_end && ho >= 0 && ho < s.Ho && wo >= 0 && wo < s.Wo;
          at[A::at(m, k)] = inside ? dy[((int64_t(b) * s.Ho + ho) * s.Wo + wo) * s.N + row_filter[step.r0 + k]] : zero;
        }
        // b[k][n] = packed row r0 + k, channel c0 + n
        T* bt = tiles.b(buffer);
        if (async_copyable<T>() && vectorized) {
          constexpr int kVec = 16 / sizeof(T), kVecsPerRow = kTileN / kVec;
          for (int v = tid; v < kTileK * kVecsPerRow; v += kThreads) {
            const int k = v / kVecsPerRow, n = (v % kVecsPerRow) * kVec;
            const bool kept = step.r0 + k < step.r_end && c0 + n < s.Cg;
            async_copy_16<false>(bt + B::at(n, k), kept ? w + int64_t(step.r0 + k) * s.Cg + c0 + n : w, kept);
          }
        } else {
          for (int idx = tid; idx < kTileK * kTileN; idx += kThreads) {
            const int k = idx / kTileN, n = idx % kTileN;
            bt[B::at(n, k)] = (step.r0 + k < step.r_end && c0 + n < s.Cg) ? w[int64_t(step.r0 + k) * s.Cg + c0 + n] : zero;
          }
        }
      },
      [&](const GradInputSteps&, int buffer) { tiles.multiply(tile, s.Cg - c0, buffer); });
  tiles.stage_results(tile, s.Cg - c0);
  const int ccount = s.Cg - c0 < kTileN ? s.Cg - c0 : kTileN;
  for (int idx = tid; idx < kTileM * ccount; idx += kThreads) {
    const int m = idx / ccount, n = idx % ccount;
    if (row_b[m] < 0) continue;
    const int hi = a + row_r[m] * s.sh, wi = cph + row_q[m] * s.sw;
    dx[((int64_t(row_b[m]) * s.H + hi) * s.W + wi) * s.C + int64_t(g) * s.Cg + c0 + n] =
        Num<T>::from_acc(tiles.stage[m * kStageLd + n]);
  }
}

// ------------------------------------------------------------------------------ grad weight
// The K steps of a grad weight block: kTileK output pixels at a time over its split.
struct PixelSteps {
  int k0, k_end;
  __device__ bool done() const { return k0 >= k_end; }
  __device__ void next() { k0 += kTileK; }
};

template <typename T>
__host__ __device__ constexpr int64_t grad_weight_smem_bytes() {
  return BackwardTiles<T>::kBytes;
}

// grid: (row tiles of the largest (position, group) range, K * groups, splits * channel tiles).
// workspace [splits, S, Cg] in the accumulation type. `vectorized`: the input pixels arrive by
// 16-byte asynchronous copies (16-bit, Cg a multiple of 8, aligned).
template <typename T>
__global__ void __launch_bounds__(kThreads, backward_blocks_per_sm<T>())
    grad_weight_kernel(const T* __restrict__ dy, const T* __restrict__ x, const int* __restrict__ prefix,
                       const int* __restrict__ row_filter, typename Num<T>::Acc* __restrict__ workspace,
                       ConvShape s, int splits, int pixels_per_split, bool vectorized) {
  using A = OperandTile<T, Major::kK>;
  using B = OperandTile<T, Major::kMN>;
  const int K = s.kh * s.kw, p = blockIdx.y % K, g = blockIdx.y / K;
  const int r_begin = prefix[int64_t(p) * (s.N + 1) + g * s.Ng], r_end = prefix[int64_t(p) * (s.N + 1) + (g + 1) * s.Ng];
  const int r0 = r_begin + blockIdx.x * kTileM;
  if (r0 >= r_end) return;  // uniform: this (position, group) keeps fewer rows

  const BackwardTiles<T> tiles = BackwardTiles<T>::carve(dynamic_smem());
  const int tid = threadIdx.x;
  const int split = blockIdx.z % splits, c0 = (blockIdx.z / splits) * kTileN;
  const int M = s.B * s.Ho * s.Wo, k_begin = split * pixels_per_split;
  const int k_end = M - k_begin < pixels_per_split ? M : k_begin + pixels_per_split;
  const int rows = r_end - r0 < kTileM ? r_end - r0 : kTileM;
  const int ih = (p / s.kw) * s.dh - s.pt, iw = (p % s.kw) * s.dw - s.pl;
  const T* xg = x + int64_t(g) * s.Cg;
  const T zero = Num<T>::from_acc(typename Num<T>::Acc(0));

  typename TileFor<T>::type tile;
  tile.zero();
  run_pipeline(
      PixelSteps{k_begin, k_end},
      [&](const PixelSteps& step, int buffer) {
        // a[m][k] = grad_output at pixel k0 + k, filter of row r0 + m
        T* at = tiles.a(buffer);
        for (int idx = tid; idx < kTileM * kTileK; idx += kThreads) {
          const int k = idx / kTileM, m = idx % kTileM, pix = step.k0 + k;
          at[A::at(m, k)] = (m < rows && pix < k_end) ? dy[int64_t(pix) * s.N + row_filter[r0 + m]] : zero;
        }
        // b[k][n] = input at pixel k0 + k shifted to position p, channel c0 + n (zero outside),
        // in 16-byte pieces (asynchronous copies) or single elements
        T* bt = tiles.b(buffer);
        const bool copies = async_copyable<T>() && vectorized;
        const int piece = copies ? 16 / int(sizeof(T)) : 1, pieces_per_row = kTileN / piece;
        for (int idx = tid; idx < kTileK * pieces_per_row; idx += kThreads) {
          const int k = idx / pieces_per_row, n = (idx % pieces_per_row) * piece;
          const int pix = step.k0 + k, c = c0 + n;
          bool inside = pix < k_end && c < s.Cg;
          int64_t offset = 0;
          if (inside) {
            const int b = pix / (s.Ho * s.Wo), rem = pix % (s.Ho * s.Wo);
            const int h = (rem / s.Wo) * s.sh + ih, wc = (rem % s.Wo) * s.sw + iw;
            inside = h >= 0 && h < s.H && wc >= 0 && wc < s.W;
            offset = ((int64_t(b) * s.H + h) * s.W + wc) * s.C + c;
          }
          if (copies)
            async_copy_16<true>(bt + B::at(n, k), inside ? xg + offset : x, inside);
          else
            bt[B::at(n, k)] = inside ? xg[offset] : zero;
        }
      },
      [&](const PixelSteps&, int buffer) { tiles.multiply(tile, s.Cg - c0, buffer); });
  tiles.stage_results(tile, s.Cg - c0);
  const int ccount = s.Cg - c0 < kTileN ? s.Cg - c0 : kTileN;
  for (int idx = tid; idx < rows * ccount; idx += kThreads) {
    const int m = idx / ccount, n = idx % ccount;
    workspace[(int64_t(split) * s.S + r0 + m) * s.Cg + c0 + n] = tiles.stage[m * kStageLd + n];
  }
}

// grad_weight[i] = sum over splits of workspace[split][i], in split order.
template <typename T>
__global__ void reduce_splits_kernel(const typename Num<T>::Acc* __restrict__ workspace, T* __restrict__ out,
                                     int64_t count, int splits) {
  using Acc = typename Num<T>::Acc;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < count; i += int64_t(gridDim.x) * blockDim.x) {
    Acc v = Acc(0);
    for (int sp = 0; sp < splits; ++sp) v += workspace[sp * count + i];
    out[i] = Num<T>::from_acc(v);
  }
}

}  // namespace stripeconv_cuda

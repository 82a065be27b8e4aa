// CUDA implementation of dho_fast::dual_head_loss and dho_fast::dual_head_loss_chunk (schemas: csrc/dho_fast.cpp).
//
// Three launches per call:
//   count_labels_kernel (one block): the number of labelled rows, which every row's weight needs before its
//     gradient can be written, and the first label that is neither ignore_index nor a class index;
//   a row kernel: each row's weighted CE and KL, its teacher status and both gradients. Rows of at most
//     32 * kLaneCols classes take one warp each and stay in registers from the statistics to the gradients (read
//     once, written once); wider rows take one block each and are read a second time for the gradients, mostly
//     from L2 (the block size keeps the rows in flight well inside L2);
//   reduce_rows_kernel (one block): the loss terms, summed in a fixed order (deterministic), and the first bad
//     teacher row.
// Loads and stores are 16-byte vectors wherever a row starts 16-byte aligned, scalar otherwise (same columns per
// thread). Statistics are float32 (float64 for float64 input); the per-row arithmetic is csrc/row_fold.h, which
// tests/cpp/test_row_fold.cpp runs on the CPU. Value errors are flagged on the device and raised after one
// device-to-host copy of four integers: each call synchronises its stream once.
//
// The teacher (row_math::TeacherForm): logits; probabilities p, read as the logits T log(p) and then folded as
// logits; or sparse, k probabilities per row at listed classes and u on every other class, never made dense: the
// fold then sees no teacher (its teacher logits are all -inf), the KL is row_math::sparse_kl_value of the student's
// statistic, and the gradient is written as q - u everywhere, then corrected at the listed classes.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <optional>
#include <tuple>
#include <type_traits>

#include "../op_checks.h"
#include "../row_fold.h"
#include "../saved_gradients.h"

namespace dho_fast {
namespace cuda {
namespace {

namespace rm = row_math;

template <typename scalar_t>
using acc_type = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

// Elements per 16-byte vector.
template <typename scalar_t>
constexpr int kVec = 16 / static_cast<int>(sizeof(scalar_t));

template <typename scalar_t>
struct alignas(16) Pack {
  scalar_t v[kVec<scalar_t>];
};

// Columns per lane in the warp-per-row kernel, held in registers for three tensors: rows of up to 1024 classes
// (ImageNet-1k) for 2- and 4-byte types; half as many for double, whose registers count twice.
template <typename scalar_t>
constexpr int kLaneCols = sizeof(scalar_t) == 8 ? 16 : 32;
// Block-per-row kernel: columns per thread and step (whole 16-byte vectors) and threads per block, so that a thread
// fits its registers without spilling (64 at 1024 threads; double needs more).
template <typename scalar_t>
constexpr int kStepCols = sizeof(scalar_t) == 8 ? 4 : 8;
template <typename scalar_t>
constexpr int kMaxRowThreads = sizeof(scalar_t) == 8 ? 512 : 1024;
constexpr int kWarpRowsPerBlock = 4;
constexpr int kReduceThreads = 512;

template <typename scalar_t>
struct RowsArgs {
  using acc_t = acc_type<scalar_t>;
  const scalar_t* ce;       // CE-head logits: row r's are row ce_row[r] of ce (ce_row == nullptr: row r)
  const int64_t* ce_row;    // -1: row r has none (it is unlabelled)
  int64_t ce_rows;          // rows of ce, to keep a bad ce_row in bounds until it is reported
  const scalar_t* kd;       // (rows, C)
  const scalar_t* teacher;  // (rows, C) logits or probabilities (teacher_form); nullptr for a sparse teacher
  const int64_t* labels;    // (rows,)
  // The gradients, in acc_t (float32 for half inputs: backward rounds them after scaling), laid out as ce and kd
  // (nullptr: not wanted); for float32 and float64 inputs they may be ce and kd themselves.
  acc_t* g_ce;
  acc_t* g_kd;
  acc_t* row_ce;            // (rows,) weighted CE, 0 for rows without a CE head
  acc_t* row_kl;            // (rows,) weighted KL
  int* status;              // (rows,) row_math::TeacherRowStatus
  const int64_t* num_labelled_dev;  // the batch's labelled rows as counted on the device; nullptr: num_labelled
  int64_t num_labelled;
  int64_t rows, cols, batch_rows, ignore_index;
  acc_t temperature, inv_t, eps;
  bool kd_split;
  const scalar_t* ce_bias = nullptr;  // (C,) added to every row of ce / kd (nullptr: none; chunk op only)
  const scalar_t* kd_bias = nullptr;
  acc_t ce_grad_scale = 1, kd_grad_scale = 1;  // factors of the gradients written
  int teacher_form = rm::kTeacherLogits;
  // A sparse teacher (sparse_probs != nullptr; teacher is then nullptr), row r of each for row r of kd: k
  // probabilities and their classes per row, and the row terms [u, neg_entropy] (dho_fast/ops/teacher.py).
  const acc_t* sparse_probs = nullptr;      // (rows, k)
  const int64_t* sparse_indices = nullptr;  // (rows, k)
  const acc_t* sparse_row_terms = nullptr;  // (rows, 2)
  int64_t teacher_k = 0;
};

// One row's pointers (nullptr: absent), whether each starts 16-byte aligned, its label, the label's CE-head logit
// (plus bias; 0 without a CE head) and weights.
template <typename scalar_t>
struct Row {
  const scalar_t *ce, *kd, *t;
  acc_type<scalar_t> *g_ce, *g_kd;
  bool ce_vec, kd_vec, t_vec, g_ce_vec, g_kd_vec;
  int64_t label;
  acc_type<scalar_t> target;
  rm::RowWeights<acc_type<scalar_t>> w, grad_w;  // weights of the row's loss values and of its gradients
  acc_type<scalar_t> u;  // a sparse teacher's probability of each unlisted class (0 for a dense teacher)
};

__device__ __forceinline__ bool aligned16(const void* p) {
  return (reinterpret_cast<uintptr_t>(p) & 15) == 0;
}

template <typename scalar_t>
__device__ __forceinline__ Row<scalar_t> row_of(const RowsArgs<scalar_t>& p, int64_t r) {
  using acc_t = acc_type<scalar_t>;
  const int64_t C = p.cols, label = p.labels[r];
  const int64_t ce_i = p.ce_row ? p.ce_row[r] : r;
  const bool labelled = label != p.ignore_index;
  // A bad label or CE row is reported after the kernel; until then it must not index memory.
  const bool do_ce = labelled && label >= 0 && label < C && ce_i >= 0 && ce_i < p.ce_rows;
  // Unlabelled rows get a zero CE-gradient row, except in the chunk op, where they have none.
  const bool g_ce_row = p.g_ce != nullptr && (p.ce_row == nullptr || do_ce);
  const int64_t n_lab = p.num_labelled_dev ? *p.num_labelled_dev : p.num_labelled;
  Row<scalar_t> row;
  row.ce = do_ce ? p.ce + ce_i * C : nullptr;
  row.kd = p.kd + r * C;
  row.t = p.teacher ? p.teacher + r * C : nullptr;
  row.g_ce = g_ce_row ? p.g_ce + ce_i * C : nullptr;
  row.g_kd = p.g_kd ? p.g_kd + r * C : nullptr;
  row.ce_vec = aligned16(row.ce);
  row.kd_vec = aligned16(row.kd);
  row.t_vec = aligned16(row.t);
  row.g_ce_vec = aligned16(row.g_ce);
  row.g_kd_vec = aligned16(row.g_kd);
  row.label = label;
  // Read by every thread before any gradient is written over the logits (chunk op), as load_cols would give it.
  const acc_t target_bias = do_ce && p.ce_bias ? static_cast<acc_t>(p.ce_bias[label]) : acc_t(0);
  row.target = do_ce ? static_cast<acc_t>(row.ce[label]) + target_bias : acc_t(0);
  row.w = rm::row_weights<acc_t>(labelled, n_lab, p.batch_rows, p.kd_split, p.temperature);
  row.grad_w = row.w;
  row.grad_w.ce *= p.ce_grad_scale;
  row.grad_w.kd *= p.kd_grad_scale;
  row.u = p.sparse_probs ? p.sparse_row_terms[2 * r] : acc_t(0);
  return row;
}

// Columns [col, col + E) of a row plus bias (nullptr: none), times `scale`, into out (E a multiple of the vector
// width); -inf past the end of the row, and everywhere for a row that is nullptr.
template <int E, typename scalar_t, typename acc_t>
__device__ __forceinline__ void load_cols(const scalar_t* row, const scalar_t* bias, bool vec, int64_t col,
                                          int64_t C, acc_t scale, acc_t* out) {
  auto plus_bias = [&](acc_t x, int64_t c) { return bias ? x + static_cast<acc_t>(bias[c]) : x; };
  constexpr int V = kVec<scalar_t>;
  static_assert(E % V == 0, "E must be whole vectors");
#pragma unroll
  for (int g = 0; g < E; g += V) {
    if (row != nullptr && vec && col + g + V <= C) {
      const Pack<scalar_t> pack = *reinterpret_cast<const Pack<scalar_t>*>(row + col + g);
#pragma unroll
      for (int j = 0; j < V; ++j) out[g + j] = plus_bias(static_cast<acc_t>(pack.v[j]), col + g + j) * scale;
    } else {
#pragma unroll
      for (int j = 0; j < V; ++j) {
        const bool inside = row != nullptr && col + g + j < C;
        out[g + j] = inside ? plus_bias(static_cast<acc_t>(row[col + g + j]), col + g + j) * scale
                            : rm::neg_inf<acc_t>();
      }
    }
  }
}

// Columns [col, col + E) of the row's teacher logits over T, as load_cols (all -inf for a sparse teacher, which has
// none): probabilities p are read as the logits T log(p) (p = 0: -inf, a masked class; p < 0 or NaN: NaN).
template <int E, typename scalar_t, typename acc_t>
__device__ __forceinline__ void load_teacher(const RowsArgs<scalar_t>& p, const Row<scalar_t>& row, int64_t col,
                                             acc_t* out) {
  if (p.teacher_form != rm::kTeacherProbs) {
    load_cols<E>(row.t, static_cast<const scalar_t*>(nullptr), row.t_vec, col, p.cols, p.inv_t, out);
    return;
  }
  load_cols<E>(row.t, static_cast<const scalar_t*>(nullptr), row.t_vec, col, p.cols, acc_t(1), out);
#pragma unroll
  for (int j = 0; j < E; ++j)
    if (col + j < p.cols) out[j] = p.temperature * std::log(out[j]) * p.inv_t;  // past the row: stays -inf
}

// Columns [col, col + E) of an output row of type scalar_t (E a multiple of its vector width) from v.
template <int E, typename scalar_t, typename acc_t>
__device__ __forceinline__ void store_cols(scalar_t* row, bool vec, int64_t col, int64_t C, const acc_t* v) {
  constexpr int V = kVec<scalar_t>;
#pragma unroll
  for (int g = 0; g < E; g += V) {
    if (vec && col + g + V <= C) {
      Pack<scalar_t> pack;
#pragma unroll
      for (int j = 0; j < V; ++j) pack.v[j] = static_cast<scalar_t>(v[g + j]);
      *reinterpret_cast<Pack<scalar_t>*>(row + col + g) = pack;
    } else {
#pragma unroll
      for (int j = 0; j < V; ++j)
        if (col + g + j < C) row[col + g + j] = static_cast<scalar_t>(v[g + j]);
    }
  }
}

template <typename T>
__device__ __forceinline__ rm::RowStat<T> shfl_xor(const rm::RowStat<T>& s, int mask) {
  constexpr unsigned kAll = 0xffffffffu;
  return {{__shfl_xor_sync(kAll, s.ce.max, mask), __shfl_xor_sync(kAll, s.ce.sum, mask)},
          {{__shfl_xor_sync(kAll, s.kl.teacher.max, mask), __shfl_xor_sync(kAll, s.kl.teacher.sum, mask)},
           {__shfl_xor_sync(kAll, s.kl.student.max, mask), __shfl_xor_sync(kAll, s.kl.student.sum, mask)},
           __shfl_xor_sync(kAll, s.kl.cross, mask)},
          __shfl_xor_sync(kAll, s.ce_sum, mask)};
}

// Butterfly: row_merge is commutative bit for bit, so every lane ends with the same statistic.
template <typename T>
__device__ __forceinline__ rm::RowStat<T> warp_merge(rm::RowStat<T> s) {
#pragma unroll
  for (int mask = 16; mask > 0; mask >>= 1) s = rm::row_merge(s, shfl_xor(s, mask));
  return s;
}

// The whole block's statistic, for every thread: warps merge, then warp 0 merges the warps' results.
template <typename T>
__device__ rm::RowStat<T> block_merge(rm::RowStat<T> s, rm::RowStat<T>* partial) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  s = warp_merge(s);
  if (lane == 0) partial[warp] = s;
  __syncthreads();
  if (warp == 0) {
    s = warp_merge(lane < blockDim.x / 32 ? partial[lane] : rm::row_empty<T>());
    if (lane == 0) partial[0] = s;
  }
  __syncthreads();
  return partial[0];
}

// A reduction over one block in a fixed order: the same inputs give the same result on every run.
template <typename T, typename Op>
__device__ T block_reduce(T v, Op op, T* scratch) {
#pragma unroll
  for (int mask = 16; mask > 0; mask >>= 1) v = op(v, __shfl_xor_sync(0xffffffffu, v, mask));
  if (threadIdx.x % 32 == 0) scratch[threadIdx.x / 32] = v;
  __syncthreads();
  v = scratch[0];
  for (int w = 1; w < int(blockDim.x / 32); ++w) v = op(v, scratch[w]);
  __syncthreads();  // scratch may be reused
  return v;
}

struct Sum {
  template <typename T>
  __device__ T operator()(T a, T b) const {
    return a + b;
  }
};

// Butterfly: addition is commutative bit for bit, so every lane ends with the same sum.
template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int mask = 16; mask > 0; mask >>= 1) v += __shfl_xor_sync(0xffffffffu, v, mask);
  return v;
}

// Row r's cross sum_j (p_j - u) (b_c - M) over its listed classes c = indices[j], j = first, first + stride, ... of
// a sparse teacher (b: the KD logits plus bias, over T, as load_cols gives them; M: their row maximum), skipping a
// weight p_j - u of exactly 0. Reads the KD logits: every thread calls it before any gradient is written over them.
template <typename scalar_t, typename acc_t>
__device__ acc_t sparse_listed_cross(const RowsArgs<scalar_t>& p, const Row<scalar_t>& row, int64_t r, int64_t first,
                                     int64_t stride, acc_t M) {
  const int64_t k = p.teacher_k;
  acc_t cross = 0;
  for (int64_t j = first; j < k; j += stride) {
    const acc_t w = p.sparse_probs[r * k + j] - row.u;
    if (w == acc_t(0)) continue;
    const int64_t c = p.sparse_indices[r * k + j];
    acc_t z = static_cast<acc_t>(row.kd[c]);
    if (p.kd_bias) z += static_cast<acc_t>(p.kd_bias[c]);
    cross += w * (z * p.inv_t - M);
  }
  return cross;
}

// Takes scale (p_j - u) off row r's KD gradient at the listed classes j = first, first + stride, ... of a sparse
// teacher: the gradient there is first written as for every other class (store_grads), and the caller synchronises
// in between.
template <typename scalar_t, typename acc_t>
__device__ void correct_sparse_grads(const RowsArgs<scalar_t>& p, const Row<scalar_t>& row, int64_t r, int64_t first,
                                     int64_t stride, acc_t scale) {
  const int64_t k = p.teacher_k;
  for (int64_t j = first; j < k; j += stride)
    row.g_kd[p.sparse_indices[r * k + j]] -= scale * (p.sparse_probs[r * k + j] - row.u);
}

// The gradient scales of a row: for a sparse teacher, p_scale is that of its probabilities, which sum to 1.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ rm::GradScales<acc_t> row_grad_scales(const RowsArgs<scalar_t>& p,
                                                                 const Row<scalar_t>& row,
                                                                 const rm::RowStat<acc_t>& s) {
  rm::GradScales<acc_t> g = rm::grad_scales(s, row.grad_w, p.eps, p.cols, p.inv_t);
  if (p.sparse_probs) g.p_scale = row.grad_w.kd * p.inv_t;
  return g;
}

// sparse_cross: a sparse row's whole cross (row_math::sparse_kl_value); unused for a dense teacher.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void write_row_values(const RowsArgs<scalar_t>& p, int64_t r, const Row<scalar_t>& row,
                                                 const rm::RowStat<acc_t>& s, acc_t sparse_cross) {
  const rm::RowValues<acc_t> v = rm::row_values(s, row.target, p.eps, p.cols, row.ce != nullptr);
  p.row_ce[r] = row.ce ? row.w.ce * v.ce : acc_t(0);
  if (p.sparse_probs) {  // always a valid teacher (checked in dho_fast/ops/teacher.py)
    p.row_kl[r] = row.w.kd * rm::sparse_kl_value(s.kl.student, sparse_cross, p.sparse_row_terms[2 * r + 1]);
    p.status[r] = rm::kTeacherOk;
    return;
  }
  p.row_kl[r] = row.w.kd * v.kl;
  // One thread re-reads an invalid row to tell a NaN or +inf teacher from an overflowing t / T (error path only).
  p.status[r] = v.status == rm::kTeacherNonFinite ? rm::teacher_overflow_status<acc_t>(row.t, p.cols) : v.status;
}

// Gradients of E columns starting at col from their inputs (x, a, b as loaded), into the rows' gradient rows;
// sparse: a sparse teacher's row (a is then all -inf, and g.p_scale row_grad_scales').
template <int E, typename scalar_t, typename acc_t>
__device__ __forceinline__ void store_grads(const Row<scalar_t>& row, int64_t col, int64_t C, const acc_t* x,
                                            const acc_t* a, const acc_t* b, int target_slot,
                                            const rm::GradScales<acc_t>& g, bool sparse) {
  acc_t out[E];
  if (row.g_ce) {
#pragma unroll
    for (int j = 0; j < E; ++j) out[j] = row.ce ? rm::ce_grad(x[j], j == target_slot, g) : acc_t(0);
    store_cols<E>(row.g_ce, row.g_ce_vec, col, C, out);
  }
  if (row.g_kd) {
    // A sparse teacher: (q - u) times p_scale everywhere, corrected at the listed classes afterwards.
#pragma unroll
    for (int j = 0; j < E; ++j)
      out[j] = sparse ? std::exp(b[j] - g.b_base) * g.q_scale - row.u * g.p_scale : rm::kd_grad(a[j], b[j], g);
    store_cols<E>(row.g_kd, row.g_kd_vec, col, C, out);
  }
}

// One warp per row; lane l holds the vectors l, l + 32, ... of the row in registers.
template <typename scalar_t>
__global__ void __launch_bounds__(kWarpRowsPerBlock * 32) warp_rows_kernel(const RowsArgs<scalar_t> p) {
  using acc_t = acc_type<scalar_t>;
  constexpr int V = kVec<scalar_t>, E = kLaneCols<scalar_t>, K = E / V;
  const int lane = threadIdx.x % 32;
  const int64_t r = int64_t(blockIdx.x) * kWarpRowsPerBlock + threadIdx.x / 32;
  if (r >= p.rows) return;  // the whole warp: rows are warp-uniform
  const Row<scalar_t> row = row_of(p, r);
  const int64_t C = p.cols;
  acc_t x[E], a[E], b[E];
  uint32_t valid = 0;
  int target_slot = -1;
#pragma unroll
  for (int k = 0; k < K; ++k) {
    const int64_t col = int64_t(lane + 32 * k) * V;
    load_cols<V>(row.ce, p.ce_bias, row.ce_vec, col, C, acc_t(1), x + k * V);
    load_teacher<V>(p, row, col, a + k * V);
    load_cols<V>(row.kd, p.kd_bias, row.kd_vec, col, C, p.inv_t, b + k * V);
#pragma unroll
    for (int j = 0; j < V; ++j) {
      if (col + j < C) valid |= 1u << (k * V + j);
      if (col + j == row.label) target_slot = k * V + j;
    }
  }
  const acc_t h = rm::smoothing_scale<acc_t>(C);
  rm::RowStat<acc_t> s = rm::row_fold(rm::row_empty<acc_t>(), x, a, b, valid, row.target, h, row.ce != nullptr);
  s = warp_merge(s);
  acc_t sparse_cross = 0;
  if (p.sparse_probs) {
    // u sum_c (b_c - M) from the registers, plus the listed classes' terms.
    const acc_t M = s.kl.student.max;
    if (row.u != acc_t(0)) {
      acc_t sum = 0;
#pragma unroll
      for (int j = 0; j < E; ++j)
        if (valid >> j & 1u) sum += b[j] - M;
      sparse_cross = row.u * sum;
    }
    sparse_cross = warp_sum(sparse_cross + sparse_listed_cross(p, row, r, lane, 32, M));
    __syncwarp();  // every lane's reads of the listed KD logits precede the gradients written over them
  }
  if (lane == 0) write_row_values(p, r, row, s, sparse_cross);
  if (!row.g_ce && !row.g_kd) return;
  const rm::GradScales<acc_t> g = row_grad_scales(p, row, s);
#pragma unroll
  for (int k = 0; k < K; ++k) {
    const int slot = target_slot - k * V;  // the label's slot within this vector, if it is here
    store_grads<V>(row, int64_t(lane + 32 * k) * V, C, x + k * V, a + k * V, b + k * V, slot, g,
                   p.sparse_probs != nullptr);
  }
  if (p.sparse_probs && row.g_kd) {
    __syncwarp();  // the whole row's gradient is written before the listed classes' are corrected
    correct_sparse_grads(p, row, r, lane, 32, g.p_scale);
  }
}

// One block per row, in steps of kStepCols consecutive columns per thread; the gradients re-read the row.
template <typename scalar_t>
__global__ void __launch_bounds__(kMaxRowThreads<scalar_t>) block_rows_kernel(const RowsArgs<scalar_t> p) {
  using acc_t = acc_type<scalar_t>;
  constexpr int E = kStepCols<scalar_t>;
  __shared__ rm::RowStat<acc_t> partial[32];
  __shared__ acc_t sums[32];
  const int64_t r = blockIdx.x, C = p.cols;
  const int64_t first = int64_t(threadIdx.x) * E, step = int64_t(blockDim.x) * E;
  const Row<scalar_t> row = row_of(p, r);
  const acc_t h = rm::smoothing_scale<acc_t>(C);
  rm::RowStat<acc_t> s = rm::row_empty<acc_t>();
  // A sparse teacher with u != 0: this thread's sum of b and its number of columns.
  acc_t b_sum = 0;
  int64_t b_count = 0;
  for (int64_t col = first; col < C; col += step) {
    acc_t x[E], a[E], b[E];
    load_cols<E>(row.ce, p.ce_bias, row.ce_vec, col, C, acc_t(1), x);
    load_teacher<E>(p, row, col, a);
    load_cols<E>(row.kd, p.kd_bias, row.kd_vec, col, C, p.inv_t, b);
    uint32_t valid = 0;
#pragma unroll
    for (int j = 0; j < E; ++j) valid |= (col + j < C ? 1u : 0u) << j;
    s = rm::row_fold(s, x, a, b, valid, row.target, h, row.ce != nullptr);
    if (p.sparse_probs && row.u != acc_t(0)) {
#pragma unroll
      for (int j = 0; j < E; ++j)
        if (valid >> j & 1u) b_sum += b[j];
      b_count += __popc(valid);
    }
  }
  s = block_merge(s, partial);
  acc_t sparse_cross = 0;
  if (p.sparse_probs) {
    // u sum_c (b_c - M), each thread's columns relative to M, plus the listed classes' terms. block_reduce
    // synchronises: every thread's reads of the listed KD logits precede the gradients written over them.
    const acc_t M = s.kl.student.max;
    const acc_t own = row.u != acc_t(0) ? row.u * (b_sum - acc_t(b_count) * M) : acc_t(0);
    sparse_cross = block_reduce(own + sparse_listed_cross(p, row, r, threadIdx.x, blockDim.x, M), Sum{}, sums);
  }
  if (threadIdx.x == 0) write_row_values(p, r, row, s, sparse_cross);
  if (!row.g_ce && !row.g_kd) return;
  const rm::GradScales<acc_t> g = row_grad_scales(p, row, s);
  // Same columns per thread as above: with the gradients written over the logits (chunk op), every element is
  // read by the thread that overwrites it, before it does.
  for (int64_t col = first; col < C; col += step) {
    acc_t x[E], a[E], b[E];
    load_cols<E>(row.ce, p.ce_bias, row.ce_vec, col, C, acc_t(1), x);
    load_teacher<E>(p, row, col, a);
    load_cols<E>(row.kd, p.kd_bias, row.kd_vec, col, C, p.inv_t, b);
    const int64_t target = row.label - col;
    store_grads<E>(row, col, C, x, a, b, target >= 0 && target < E ? int(target) : -1, g,
                   p.sparse_probs != nullptr);
  }
  if (p.sparse_probs && row.g_kd) {
    __syncthreads();  // the whole row's gradient is written before the listed classes' are corrected
    correct_sparse_grads(p, row, r, threadIdx.x, blockDim.x, g.p_scale);
  }
}

struct Min {
  template <typename T>
  __device__ T operator()(T a, T b) const {
    return a < b ? a : b;
  }
};

// info[0] = labels[0, n) that are not ignore_index; info[1] = the first that is not a class index either (n: none).
__global__ void __launch_bounds__(kReduceThreads)
    count_labels_kernel(const int64_t* labels, int64_t n, int64_t num_classes, int64_t ignore_index, int64_t* info) {
  __shared__ long long scratch[32];
  long long count = 0, first_bad = n;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
    const int64_t y = labels[i];
    if (y == ignore_index) continue;
    ++count;
    if ((y < 0 || y >= num_classes) && i < first_bad) first_bad = i;
  }
  count = block_reduce(count, Sum{}, scratch);
  first_bad = block_reduce(first_bad, Min{}, scratch);
  if (threadIdx.x == 0) {
    info[0] = count;
    info[1] = first_bad;
  }
}

// The loss terms from the weighted row values (in double), and info[2] = the first row with a bad teacher status
// (n: none), info[3] = that status. loss == nullptr: not wanted.
template <typename acc_t>
__global__ void __launch_bounds__(kReduceThreads)
    reduce_rows_kernel(const acc_t* row_ce, const acc_t* row_kl, const int* status, int64_t n,
                       double ce_loss_weight, double kd_loss_weight, acc_t* loss, acc_t* ce_term, acc_t* kd_term,
                       int64_t* info) {
  __shared__ double sums[32];
  __shared__ long long rows[32];
  double ce = 0, kd = 0;
  long long first_bad = n;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
    ce += row_ce[i];
    kd += row_kl[i];
    if (status[i] != rm::kTeacherOk && i < first_bad) first_bad = i;
  }
  ce = block_reduce(ce, Sum{}, sums);
  kd = block_reduce(kd, Sum{}, sums);
  first_bad = block_reduce(first_bad, Min{}, rows);
  if (threadIdx.x == 0) {
    *ce_term = acc_t(ce);
    *kd_term = acc_t(kd);
    if (loss) *loss = acc_t(ce_loss_weight * ce + kd_loss_weight * kd);
    info[2] = first_bad;
    info[3] = first_bad < n ? status[first_bad] : rm::kTeacherOk;
  }
}

template <typename scalar_t>
void launch_rows(const RowsArgs<scalar_t>& p, cudaStream_t stream) {
  if (p.rows == 0) return;
  if (p.cols <= 32 * kLaneCols<scalar_t>) {
    const int64_t blocks = (p.rows + kWarpRowsPerBlock - 1) / kWarpRowsPerBlock;
    warp_rows_kernel<scalar_t><<<blocks, kWarpRowsPerBlock * 32, 0, stream>>>(p);
  } else {
    // One step per thread where the row allows: a block then has its whole row in flight at once, and the rows in
    // flight across the GPU (at most 2048 threads x 8 columns x 3 tensors per SM) stay in L2 for the second read.
    const int64_t steps = (p.cols + kStepCols<scalar_t> - 1) / kStepCols<scalar_t>;
    const int threads = int(std::clamp<int64_t>((steps + 31) / 32 * 32, 128, kMaxRowThreads<scalar_t>));
    block_rows_kernel<scalar_t><<<p.rows, threads, 0, stream>>>(p);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename acc_t>
void launch_reduce(const at::Tensor& row_ce, const at::Tensor& row_kl, const at::Tensor& status,
                   double ce_loss_weight, double kd_loss_weight, at::Tensor* loss, at::Tensor& ce_term,
                   at::Tensor& kd_term, at::Tensor& info, cudaStream_t stream) {
  reduce_rows_kernel<acc_t><<<1, kReduceThreads, 0, stream>>>(
      row_ce.const_data_ptr<acc_t>(), row_kl.const_data_ptr<acc_t>(), status.const_data_ptr<int>(), row_ce.size(0),
      ce_loss_weight, kd_loss_weight, loss ? loss->mutable_data_ptr<acc_t>() : nullptr,
      ce_term.mutable_data_ptr<acc_t>(), kd_term.mutable_data_ptr<acc_t>(), info.mutable_data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void launch_count(const at::Tensor& labels, int64_t num_classes, int64_t ignore_index, at::Tensor& info,
                  cudaStream_t stream) {
  count_labels_kernel<<<1, kReduceThreads, 0, stream>>>(labels.const_data_ptr<int64_t>(), labels.size(0),
                                                         num_classes, ignore_index, info.mutable_data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Raises the first error the kernels flagged in info for `labels`, rows first_row, ... of the batch, with a teacher
// of form teacher_form; returns the number of labelled rows. The copy to the host is the op's one synchronisation.
int64_t raise_flagged_errors(const at::Tensor& info, const at::Tensor& labels, int64_t first_row, int64_t num_classes,
                             int64_t ignore_index, int64_t teacher_form) {
  const at::Tensor host = info.to(at::kCPU);
  const int64_t* v = host.const_data_ptr<int64_t>();
  const int64_t n = labels.size(0);
  if (v[1] < n) check_label(first_row + v[1], labels[v[1]].item<int64_t>(), num_classes, ignore_index);
  if (v[2] < n) check_teacher_row(first_row + v[2], int(v[3]), teacher_form);
  return v[0];
}

// The gradient of x, in the accumulation dtype.
at::Tensor gradient_buffer(const at::Tensor& x, bool wanted) {
  if (!wanted) return at::empty({0}, x.options());
  at::Tensor g = at::empty_like(x, x.options().dtype(x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat));
  // Tests poison the outputs so that an element the kernel fails to write shows up as NaN.
  if (std::getenv("DHO_FAST_POISON_OUTPUTS")) g.fill_(std::numeric_limits<double>::quiet_NaN());
  return g;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> dual_head_loss_cuda(
    const at::Tensor& ce_logits, const at::Tensor& kd_logits, const at::Tensor& teacher_logits,
    const at::Tensor& labels, double temperature, double ce_loss_weight, double kd_loss_weight, bool kd_split,
    int64_t ignore_index, double label_smoothing, bool ce_grad, bool kd_grad, double ce_grad_scale,
    double kd_grad_scale, int64_t teacher_form, const std::optional<at::Tensor>& teacher_indices,
    const std::optional<at::Tensor>& teacher_row_terms) {
  check_loss_inputs(ce_logits, kd_logits, teacher_logits, labels, temperature, ce_loss_weight, kd_loss_weight,
                    label_smoothing, teacher_form, teacher_indices, teacher_row_terms);
  const c10::cuda::CUDAGuard guard(ce_logits.device());
  const at::Tensor ce = ce_logits.contiguous(), kd = kd_logits.contiguous(), t = teacher_logits.contiguous();
  // A sparse teacher's indices and row terms are contiguous (check_teacher).
  const bool sparse = teacher_form == rm::kTeacherSparse;
  const at::Tensor y = labels.contiguous();
  const int64_t N = ce.size(0), C = ce.size(1);
  const auto acc = ce.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto opts = ce.options();
  at::Tensor info = at::empty({4}, opts.dtype(at::kLong));
  const at::Tensor row_ce = at::empty({N}, opts.dtype(acc)), row_kl = at::empty({N}, opts.dtype(acc));
  const at::Tensor status = at::empty({N}, opts.dtype(at::kInt));
  at::Tensor g_ce = gradient_buffer(ce, ce_grad), g_kd = gradient_buffer(kd, kd_grad);
  at::Tensor loss = at::empty({}, opts.dtype(acc)), ce_term = at::empty({}, opts.dtype(acc)),
             kd_term = at::empty({}, opts.dtype(acc));
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  launch_count(y, C, ignore_index, info, stream);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, ce.scalar_type(), "dual_head_loss_cuda", [&] {
    using acc_t = acc_type<scalar_t>;
    const RowsArgs<scalar_t> p{.ce = ce.const_data_ptr<scalar_t>(),
                               .ce_row = nullptr,
                               .ce_rows = N,
                               .kd = kd.const_data_ptr<scalar_t>(),
                               .teacher = sparse ? nullptr : t.const_data_ptr<scalar_t>(),
                               .labels = y.const_data_ptr<int64_t>(),
                               .g_ce = ce_grad ? g_ce.mutable_data_ptr<acc_t>() : nullptr,
                               .g_kd = kd_grad ? g_kd.mutable_data_ptr<acc_t>() : nullptr,
                               .row_ce = row_ce.mutable_data_ptr<acc_t>(),
                               .row_kl = row_kl.mutable_data_ptr<acc_t>(),
                               .status = status.mutable_data_ptr<int>(),
                               .num_labelled_dev = info.const_data_ptr<int64_t>(),
                               .num_labelled = 0,
                               .rows = N,
                               .cols = C,
                               .batch_rows = N,
                               .ignore_index = ignore_index,
                               .temperature = acc_t(temperature),
                               .inv_t = acc_t(1) / acc_t(temperature),
                               .eps = acc_t(label_smoothing),
                               .kd_split = kd_split,
                               .ce_grad_scale = acc_t(ce_grad_scale),
                               .kd_grad_scale = acc_t(kd_grad_scale),
                               .teacher_form = int(teacher_form),
                               .sparse_probs = sparse ? t.const_data_ptr<acc_t>() : nullptr,
                               .sparse_indices = sparse ? teacher_indices->const_data_ptr<int64_t>() : nullptr,
                               .sparse_row_terms = sparse ? teacher_row_terms->const_data_ptr<acc_t>() : nullptr,
                               .teacher_k = sparse ? t.size(1) : 0};
    launch_rows(p, stream);
    launch_reduce<acc_t>(row_ce, row_kl, status, ce_loss_weight, kd_loss_weight, &loss, ce_term, kd_term, info,
                         stream);
  });
  raise_flagged_errors(info, y, 0, C, ignore_index, teacher_form);
  // The kernel writes acc_t (the chunk op needs it, and shares the row kernels): bfloat16 logits' gradients are
  // rounded here, one pass on the device, which the CPU kernel instead folds into its row pass.
  const auto grad_dtype = loss_gradient_dtype(ce.scalar_type());
  return {loss, ce_term, kd_term, ce_grad ? g_ce.to(grad_dtype) : g_ce, kd_grad ? g_kd.to(grad_dtype) : g_kd};
}

std::tuple<at::Tensor, at::Tensor> dual_head_loss_chunk_cuda(at::Tensor& ce_logits, at::Tensor& kd_logits,
                                                             const at::Tensor& teacher_logits,
                                                             const at::Tensor& labels, int64_t start,
                                                             int64_t num_labelled, double temperature, bool kd_split,
                                                             int64_t ignore_index, double label_smoothing,
                                                             bool ce_grad, bool kd_grad,
                                                             const std::optional<at::Tensor>& ce_bias,
                                                             const std::optional<at::Tensor>& kd_bias,
                                                             double ce_grad_scale, double kd_grad_scale,
                                                             const std::optional<at::Tensor>& ce_grad_out,
                                                             const std::optional<at::Tensor>& kd_grad_out,
                                                             int64_t teacher_form,
                                                             const std::optional<at::Tensor>& teacher_indices,
                                                             const std::optional<at::Tensor>& teacher_row_terms) {
  check_chunk_inputs(ce_logits, kd_logits, teacher_logits, labels, start, num_labelled, temperature, label_smoothing,
                     ce_bias, kd_bias, teacher_form, teacher_indices, teacher_row_terms);
  check_chunk_grad_out("ce_grad_out", ce_grad_out, "ce_logits", ce_logits, ce_grad);
  check_chunk_grad_out("kd_grad_out", kd_grad_out, "kd_logits", kd_logits, kd_grad);
  const c10::cuda::CUDAGuard guard(kd_logits.device());
  const int64_t N = labels.size(0), C = kd_logits.size(1), R = kd_logits.size(0);
  // The teacher covers the whole batch, (N, C) or, sparse, (N, k) with indices (N, k) and row terms (N, 2): the
  // chunk's rows of each.
  const bool sparse = teacher_form == rm::kTeacherSparse;
  const at::Tensor y = labels.narrow(0, start, R), t = teacher_logits.narrow(0, start, R);
  const at::Tensor t_indices = sparse ? teacher_indices->narrow(0, start, R) : at::Tensor();
  const at::Tensor t_row_terms = sparse ? teacher_row_terms->narrow(0, start, R) : at::Tensor();
  // Row r's CE logits are row (number of labelled rows before r) of ce_logits.
  const at::Tensor labelled = y.ne(ignore_index);
  const at::Tensor ce_row = labelled.cumsum(0).sub_(1).masked_fill_(labelled.logical_not(), -1);
  const auto acc = kd_logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto opts = kd_logits.options();
  at::Tensor info = at::empty({4}, opts.dtype(at::kLong));
  const at::Tensor row_ce = at::empty({R}, opts.dtype(acc)), row_kl = at::empty({R}, opts.dtype(acc));
  const at::Tensor status = at::empty({R}, opts.dtype(at::kInt));
  at::Tensor ce_term = at::empty({}, opts.dtype(acc)), kd_term = at::empty({}, opts.dtype(acc));
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  launch_count(y, C, ignore_index, info, stream);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, kd_logits.scalar_type(), "dual_head_loss_chunk_cuda", [&] {
    using acc_t = acc_type<scalar_t>;
    // Where a gradient goes: its buffer, or over the logits (then of the accumulation dtype: checked above).
    auto grad_ptr = [](bool wanted, const std::optional<at::Tensor>& out, at::Tensor& logits) {
      return wanted ? (out ? *out : logits).mutable_data_ptr<acc_t>() : nullptr;
    };
    const RowsArgs<scalar_t> p{.ce = ce_logits.const_data_ptr<scalar_t>(),
                               .ce_row = ce_row.const_data_ptr<int64_t>(),
                               .ce_rows = ce_logits.size(0),
                               .kd = kd_logits.const_data_ptr<scalar_t>(),
                               .teacher = sparse ? nullptr : t.const_data_ptr<scalar_t>(),
                               .labels = y.const_data_ptr<int64_t>(),
                               .g_ce = grad_ptr(ce_grad, ce_grad_out, ce_logits),
                               .g_kd = grad_ptr(kd_grad, kd_grad_out, kd_logits),
                               .row_ce = row_ce.mutable_data_ptr<acc_t>(),
                               .row_kl = row_kl.mutable_data_ptr<acc_t>(),
                               .status = status.mutable_data_ptr<int>(),
                               .num_labelled_dev = nullptr,
                               .num_labelled = num_labelled,
                               .rows = R,
                               .cols = C,
                               .batch_rows = N,
                               .ignore_index = ignore_index,
                               .temperature = acc_t(temperature),
                               .inv_t = acc_t(1) / acc_t(temperature),
                               .eps = acc_t(label_smoothing),
                               .kd_split = kd_split,
                               .ce_bias = ce_bias ? ce_bias->const_data_ptr<scalar_t>() : nullptr,
                               .kd_bias = kd_bias ? kd_bias->const_data_ptr<scalar_t>() : nullptr,
                               .ce_grad_scale = acc_t(ce_grad_scale),
                               .kd_grad_scale = acc_t(kd_grad_scale),
                               .teacher_form = int(teacher_form),
                               .sparse_probs = sparse ? t.const_data_ptr<acc_t>() : nullptr,
                               .sparse_indices = sparse ? t_indices.const_data_ptr<int64_t>() : nullptr,
                               .sparse_row_terms = sparse ? t_row_terms.const_data_ptr<acc_t>() : nullptr,
                               .teacher_k = sparse ? t.size(1) : 0};
    launch_rows(p, stream);
    launch_reduce<acc_t>(row_ce, row_kl, status, 0, 0, nullptr, ce_term, kd_term, info, stream);
  });
  const int64_t chunk_labelled = raise_flagged_errors(info, y, start, C, ignore_index, teacher_form);
  check_chunk_labelled(ce_logits, chunk_labelled, num_labelled);
  return {ce_term, kd_term};
}

}  // namespace
}  // namespace cuda
}  // namespace dho_fast

TORCH_LIBRARY_IMPL(dho_fast, CUDA, m) {
  m.impl("dual_head_loss", &dho_fast::cuda::dual_head_loss_cuda);
  m.impl("dual_head_loss_chunk", &dho_fast::cuda::dual_head_loss_chunk_cuda);
}

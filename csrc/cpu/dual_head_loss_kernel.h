// The CPU kernel of dual_head_loss, compiled once per instruction set (see kernel_*.cpp): each translation unit
// defines CPU_CAPABILITY before including this header, which puts ATen's Vectorized<T> and this code into a
// namespace of that name, so the variants coexist in one library and are chosen at run time.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "../row_math.h"
#include "dual_head_loss_kernel_api.h"

namespace dho_fast {
namespace cpu {
namespace CPU_CAPABILITY {

using at::vec::Vectorized;
namespace rm = row_math;

// Columns per block: a block of the three input rows stays in L1 between the max and the exp loop, and the
// per-block bookkeeping (a few scalar exps) is negligible against the block's vector exps.
constexpr int64_t kBlock = 512;

template <typename acc_t>
struct RowScratch {
  std::vector<acc_t> ce, kd, teacher;  // converted inputs, logits plus bias, or T log(probabilities)
  std::vector<acc_t> exp_teacher;      // exp(t / T - running max) per column
  std::vector<acc_t> block_max;        // running maxima used for each block: 3 per block
  std::vector<acc_t> sparse_kd;        // a sparse teacher's classes' KD logits, read before pass 1 overwrites them
  std::vector<acc_t> g_ce, g_kd;       // gradient rows computed in acc_t before they are rounded to the output's type
  RowScratch(int64_t C, bool convert, bool biased, bool round_grads, int teacher_form, int64_t k)
      : block_max(3 * ((C + kBlock - 1) / kBlock)) {
    if (convert || biased) {
      ce.resize(C);
      kd.resize(C);
    }
    if (round_grads) {
      g_ce.resize(C);
      g_kd.resize(C);
    }
    if (teacher_form == rm::kTeacherSparse) {
      sparse_kd.resize(k);
    } else {
      if (convert || teacher_form == rm::kTeacherProbs) teacher.resize(C);
      exp_teacher.resize(C);
    }
  }
};

// One row of a sparse teacher (row_math::kTeacherSparse): p on k listed classes, u on each other class.
template <typename acc_t>
struct SparseTeacherRow {
  const acc_t* probs;
  const int64_t* indices;
  int64_t k;
  acc_t u;
  acc_t neg_entropy;  // sum_c p_c log p_c
};

// Row x plus bias (nullptr: none) in acc_t: x itself when that needs neither, else written into `scratch`.
template <typename acc_t, typename scalar_t>
inline const acc_t* load_row(const scalar_t* x, const acc_t* bias, std::vector<acc_t>& scratch, int64_t C) {
  using V = Vectorized<acc_t>;
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    if (!bias) return x;
    at::vec::map2([](V a, V b) { return a + b; }, scratch.data(), x, bias, C);
  } else {
    at::vec::convert(x, scratch.data(), C);
    if (bias) at::vec::map2([](V a, V b) { return a + b; }, scratch.data(), scratch.data(), bias, C);
  }
  return scratch.data();
}

// A row of teacher probabilities as the logits T log(p) in acc_t, written into `scratch`: p = 0 becomes -inf (a
// masked class), and a negative or NaN probability NaN (reported as an invalid row).
template <typename acc_t, typename scalar_t>
inline const acc_t* load_probs_as_logits(const scalar_t* p, std::vector<acc_t>& scratch, int64_t C, acc_t T) {
  using V = Vectorized<acc_t>;
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    at::vec::map([T](V a) { return a.log() * V(T); }, scratch.data(), p, C);
  } else {
    at::vec::convert(p, scratch.data(), C);
    at::vec::map([T](V a) { return a.log() * V(T); }, scratch.data(), scratch.data(), C);
  }
  return scratch.data();
}

// A bias (nullptr: none) in acc_t: itself when it already is, else converted into `storage`.
template <typename acc_t, typename scalar_t>
inline const acc_t* bias_in_acc(const scalar_t* bias, std::vector<acc_t>& storage, int64_t C) {
  if (!bias) return nullptr;
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    return bias;
  } else {
    storage.resize(C);
    at::vec::convert(bias, storage.data(), C);
    return storage.data();
  }
}

template <typename acc_t>
inline acc_t lane_sum(Vectorized<acc_t> v) {
  acc_t lanes[Vectorized<acc_t>::size()];
  v.store(lanes);
  acc_t total = 0;
  for (acc_t x : lanes) total += x;
  return total;
}

template <typename acc_t>
inline acc_t block_max(const acc_t* x, int64_t n, acc_t scale) {
  using V = Vectorized<acc_t>;
  const V fill(rm::neg_inf<acc_t>());
  V m = fill;
  const V s(scale);
  int64_t c = 0;
  for (; c + V::size() <= n; c += V::size()) m = at::vec::maximum(m, V::loadu(x + c) * s);
  if (c < n) m = at::vec::maximum(m, V::set(fill, V::loadu(x + c, n - c) * s, n - c));
  acc_t lanes[V::size()];
  m.store(lanes);
  acc_t r = lanes[0];
  for (int64_t i = 1; i < V::size(); ++i) r = rm::nan_max(r, lanes[i]);
  return r;
}

// exp(scale * x - m) into out (when given); returns the sum. m = -inf means an all-masked block: every term is 0.
// exp_u20 is ATen's polynomial exp: at most 20 ulp (2.4e-6 relative) in float32, exact exp for double, and a fifth
// faster per row than the 1-ulp exp. It maps NaN to a finite value, but a NaN logit has already made its row's
// maximum NaN (nan_max), so the row's loss and gradients are NaN all the same.
template <typename acc_t>
inline acc_t block_exp(const acc_t* x, int64_t n, acc_t scale, acc_t m, acc_t* out) {
  using V = Vectorized<acc_t>;
  const V s(scale), mv(rm::exp_base(m));
  V total(0);
  int64_t c = 0;
  for (; c + V::size() <= n; c += V::size()) {
    const V e = (V::loadu(x + c) * s - mv).exp_u20();
    if (out) e.store(out + c);
    total += e;
  }
  if (c < n) {
    const V e = V::set(V(0), (V::loadu(x + c, n - c) * s - mv).exp_u20(), n - c);
    if (out) e.store(out + c, n - c);
    total += e;
  }
  return lane_sum(total);
}

template <typename acc_t>
inline acc_t block_sum(const acc_t* x, int64_t n) {
  using V = Vectorized<acc_t>;
  V total(0);
  int64_t c = 0;
  for (; c + V::size() <= n; c += V::size()) total += V::loadu(x + c);
  if (c < n) total += V::set(V(0), V::loadu(x + c, n - c), n - c);
  return lane_sum(total);
}

// sum_c (h x_c - h_target) over a block: the label-smoothing sum of row_math::cross_entropy_value.
template <typename acc_t>
inline acc_t block_smoothing_sum(const acc_t* x, int64_t n, acc_t h, acc_t h_target) {
  using V = Vectorized<acc_t>;
  const V hv(h), tv(h_target);
  V total(0);
  int64_t c = 0;
  for (; c + V::size() <= n; c += V::size()) total += V::loadu(x + c) * hv - tv;
  if (c < n) total += V::set(V(0), V::loadu(x + c, n - c) * hv - tv, n - c);
  return lane_sum(total);
}

// Teacher exps (written to exp_a) and the KL cross term of one block, relative to maxima ma, mb:
//   sum_c e_a * ((a - ma) - (b - mb)),  e_a = exp(a - ma); masked columns (e_a = 0) contribute exactly 0.
template <typename acc_t>
inline void block_kl(const acc_t* t, const acc_t* z, int64_t n, acc_t inv_t, acc_t ma, acc_t mb, acc_t* exp_a,
                     acc_t& sum_a, acc_t& cross) {
  using V = Vectorized<acc_t>;
  const V s(inv_t), zero(0);
  const V mav(rm::exp_base(ma)), mbv(mb);
  V sa(0), cr(0);
  auto step = [&](V a, V b) {
    const V da = a * s - mav;
    const V e = da.exp_u20();
    const V term = V::blendv(zero, e * (da - (b * s - mbv)), e > zero);
    sa += e;
    cr += term;
    return e;
  };
  int64_t c = 0;
  for (; c + V::size() <= n; c += V::size()) step(V::loadu(t + c), V::loadu(z + c)).store(exp_a + c);
  if (c < n) {
    const int64_t r = n - c;
    const V a = V::set(V(rm::neg_inf<acc_t>()), V::loadu(t + c, r), r);
    step(a, V::loadu(z + c, r)).store(exp_a + c, r);
  }
  sum_a = lane_sum(sa);
  cross = lane_sum(cr);
}

// The memory of one row: its inputs and gradient outputs in their own dtypes.
struct RowStreams {
  const char* in[3] = {nullptr, nullptr, nullptr};  // CE logits (nullptr: not read), KD logits, dense teacher
  char* out[2] = {nullptr, nullptr};                // gradient rows (nullptr: none)
  int64_t in_bytes = 0, out_bytes = 0;              // bytes per element of the inputs and of the gradients
};

// Fetches the row a task works on next into the cache while it works on this one, block for block: block b of the
// next row before block b of this one. A task's rows are strided (every num_tasks-th row) and a page or so each at
// C = 1000, so the hardware prefetcher restarts at every row, and a row read from DRAM took twice as long as a
// cached one (1.2 against 0.62 ms for (512, 1000) float32, 2 threads); this took a tenth off with cold caches. Only
// rows of at most kMaxColumns: a long row streams well without it, and at C = 21843 it cost 5% (another 5 C
// elements in L2, and prefetches the hardware issues anyway).
struct RowPrefetcher {
  static constexpr int64_t kMaxColumns = 8 * kBlock;
  RowStreams next_row;  // all nullptr: nothing to fetch

  // Columns [b0, b0 + n) of the next row's streams; locality 2: into L2 (and L1 where the CPU does). Inlined on
  // purpose: GCC 12 deems a function of prefetches alone free of side effects and deletes its calls.
  [[gnu::always_inline]] void before_block(int64_t b0, int64_t n) const {
    constexpr int64_t kLine = 64;
    const RowStreams& s = next_row;
    for (const char* p : s.in) {
      if (!p) continue;
      for (int64_t b = b0 * s.in_bytes, end = (b0 + n) * s.in_bytes; b < end; b += kLine)
        __builtin_prefetch(p + b, 0, 2);
    }
    for (char* p : s.out) {
      if (!p) continue;
      for (int64_t b = b0 * s.out_bytes, end = (b0 + n) * s.out_bytes; b < end; b += kLine)
        __builtin_prefetch(p + b, 1, 2);
    }
  }
};

struct RowResult {
  double ce;
  double kl;
  int teacher_status;
};

// One row. ce/kd/t are the row's inputs in acc_t (ce is unused, and may be nullptr, for an unlabelled row; t is
// unused for a sparse teacher, which `sparse` then gives); g_ce/g_kd receive the unweighted gradients (nullptr: not
// wanted) and may be ce/kd themselves. `prefetch` runs before each block of pass 1.
template <typename acc_t>
RowResult dual_head_row(const acc_t* ce, const acc_t* kd, const acc_t* t, const SparseTeacherRow<acc_t>* sparse,
                        int64_t label, const LossParams& p, acc_t* g_ce, acc_t* g_kd, RowScratch<acc_t>& scratch,
                        const RowPrefetcher& prefetch) {
  const int64_t C = p.num_classes;
  const acc_t inv_t = acc_t(1) / acc_t(p.temperature);
  const bool labelled = label != p.ignore_index;
  const auto w = rm::row_weights<acc_t>(labelled, p.num_labelled, p.num_rows, p.kd_split, acc_t(p.temperature));
  const bool do_ce = labelled;

  rm::SoftmaxStat<acc_t> ce_stat = rm::softmax_empty<acc_t>();
  rm::KlStat<acc_t> kl_stat = rm::kl_empty<acc_t>();
  // The label's logit is read before pass 1 (which may overwrite it with its gradient): the smoothing sum is
  // accumulated relative to it.
  const acc_t target_logit = do_ce ? ce[label] : acc_t(0);
  const acc_t h = rm::smoothing_scale<acc_t>(C), h_target = h * target_logit;
  acc_t ce_smoothing_sum = 0;
  acc_t* bmax = scratch.block_max.data();
  // A sparse teacher's KL needs the KD logits of its k classes, and the row's sum when u > 0 spreads mass on all.
  acc_t kd_sum = 0;
  if (sparse) {
    for (int64_t j = 0; j < sparse->k; ++j) scratch.sparse_kd[j] = kd[sparse->indices[j]];
  }

  // Pass 1: each input element is read from memory once; the block's running maxima are recorded so the exps
  // stored now can be rescaled to the row's final maxima in pass 2. Every read of a block precedes the exps written
  // over it, as the gradients may overwrite the logits.
  for (int64_t b0 = 0, blk = 0; b0 < C; b0 += kBlock, ++blk) {
    const int64_t n = std::min(kBlock, C - b0);
    prefetch.before_block(b0, n);
    if (do_ce) {
      const acc_t m = rm::nan_max(ce_stat.max, block_max(ce + b0, n, acc_t(1)));
      if (p.label_smoothing != 0) ce_smoothing_sum += block_smoothing_sum(ce + b0, n, h, h_target);
      const acc_t s = block_exp(ce + b0, n, acc_t(1), m, g_ce ? g_ce + b0 : nullptr);
      ce_stat = rm::softmax_merge(ce_stat, rm::SoftmaxStat<acc_t>{m, s});
      bmax[3 * blk] = m;
    }
    const acc_t mb = rm::nan_max(kl_stat.student.max, block_max(kd + b0, n, inv_t));
    bmax[3 * blk + 1] = mb;
    if (sparse) {
      if (sparse->u != 0) kd_sum += block_sum(kd + b0, n);
      const acc_t sb = block_exp(kd + b0, n, inv_t, mb, g_kd ? g_kd + b0 : nullptr);
      kl_stat.student = rm::softmax_merge(kl_stat.student, rm::SoftmaxStat<acc_t>{mb, sb});
      continue;
    }
    const acc_t ma = rm::nan_max(kl_stat.teacher.max, block_max(t + b0, n, inv_t));
    acc_t sa, cross;
    block_kl(t + b0, kd + b0, n, inv_t, ma, mb, scratch.exp_teacher.data() + b0, sa, cross);
    const acc_t sb = block_exp(kd + b0, n, inv_t, mb, g_kd ? g_kd + b0 : nullptr);
    kl_stat = rm::kl_merge(kl_stat, rm::KlStat<acc_t>{{ma, sa}, {mb, sb}, cross});
    bmax[3 * blk + 2] = ma;
  }

  RowResult result{0.0, 0.0, rm::kTeacherOk};
  if (sparse) {
    const acc_t m = kl_stat.student.max;
    acc_t cross = sparse->u != 0 ? sparse->u * (kd_sum * inv_t - acc_t(C) * m) : acc_t(0);
    for (int64_t j = 0; j < sparse->k; ++j) {
      const acc_t w_j = sparse->probs[j] - sparse->u;
      if (w_j != 0) cross += w_j * (scratch.sparse_kd[j] * inv_t - m);
    }
    result.kl = double(rm::sparse_kl_value(kl_stat.student, cross, sparse->neg_entropy));
  } else {
    result.teacher_status = rm::teacher_row_status(kl_stat.teacher.max);
    if (result.teacher_status == rm::kTeacherNonFinite)
      result.teacher_status = rm::teacher_overflow_status<acc_t>(t, C);
    if (result.teacher_status != rm::kTeacherOk) return result;
    result.kl = double(rm::kl_value(kl_stat));
  }
  if (do_ce) {
    result.ce = double(
        rm::cross_entropy_value(ce_stat, target_logit, ce_smoothing_sum, acc_t(p.label_smoothing), C));
  }

  // Pass 2: finalise the gradients in place (rows are cache-resident by now), times the gradient scales.
  using V = Vectorized<acc_t>;
  const acc_t gw_ce = w.ce * acc_t(p.ce_grad_scale), gw_kd = w.kd * acc_t(p.kd_grad_scale);
  if (g_ce) {
    if (!do_ce) {
      std::fill(g_ce, g_ce + C, acc_t(0));
    } else {
      const acc_t off = gw_ce * acc_t(p.label_smoothing) / acc_t(C);
      for (int64_t b0 = 0, blk = 0; b0 < C; b0 += kBlock, ++blk) {
        const int64_t n = std::min(kBlock, C - b0);
        const V f(gw_ce * rm::probability_factor(bmax[3 * blk], ce_stat)), o(off);
        at::vec::map([&](V e) { return e * f - o; }, g_ce + b0, g_ce + b0, n);
      }
      g_ce[label] -= gw_ce * (acc_t(1) - acc_t(p.label_smoothing));
    }
  }
  if (g_kd && sparse) {
    // d(kd_term)/d(z) = kd_row * (q - p) / T: q - u everywhere, then p - u taken off at the k listed classes.
    const acc_t scale = gw_kd * inv_t;
    const V off(scale * sparse->u);
    for (int64_t b0 = 0, blk = 0; b0 < C; b0 += kBlock, ++blk) {
      const int64_t n = std::min(kBlock, C - b0);
      const V fb(scale * rm::probability_factor(bmax[3 * blk + 1], kl_stat.student));
      at::vec::map([&](V eb) { return eb * fb - off; }, g_kd + b0, g_kd + b0, n);
    }
    for (int64_t j = 0; j < sparse->k; ++j) g_kd[sparse->indices[j]] -= scale * (sparse->probs[j] - sparse->u);
  } else if (g_kd) {
    // d(kd_term)/d(z) = kd_row * (q - p) / T
    const acc_t scale = gw_kd * inv_t;
    for (int64_t b0 = 0, blk = 0; b0 < C; b0 += kBlock, ++blk) {
      const int64_t n = std::min(kBlock, C - b0);
      const V fb(scale * rm::probability_factor(bmax[3 * blk + 1], kl_stat.student));
      const V fa(scale * rm::probability_factor(bmax[3 * blk + 2], kl_stat.teacher));
      at::vec::map2([&](V eb, V ea) { return eb * fb - ea * fa; }, g_kd + b0, g_kd + b0,
                    scratch.exp_teacher.data() + b0, n);
    }
  }
  return result;
}

// Where dual_head_row computes a gradient row (nullptr: none): the output row itself when it is of acc_t, else a
// scratch row that round_gradient_row then rounds into the output, once.
template <typename acc_t, typename grad_t>
inline acc_t* gradient_work_row(grad_t* out, std::vector<acc_t>& scratch) {
  if constexpr (std::is_same_v<grad_t, acc_t>) {
    return out;
  } else {
    return out ? scratch.data() : nullptr;
  }
}

template <typename acc_t, typename grad_t>
inline void round_gradient_row(const acc_t* work, grad_t* out, int64_t C) {
  if constexpr (!std::is_same_v<grad_t, acc_t>) {
    if (out) at::vec::convert(work, out, C);
  }
}

template <typename scalar_t, typename grad_t>
void dual_head_loss_rows(const RowsIO<scalar_t, grad_t>& io, const LossParams& p) {
  using acc_t = acc_type<scalar_t>;
  constexpr bool convert = !std::is_same_v<scalar_t, acc_t>;
  constexpr bool round_grads = !std::is_same_v<grad_t, acc_t>;
  const int64_t C = p.num_classes;
  // One task per thread, each taking every num_tasks-th row: labelled rows (which also have the CE head's work) are
  // usually the first of a batch, and contiguous ranges of rows would give them all to the first threads. Each task
  // has at least min_rows rows, enough to amortise its scratch allocation.
  const int64_t min_rows = std::max<int64_t>(1, 32768 / std::max<int64_t>(C, 1));
  const int64_t num_tasks = std::clamp<int64_t>(io.rows / min_rows, 1, at::get_num_threads());
  // The biases in acc_t, converted once for all rows.
  std::vector<acc_t> ce_bias_storage, kd_bias_storage;
  const acc_t* ce_bias = bias_in_acc(io.ce_bias, ce_bias_storage, C);
  const acc_t* kd_bias = bias_in_acc(io.kd_bias, kd_bias_storage, C);
  const bool biased = ce_bias || kd_bias;
  const bool dense_teacher = p.teacher_form != rm::kTeacherSparse;
  // Row i's CE logits (nullptr: none, or not read) and gradient rows (nullptr: none).
  struct RowPointers {
    const scalar_t* ce;
    grad_t* g_ce;
    grad_t* g_kd;
  };
  auto row_pointers = [&](int64_t i) {
    const int64_t ce_i = io.ce_row ? io.ce_row[i] : i;
    // A row without CE logits has no CE gradient row either; with ce_row == nullptr every row has both. An
    // unlabelled row's CE logits are never read (the whole-batch op still writes its zero CE gradient).
    const bool read_ce = ce_i >= 0 && io.labels[i] != p.ignore_index;
    return RowPointers{read_ce ? io.ce + ce_i * C : nullptr, io.g_ce && ce_i >= 0 ? io.g_ce + ce_i * C : nullptr,
                       io.g_kd ? io.g_kd + i * C : nullptr};
  };
  auto row_streams = [&](int64_t i) {
    const RowPointers row = row_pointers(i);
    RowStreams r;
    r.in[0] = reinterpret_cast<const char*>(row.ce);
    r.in[1] = reinterpret_cast<const char*>(io.kd + i * C);
    r.in[2] = dense_teacher ? reinterpret_cast<const char*>(io.teacher + i * C) : nullptr;
    r.out[0] = reinterpret_cast<char*>(row.g_ce);
    r.out[1] = reinterpret_cast<char*>(row.g_kd);
    r.in_bytes = sizeof(scalar_t);
    r.out_bytes = sizeof(grad_t);
    return r;
  };
  auto process_row = [&](int64_t i, const RowPrefetcher& prefetch, RowScratch<acc_t>& scratch) {
    const int64_t off = i * C;
    const RowPointers row = row_pointers(i);
    const acc_t* ce_row = row.ce ? load_row(row.ce, ce_bias, scratch.ce, C) : nullptr;
    const acc_t* kd_row = load_row(io.kd + off, kd_bias, scratch.kd, C);
    const acc_t* t_row = nullptr;
    SparseTeacherRow<acc_t> sparse_row{};
    if (p.teacher_form == rm::kTeacherSparse) {
      const int64_t k = p.teacher_k;
      sparse_row = {io.sparse_probs + i * k, io.sparse_indices + i * k, k, io.sparse_row_terms[2 * i],
                    io.sparse_row_terms[2 * i + 1]};
    } else if (p.teacher_form == rm::kTeacherProbs) {
      t_row = load_probs_as_logits(io.teacher + off, scratch.teacher, C, acc_t(p.temperature));
    } else {
      t_row = load_row(io.teacher + off, static_cast<const acc_t*>(nullptr), scratch.teacher, C);
    }
    const SparseTeacherRow<acc_t>* sparse = p.teacher_form == rm::kTeacherSparse ? &sparse_row : nullptr;
    acc_t* g_ce_work = gradient_work_row(row.g_ce, scratch.g_ce);
    acc_t* g_kd_work = gradient_work_row(row.g_kd, scratch.g_kd);
    const RowResult r =
        dual_head_row<acc_t>(ce_row, kd_row, t_row, sparse, io.labels[i], p, g_ce_work, g_kd_work, scratch, prefetch);
    round_gradient_row(g_ce_work, row.g_ce, C);
    round_gradient_row(g_kd_work, row.g_kd, C);
    io.row_ce[i] = r.ce;
    io.row_kl[i] = r.kl;
    io.row_status[i] = r.teacher_status;
  };
  at::parallel_for(0, num_tasks, 1, [&](int64_t first_task, int64_t end_task) {
    RowScratch<acc_t> scratch(C, convert, biased, round_grads, p.teacher_form, p.teacher_k);
    for (int64_t task = first_task; task < end_task; ++task) {
      for (int64_t i = task; i < io.rows; i += num_tasks) {
        const int64_t next = i + num_tasks;
        const bool fetch_next = next < io.rows && C <= RowPrefetcher::kMaxColumns;
        process_row(i, RowPrefetcher{fetch_next ? row_streams(next) : RowStreams{}}, scratch);
      }
    }
  });
}

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace dho_fast

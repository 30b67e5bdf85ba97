// Exact top-k selection for fot's CPU memory attention: the XLA:CPU FFI kernels of fot.ops.topk_ffi (compiled on
// first use by fot/ops/topk_ffi.py; BUILD_NOTES "top-k at 4K with a CPU FFI kernel").
//
// FotTopkSelect: scores f32 [N..., R, M], bias f32 [N..., M] -> vals f32, idx s32 [N..., R, K].
// FotTopkScoreSelect: q f32 [B, H, Q, D], keys packed in panels of 16 f32 [B, H, M / 16, D, 16] (key 16 p + c of
//   dimension e at [p, e, c]), bias f32 [B, M] -> vals f32, idx s32 [B, H, Q, K]; the scores <q, key> are computed
//   here (float32 fused multiply-adds over e = 0..D-1) and never leave the cache.
// Both: per row the K largest values v[j] = score[j] + bias[j] (bias 0 for a valid key, NEG for a masked one),
// best first, ties broken by the smaller j (the order of fot.ops.tournament.tournament_topk); slots K > M get
// (-inf, 0) as the tournament's extra rounds do. NaN scores are not supported.
//
// Per row: the maxima of groups of 32 values; the K-th largest group maximum t is a lower bound of the K-th
// largest value (K groups hold a value >= t), so only values >= t of groups whose maximum reaches t are
// candidates (~K + a few with random scores); they are ordered by one uint64 key each (value, then position).
// Rows are split into chunks shared by the calling thread and tasks on XLA's intra-op thread pool.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <vector>

#if defined(__SSE__)
#include <immintrin.h>
#endif

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

#if defined(__x86_64__) && defined(__GNUC__)
#define FOT_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))  // AVX2 + FMA where present
#else
#define FOT_CLONES
#endif

constexpr int64_t kGroup = 32;  // keys per group maximum (a multiple of 8)
constexpr int64_t kPanel = 16;  // keys per packed panel of FotTopkScoreSelect (two 8-wide vectors)
constexpr int64_t kRows = 4;    // query rows scored together by FotTopkScoreSelect

typedef float F8 __attribute__((vector_size(32)));  // GCC vector extension: 2 SSE or 1 AVX register

inline F8 Load(const float* p) {
  F8 x;
  std::memcpy(&x, p, sizeof(x));
  return x;
}

inline void Store(float* p, F8 x) { std::memcpy(p, &x, sizeof(x)); }

inline float MaxLane(F8 x) {
  float r = x[0];
  for (int t = 1; t < 8; ++t) r = x[t] > r ? x[t] : r;
  return r;
}

// Bit t set where lane t of x is >= thr.
inline unsigned GeMask(F8 x, float thr) {
#if defined(__SSE__)
  __m128 lo, hi;
  std::memcpy(&lo, &x, 16);
  std::memcpy(&hi, reinterpret_cast<const char*>(&x) + 16, 16);
  const __m128 t = _mm_set1_ps(thr);
  return static_cast<unsigned>(_mm_movemask_ps(_mm_cmpge_ps(lo, t)) | (_mm_movemask_ps(_mm_cmpge_ps(hi, t)) << 4));
#else
  unsigned bits = 0;
  for (int t = 0; t < 8; ++t) bits |= static_cast<unsigned>(x[t] >= thr) << t;
  return bits;
#endif
}

// One uint64 per candidate whose order is the selection order: the float's bits mapped to an unsigned order
// (larger value, larger key; -0.0 and +0.0 one key, as float comparison has them equal) above the complemented
// position (same value: the earlier position first).
inline uint64_t Key(float x, int64_t j) {
  if (x == 0.0f) x = 0.0f;
  uint32_t u;
  std::memcpy(&u, &x, 4);
  u = (u & 0x80000000u) ? ~u : (u | 0x80000000u);
  return (static_cast<uint64_t>(u) << 32) | (0xffffffffu - static_cast<uint32_t>(j));
}

// Scratch of one thread: values and group maxima of kRows rows, the k-th group maximum, the candidates.
struct Scratch {
  std::vector<float> v, gmax, sel;
  std::vector<uint64_t> cand;
  Scratch(int64_t m, int64_t groups) : v(kRows * m), gmax(kRows * groups), sel(groups), cand(m) {}
};

// Top-k of one row of values v [m] whose group maxima gmax [ceil(m / kGroup)] are given.
FOT_CLONES void SelectGroups(const float* v, const float* gmax, int64_t m, int64_t k, float* out_v, int32_t* out_i,
                             Scratch& w) {
  const int64_t kk = std::min(k, m);
  const int64_t full = m / kGroup, groups = (m + kGroup - 1) / kGroup;
  float thr = -INFINITY;
  if (groups >= kk && kk > 0) {
    float* sel = w.sel.data();
    std::copy(gmax, gmax + groups, sel);
    std::nth_element(sel, sel + (kk - 1), sel + groups, [](float x, float y) { return x > y; });
    thr = sel[kk - 1];
  }
  uint64_t* cand = w.cand.data();
  int64_t nc = 0;
  for (int64_t g = 0; g < full; ++g) {
    if (!(gmax[g] >= thr)) continue;
    for (int64_t j = g * kGroup; j < (g + 1) * kGroup; j += 8) {
      const F8 x = Load(v + j);
      for (unsigned bits = GeMask(x, thr); bits; bits &= bits - 1) {
        const int t = __builtin_ctz(bits);
        cand[nc++] = Key(x[t], j + t);
      }
    }
  }
  if (full < groups && gmax[full] >= thr) {
    for (int64_t j = full * kGroup; j < m; ++j) {
      if (v[j] >= thr) cand[nc++] = Key(v[j], j);
    }
  }
  if (nc > 2 * kk) std::nth_element(cand, cand + kk, cand + nc, std::greater<uint64_t>());
  std::sort(cand, cand + std::min(nc, 2 * kk), std::greater<uint64_t>());
  for (int64_t t = 0; t < kk; ++t) {
    uint32_t u = static_cast<uint32_t>(cand[t] >> 32);
    u = (u & 0x80000000u) ? (u & 0x7fffffffu) : ~u;  // Key's value mapping undone
    std::memcpy(&out_v[t], &u, 4);
    out_i[t] = static_cast<int32_t>(0xffffffffu - static_cast<uint32_t>(cand[t]));
  }
  for (int64_t t = kk; t < k; ++t) {
    out_v[t] = -INFINITY;
    out_i[t] = 0;
  }
}

// Group maxima gmax [groups] of one row of values v [m].
FOT_CLONES void GroupMax(const float* v, int64_t m, float* gmax) {
  const int64_t full = m / kGroup;
  for (int64_t g = 0; g < full; ++g) {
    F8 mx = Load(v + g * kGroup);
    for (int64_t t = 8; t < kGroup; t += 8) {
      const F8 x = Load(v + g * kGroup + t);
      mx = x > mx ? x : mx;
    }
    gmax[g] = MaxLane(mx);
  }
  if (full * kGroup < m) {
    float r = -INFINITY;
    for (int64_t j = full * kGroup; j < m; ++j) r = v[j] > r ? v[j] : r;
    gmax[full] = r;
  }
}

// v [m] = s + b (float32 adds, as XLA's).
FOT_CLONES void AddBias(const float* s, const float* b, int64_t m, float* v) {
  int64_t j = 0;
  for (; j + 8 <= m; j += 8) Store(v + j, Load(s + j) + Load(b + j));
  for (; j < m; ++j) v[j] = s[j] + b[j];
}

// Values v [rows][m] = <q_r, key_j> + bias_j for up to kRows rows q [rows][d] of one head, keys packed kp
// [m / kPanel][d][kPanel]: a kRows x kPanel block of accumulators per panel.
FOT_CLONES void ScoreRows(const float* q, int64_t rows, int64_t d, const float* kp, const float* bias, int64_t m,
                          float* v) {
  const float* q0 = q;
  const float* q1 = q + std::min<int64_t>(1, rows - 1) * d;  // missing rows repeat the last one (not stored)
  const float* q2 = q + std::min<int64_t>(2, rows - 1) * d;
  const float* q3 = q + std::min<int64_t>(3, rows - 1) * d;
  for (int64_t j = 0; j < m; j += kPanel) {
    const float* p = kp + j * d;
    F8 a00 = {}, a01 = {}, a10 = {}, a11 = {}, a20 = {}, a21 = {}, a30 = {}, a31 = {};
    for (int64_t e = 0; e < d; ++e) {
      const F8 k0 = Load(p + e * kPanel), k1 = Load(p + e * kPanel + 8);
      a00 += q0[e] * k0;
      a01 += q0[e] * k1;
      a10 += q1[e] * k0;
      a11 += q1[e] * k1;
      a20 += q2[e] * k0;
      a21 += q2[e] * k1;
      a30 += q3[e] * k0;
      a31 += q3[e] * k1;
    }
    const F8 b0 = Load(bias + j), b1 = Load(bias + j + 8);
    const F8 out[kRows][2] = {{a00, a01}, {a10, a11}, {a20, a21}, {a30, a31}};
    for (int64_t r = 0; r < rows; ++r) {
      Store(v + r * m + j, out[r][0] + b0);
      Store(v + r * m + j + 8, out[r][1] + b1);
    }
  }
}

// Runs body(item, scratch) for item in [0, items) on the calling thread and up to threads - 1 pool tasks,
// which take items from one counter (a task that starts late finds none left; the caller never waits for a
// task that has not started).
template <typename Body>
void ParallelFor(ffi::ThreadPool& pool, int64_t items, int64_t m, Body body) {
  struct State {
    std::atomic<int64_t> next{0}, done{0};
    std::mutex mu;
    std::condition_variable cv;
  };
  auto st = std::make_shared<State>();
  const int64_t groups = (m + kGroup - 1) / kGroup;
  auto run = [st, items, m, groups, body] {
    Scratch w(m, groups);
    for (int64_t i = st->next.fetch_add(1); i < items; i = st->next.fetch_add(1)) {
      body(i, w);
      if (st->done.fetch_add(1) + 1 == items) {
        std::lock_guard<std::mutex> lock(st->mu);
        st->cv.notify_all();
      }
    }
  };
  const int64_t helpers = std::min<int64_t>(std::max<int64_t>(pool.num_threads(), 1), items) - 1;
  for (int64_t t = 0; t < helpers; ++t) {
    auto task = run;
    pool.Schedule(std::move(task));
  }
  run();
  std::unique_lock<std::mutex> lock(st->mu);
  st->cv.wait(lock, [&] { return st->done.load() == items; });
}

// Rows per work item: about 4 items per thread, each of at least 64K values.
int64_t RowsPerItem(int64_t total, int64_t m, int64_t threads) {
  return std::max<int64_t>({int64_t{1}, (int64_t{1} << 16) / std::max<int64_t>(m, 1),
                            (total + 4 * threads - 1) / (4 * threads)});
}

ffi::Error SelectImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> scores, ffi::Buffer<ffi::F32> bias,
                      ffi::ResultBuffer<ffi::F32> vals, ffi::ResultBuffer<ffi::S32> idx) {
  auto sd = scores.dimensions();
  auto bd = bias.dimensions();
  auto vd = vals->dimensions();
  if (sd.size() < 2 || bd.size() != sd.size() - 1 || vd.size() != sd.size()) {
    return ffi::Error::InvalidArgument("topk_select: scores [N..., R, M], bias [N..., M], vals [N..., R, K]");
  }
  const int64_t m = sd.back(), k = vd.back(), r = sd[sd.size() - 2];
  int64_t n = 1;
  for (size_t t = 0; t + 2 < sd.size(); ++t) {
    if (bd[t] != sd[t] || vd[t] != sd[t]) return ffi::Error::InvalidArgument("topk_select: leading dims differ");
    n *= sd[t];
  }
  if (bd.back() != m || vd[vd.size() - 2] != r) return ffi::Error::InvalidArgument("topk_select: shapes");
  const int64_t total = n * r;
  if (total == 0 || k == 0) return ffi::Error::Success();
  const float* s = scores.typed_data();
  const float* b = bias.typed_data();
  float* ov = vals->typed_data();
  int32_t* oi = idx->typed_data();
  const int64_t per = RowsPerItem(total, m, std::max<int64_t>(pool.num_threads(), 1));
  ParallelFor(pool, (total + per - 1) / per, m, [=](int64_t item, Scratch& w) {
    for (int64_t row = item * per; row < std::min(total, (item + 1) * per); ++row) {
      AddBias(s + row * m, b + (row / r) * m, m, w.v.data());
      GroupMax(w.v.data(), m, w.gmax.data());
      SelectGroups(w.v.data(), w.gmax.data(), m, k, ov + row * k, oi + row * k, w);
    }
  });
  return ffi::Error::Success();
}

using F32x2 = ffi::Buffer<ffi::F32, 2>;
using F32x4 = ffi::Buffer<ffi::F32, 4>;
using F32x5 = ffi::Buffer<ffi::F32, 5>;
using OutF32x4 = ffi::ResultBuffer<ffi::F32, 4>;
using S32x4 = ffi::Buffer<ffi::S32, 4>;
using OutS32x4 = ffi::ResultBuffer<ffi::S32, 4>;

ffi::Error ScoreSelectImpl(ffi::ThreadPool pool, F32x4 q, F32x5 keys, F32x2 bias, OutF32x4 vals, OutS32x4 idx) {
  auto qd = q.dimensions();
  auto kd = keys.dimensions();
  auto bd = bias.dimensions();
  auto vd = vals->dimensions();
  const int64_t nb = qd[0], h = qd[1], nq = qd[2], d = qd[3], k = vd[3], m = kd[2] * kPanel;
  if (kd[0] != nb || kd[1] != h || kd[3] != d || kd[4] != kPanel || bd[0] != nb || bd[1] != m || vd[0] != nb ||
      vd[1] != h || vd[2] != nq) {
    return ffi::Error::InvalidArgument("topk_score_select: q [B,H,Q,D], keys [B,H,M/16,D,16], bias [B,M]");
  }
  if (nb * h * nq == 0 || k == 0) return ffi::Error::Success();
  const float* qp = q.typed_data();
  const float* kp = keys.typed_data();
  const float* b = bias.typed_data();
  float* ov = vals->typed_data();
  int32_t* oi = idx->typed_data();
  const int64_t groups = (m + kGroup - 1) / kGroup;
  const int64_t blocks = (nq + kRows - 1) / kRows;  // items: (batch, head, kRows query rows)
  ParallelFor(pool, nb * h * blocks, m, [=](int64_t item, Scratch& w) {
    const int64_t bh = item / blocks, r0 = (item % blocks) * kRows, rows = std::min(kRows, nq - r0);
    ScoreRows(qp + (bh * nq + r0) * d, rows, d, kp + bh * m * d, b + (bh / h) * m, m, w.v.data());
    for (int64_t t = 0; t < rows; ++t) {
      const int64_t row = bh * nq + r0 + t;
      GroupMax(w.v.data() + t * m, m, w.gmax.data());
      SelectGroups(w.v.data() + t * m, w.gmax.data(), m, k, ov + row * k, oi + row * k, w);
    }
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(FotTopkSelect, SelectImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(FotTopkScoreSelect, ScoreSelectImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<F32x4>()
                                  .Arg<F32x5>()
                                  .Arg<F32x2>()
                                  .Ret<F32x4>()
                                  .Ret<S32x4>());

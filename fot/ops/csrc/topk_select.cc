// Exact top-k selection over kept float32 scores: the XLA:CPU FFI kernel of fot.ops.topk_ffi (built on first
// use by fot/ops/topk_ffi.py; see BUILD_NOTES "top-k at 4K with a CPU FFI kernel").
//
// Inputs: scores f32 [N, R, M], bias f32 [N, M] (0 for a valid key, NEG for a masked one; N may be several
// leading dims, flattened). Outputs: vals f32 [N, R, K], idx s32 [N, R, K]: per row the K largest
// v[j] = scores[j] + bias[j] (float32 add, as XLA computes it), best first, ties broken by the smaller j
// (the order of fot.ops.tournament.tournament_topk); slots K > M get (-inf, 0) as the tournament's extra
// rounds do. NaN scores are not supported (a NaN is never selected after the first K keys).
//
// Per row: a min-heap of the K best (value, index) pairs seen so far, its root the worst; keys are read in
// blocks of 16 and a block is skipped when no value in it beats the root's value (a vectorised compare:
// with random scores only ~K ln(M / K) keys are ever inserted). Rows are split into chunks shared by the
// calling thread and tasks on XLA's intra-op thread pool.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <condition_variable>
#include <vector>

#if defined(__SSE__)
#include <immintrin.h>
#endif

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

struct Item {
  float v;
  int32_t i;
};

// a is a worse selection than b: smaller value, or the same value at a later position.
inline bool Worse(const Item& a, const Item& b) { return a.v < b.v || (a.v == b.v && a.i > b.i); }

inline bool Better(const Item& a, const Item& b) { return Worse(b, a); }

constexpr int64_t kGroup = 32;  // a multiple of 8

typedef float F8 __attribute__((vector_size(32)));  // GCC vector extension: 2 SSE or 1 AVX register

inline F8 Load(const float* p) {
  F8 x;
  std::memcpy(&x, p, sizeof(x));
  return x;
}

inline void Store(float* p, F8 x) { std::memcpy(p, &x, sizeof(x)); }

// Scratch of one thread: the row's values, its group maxima, the candidates.
struct Scratch {
  std::vector<float> gmax, sel;
  std::vector<uint64_t> cand;
};

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

inline float MaxLane(F8 x) {
  float r = x[0];
  for (int t = 1; t < 8; ++t) r = x[t] > r ? x[t] : r;
  return r;
}

// One uint64 per candidate whose order is the selection order: the float's bits mapped to an unsigned order
// (larger value, larger key; -0.0 below +0.0, which float comparison calls equal: not met by s + b sums of
// scores other than exact zeros) above the complemented position (same value: the earlier position first).
inline uint64_t Key(float x, int64_t j) {
  if (x == 0.0f) x = 0.0f;  // -0.0 == +0.0: one key
  uint32_t u;
  std::memcpy(&u, &x, 4);
  u = (u & 0x80000000u) ? ~u : (u | 0x80000000u);
  return (static_cast<uint64_t>(u) << 32) | (0xffffffffu - static_cast<uint32_t>(j));
}

#if defined(__x86_64__) && defined(__GNUC__)
#define FOT_CLONES __attribute__((target_clones("avx2", "default")))  // AVX2 where the CPU has it (ifunc)
#else
#define FOT_CLONES
#endif

FOT_CLONES void SelectRow(const float* s, const float* b, int64_t m, int64_t k, float* out_v, int32_t* out_i, Scratch& w) {
  const int64_t kk = std::min(k, m);
  const int64_t full = m / kGroup, groups = (m + kGroup - 1) / kGroup;
  float* gmax = w.gmax.data();
  // pass 1: the maximum of every group of kGroup values s + b (8-wide vectors)
  for (int64_t g = 0; g < full; ++g) {
    const float* sg = s + g * kGroup;
    const float* bg = b + g * kGroup;
    F8 mx = Load(sg) + Load(bg);
    for (int64_t j = 8; j < kGroup; j += 8) {
      F8 x = Load(sg + j) + Load(bg + j);
      mx = x > mx ? x : mx;
    }
    gmax[g] = MaxLane(mx);
  }
  if (full < groups) {  // a last, partial group
    float r = -INFINITY;
    for (int64_t j = full * kGroup; j < m; ++j) r = std::max(r, s[j] + b[j]);
    gmax[full] = r;
  }
  // the kk-th largest group maximum is a lower bound of the kk-th largest value (kk groups hold a value >= it)
  float thr = -INFINITY;
  if (groups >= kk) {
    float* sel = w.sel.data();
    std::copy(gmax, gmax + groups, sel);
    std::nth_element(sel, sel + (kk - 1), sel + groups, [](float x, float y) { return x > y; });
    thr = sel[kk - 1];
  }
  // pass 2: every value >= thr of the groups whose maximum reaches thr, as (value, position) sort keys
  uint64_t* cand = w.cand.data();
  int64_t nc = 0;
  for (int64_t g = 0; g < full; ++g) {
    if (!(gmax[g] >= thr)) continue;
    for (int64_t j = g * kGroup; j < (g + 1) * kGroup; j += 8) {
      F8 x = Load(s + j) + Load(b + j);
      for (unsigned bits = GeMask(x, thr); bits; bits &= bits - 1) {
        const int t = __builtin_ctz(bits);
        cand[nc++] = Key(x[t], j + t);
      }
    }
  }
  if (full < groups && gmax[full] >= thr) {
    for (int64_t j = full * kGroup; j < m; ++j) {
      const float x = s[j] + b[j];
      if (x >= thr) cand[nc++] = Key(x, j);
    }
  }
  if (nc > 2 * kk) std::nth_element(cand, cand + kk, cand + nc, std::greater<uint64_t>());
  std::sort(cand, cand + std::min(nc, 2 * kk), std::greater<uint64_t>());
  for (int64_t t = 0; t < kk; ++t) {
    uint32_t u = static_cast<uint32_t>(cand[t] >> 32);
    u = (u & 0x80000000u) ? (u & 0x7fffffffu) : ~u;  // inverse of Key's value mapping
    std::memcpy(&out_v[t], &u, 4);
    out_i[t] = static_cast<int32_t>(0xffffffffu - static_cast<uint32_t>(cand[t]));
  }
  for (int64_t t = kk; t < k; ++t) {
    out_v[t] = -INFINITY;
    out_i[t] = 0;
  }
}

struct Job {
  const float* s;
  const float* b;
  float* vals;
  int32_t* idx;
  int64_t rows_per_batch, m, k, total_rows, chunk, num_chunks;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
  std::mutex mu;
  std::condition_variable cv;

  void RunChunks() {
    Scratch w;
    w.gmax.resize((m + kGroup - 1) / kGroup);
    w.sel.resize(w.gmax.size());
    w.cand.resize(m);
    while (true) {
      int64_t c = next.fetch_add(1);
      if (c >= num_chunks) return;
      int64_t r1 = std::min(total_rows, (c + 1) * chunk);
      for (int64_t r = c * chunk; r < r1; ++r) {
        const int64_t n = r / rows_per_batch;
        SelectRow(s + r * m, b + n * m, m, k, vals + r * k, idx + r * k, w);
      }
      if (done.fetch_add(1) + 1 == num_chunks) {
        std::lock_guard<std::mutex> lock(mu);
        cv.notify_all();
      }
    }
  }
};

ffi::Error TopkSelectImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> scores, ffi::Buffer<ffi::F32> bias,
                          ffi::ResultBuffer<ffi::F32> vals, ffi::ResultBuffer<ffi::S32> idx) {
  auto sd = scores.dimensions();
  auto bd = bias.dimensions();
  auto vd = vals->dimensions();
  if (sd.size() < 2 || bd.size() != sd.size() - 1 || vd.size() != sd.size()) {
    return ffi::Error::InvalidArgument("topk_select: scores [N..., R, M], bias [N..., M], vals [N..., R, K]");
  }
  const int64_t m = sd.back();
  const int64_t k = vd.back();
  const int64_t r = sd[sd.size() - 2];
  int64_t n = 1;
  for (size_t t = 0; t + 2 < sd.size(); ++t) {
    if (bd[t] != sd[t] || vd[t] != sd[t]) return ffi::Error::InvalidArgument("topk_select: leading dims differ");
    n *= sd[t];
  }
  if (bd.back() != m || vd[vd.size() - 2] != r) return ffi::Error::InvalidArgument("topk_select: shapes");
  const int64_t total = n * r;
  if (total == 0 || k == 0) return ffi::Error::Success();
  auto job = std::make_shared<Job>();
  job->s = scores.typed_data();
  job->b = bias.typed_data();
  job->vals = vals->typed_data();
  job->idx = idx->typed_data();
  job->rows_per_batch = r;
  job->m = m;
  job->k = k;
  job->total_rows = total;
  // four chunks per thread (threads that start late find fewer left), at least 64K scores each
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  job->chunk = std::max<int64_t>({int64_t{1}, (int64_t{1} << 16) / std::max<int64_t>(m, 1),
                                  (total + 4 * threads - 1) / (4 * threads)});
  job->num_chunks = (total + job->chunk - 1) / job->chunk;
  const int64_t helpers = std::min<int64_t>(threads, job->num_chunks) - 1;
  for (int64_t t = 0; t < helpers; ++t) pool.Schedule([job] { job->RunChunks(); });
  job->RunChunks();  // the caller takes chunks too: it never waits for a task that has not started
  std::unique_lock<std::mutex> lock(job->mu);
  job->cv.wait(lock, [&] { return job->done.load() == job->num_chunks; });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(FotTopkSelect, TopkSelectImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>());

// CPU log-probs + entropy (+ Σπ²) and their backward, with truncated sampling (top-k, top-p,
// min-p): rows in parallel (OpenMP), inner loops over the vocabulary vectorised (omp simd;
// softmax_exp is the branch-free exp_fast on the CPU). fp32, bf16 and fp16 storage; 16-bit values
// are converted in registers. A row's result does not depend on any other row. The per-element
// and per-row math is logprob_math.h's, shared with the CUDA kernels. CAP selects the softcapped
// logit transform (a tanh per logit); without it z' = scale·z.
//
// Passes over a row of V logits (b bytes each; after the first the row is in L2):
//   no truncation, or a given threshold: 2 passes, 2·V·b bytes read
//     1. max of the raw logits;  2. s = Σ e, t = Σ e·(z'−m), q = Σ e² over K = {z >= threshold},
//        e = e^(z'−m) (the target added on its own when outside K).
//   min_p alone: 3 passes, 3·V·b bytes: the max, min_p's bound (no exp), the sums of pass 2 above.
//   top_p alone (min_p maybe): 4 passes over the row, V·b + 4·V bytes written, ~3·V·b + 8·V read
//   (for 16-bit logits the fp32 values are also written once, 4·V, and read instead of the row):
//     1. max (V·b);  2. e = e^(z'−m) (0 where min_p drops) into a per-thread scratch (V·b read,
//        4·V written);  3. the masses G_j = Σ e·[z >= c_j] at kRowCutoffs = 8 cutoffs 1 nat apart
//        below the max, all in one pass (V·b + 4·V read; AVX-512: one compare and one masked add
//        per cutoff and 16 entries): the first G_j >= top_p·Z brackets the boundary [c_j, c_{j−1});
//        a vectorised compress copies that bracket's entries (z, e) out (V·b + 4·V read, 8 bytes
//        per entry taken), and passes of 16 cutoffs over those alone narrow it 17x each until at
//        most kFinishMax entries are left, which are sorted: the exact value, ties included;
//     4. s, t, q over K, a pass over the logits and e (V·b + 4·V bytes).
//     (randn·2 rows, V = 32000, top_p 0.8: ~3000 entries after pass 3's cutoffs, then 2 passes
//     over those, ~200 and ~15 entries.)
//   top_k searched (with top_p and min_p maybe): passes over the logits and a per-thread scratch
//   of V fp32 e and V uint16 bucket slots (written once: 6·V bytes):
//     1. max (V·b);  2. e and the slot of d = z'−m (kBucketsPerNat buckets per nat from the top,
//        d < −kRangeNats in the tail, min_p's dropped apart) (V·b read, 6·V written);
//     3. a sample of every kSample-th entry guesses the boundary's bucket; the histogram (count
//        and mass per bucket, a scalar scatter) then takes only the entries of the buckets around
//        the guess plus a margin (a 32-entry AVX-512 compare per step over the slots: 2·V bytes,
//        plus 6 bytes per entry taken), the rest summed into stand-in buckets (from pass 2's
//        totals); if the boundary falls in a stand-in, the histogram is made over every entry;
//     then top_k's boundary bucket is where the count from the top reaches k, and top_p's (when
//     on) where the mass from the top reaches top_p·Z over top_k's set; only that bucket's
//     entries are gathered (a slot scan, 2·V bytes) and sorted to find the exact value, ties
//     included;
//     4. s, t, q over K: over the entries of the kept buckets only when they are few (a slot
//        scan), else a pass over the logits and e (V·b + 4·V bytes).
// No row is sorted: the sorts are of one bucket's or bracket's entries (all of the row only if
// they cannot be told apart, e.g. a row of equal logits, or a top-k boundary more than kRangeNats
// below the max: correct, and slower).
#include <algorithm>
#include <atomic>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif
#include <cmath>
#include <limits>
#include <vector>

#include "../kernels.h"
#include "../logprob_math.h"

namespace gk {
namespace cpu {
namespace {

constexpr int64_t kBlock = 2048;
// Below this many logits a call runs on one thread: an OpenMP region costs microseconds on a quiet
// machine and a scheduler quantum on a busy one, more than the work it would split.
constexpr int64_t kParallelElements = int64_t{1} << 17;

// The histogram over d = z' − max z' <= 0: bucket i holds d in (−(i+1)/W, −i/W], W buckets per nat,
// down to −kRangeNats; below that the tail bucket kTail; entries min_p drops are not counted. The
// bucket number never increases with z (d does not decrease), so each bucket is an interval of values.
// An entry's slot is its bucket, but tail and dropped entries spread over kSpread slots each (by
// v mod kSpread): the scatter's updates of one slot then do not wait on each other.
constexpr float kBucketsPerNat = 32.f;
constexpr int kRangeNats = 32;
constexpr int kTail = static_cast<int>(kBucketsPerNat) * kRangeNats;
constexpr int kSpread = 8;
constexpr int kDroppedSlot = kTail + kSpread;
constexpr int kSlots = kDroppedSlot + kSpread;
constexpr float kInf = std::numeric_limits<float>::infinity();

inline int slot_of(float d, float log_min_p, int64_t v) {
  const float x = -d * kBucketsPerNat;  // >= 0; +inf for a −inf logit
  const int spread = static_cast<int>(v & (kSpread - 1));
  const int b = x < float(kTail) ? static_cast<int>(x) : kTail + spread;
  return min_p_keeps(d, log_min_p) ? b : kDroppedSlot + spread;
}

struct Candidate {
  float z, e;  // raw logit, e^(z' − m)
};

// A thread's scratch for the threshold search, reused across its rows. count and mass are per
// slot; after the scatter, bucket kTail holds the tail's totals.
struct Workspace {
  std::vector<float> e, z;  // z: the raw logits as fp32 (top_p's search of 16-bit rows)
  std::vector<float> cz, ce;  // top_p's search: the entries of its bracket
  std::vector<uint16_t> slot;
  std::vector<int32_t> count;
  std::vector<double> mass;
  std::vector<Candidate> cand;
};

template <int DT, bool CAP>
struct Row {
  using S = Storage<DT>;
  const typename S::T* p;
  LogitTransform f;
  float raw(int64_t v) const { return S::load(p[v]); }
  float prime(int64_t v) const { return transform_logit<CAP>(S::load(p[v]), f); }
};

// The largest raw logit of a row (the transform is increasing: its z' is the largest z'), or NaN
// when the row holds a NaN: such a row skips the threshold search (which would drop the NaN
// silently) and its sums over every kept entry, the NaN included (in_kept), come out NaN.
template <int DT, bool CAP>
float row_max(const Row<DT, CAP>& row, int64_t V) {
  float m = -kInf;
  int any_nan = 0;
#pragma omp simd reduction(max : m) reduction(| : any_nan)
  for (int64_t v = 0; v < V; ++v) {
    const float z = row.raw(v);
    m = z > m ? z : m;  // a ternary vectorises; fmaxf (NaN rules) does not without -ffast-math
    any_nan |= z != z;
  }
  return any_nan ? std::numeric_limits<float>::quiet_NaN() : m;
}

// s, t, q over the entries with z >= threshold, about `shift`. fp32 blocks of kBlock entries merge
// into fp64 totals. HAVE_E: the row's e^(z'−shift) are in `e` (the search computed them), else
// computed here; MASK: some entry may be dropped (a finite threshold); WITH_T, WITH_Q: whether t and
// q are needed. Each choice is a template argument so that the vectorised loop does only its work:
// the exp loop is compute-bound once the row is in cache.
template <bool HAVE_E, bool MASK, bool WITH_T, bool WITH_Q, int DT, bool CAP>
RowStats<double> kept_sums(const Row<DT, CAP>& row, int64_t V, float shift, float threshold, const float* e) {
  RowStats<double> total{shift, 0.0, 0.0, 0.0};
  const auto* __restrict p = row.p;
  const LogitTransform f = row.f;
  for (int64_t v0 = 0; v0 < V; v0 += kBlock) {
    const int64_t v1 = v0 + kBlock < V ? v0 + kBlock : V;
    float s = 0.f, t = 0.f, q = 0.f;
#pragma omp simd reduction(+ : s, t, q)
    for (int64_t v = v0; v < v1; ++v) {
      const float z = Storage<DT>::load(p[v]), d = transform_logit<CAP>(z, f) - shift;
      const SoftmaxTerm k = kept_term(HAVE_E ? e[v] : softmax_exp(d), d, !MASK || in_kept(z, threshold));
      s += k.e;
      if (WITH_T) t += k.ed;
      if (WITH_Q) q += k.e * k.e;
    }
    total.merge(RowStats<float>{shift, s, t, q});
  }
  return total;
}

// kept_sums with the flags as runtime values.
template <bool HAVE_E, int DT, bool CAP>
RowStats<double> kept_sums(const Row<DT, CAP>& row, int64_t V, float shift, float threshold, const float* e,
                           bool with_t, bool with_q) {
  const bool mask = threshold > -kInf;
#define GK_KEPT_SUMS(M, T, Q) kept_sums<HAVE_E, M, T, Q>(row, V, shift, threshold, e)
  if (mask) {
    if (with_t) return with_q ? GK_KEPT_SUMS(true, true, true) : GK_KEPT_SUMS(true, true, false);
    return with_q ? GK_KEPT_SUMS(true, false, true) : GK_KEPT_SUMS(true, false, false);
  }
  if (with_t) return with_q ? GK_KEPT_SUMS(false, true, true) : GK_KEPT_SUMS(false, true, false);
  return with_q ? GK_KEPT_SUMS(false, false, true) : GK_KEPT_SUMS(false, false, false);
#undef GK_KEPT_SUMS
}

// fn(v) for every entry v with in(v), in order: a 32-bit mask of a block of entries at a time
// (a vectorised test), then one step per set bit, so entries not taken cost a fraction of a cycle.
constexpr int64_t kScan = 32;
template <typename In, typename Fn>
void for_each_where(int64_t V, In in, Fn fn) {
  int64_t v0 = 0;
  for (; v0 + kScan <= V; v0 += kScan) {
    uint32_t hits = 0;
#pragma omp simd reduction(| : hits)
    for (int i = 0; i < kScan; ++i) hits |= static_cast<uint32_t>(in(v0 + i)) << i;
    for (; hits; hits &= hits - 1) fn(v0 + __builtin_ctz(hits));
  }
  for (int64_t v = v0; v < V; ++v)
    if (in(v)) fn(v);
}

// fn(v) for every entry v whose slot is in [lo, lo + width), in order (one AVX-512 compare per 32 slots).
template <typename Fn>
void for_each_in_slots(const uint16_t* __restrict slot, int64_t V, unsigned lo, unsigned width, Fn fn) {
#if defined(__AVX512BW__)
  int64_t v0 = 0;
  for (; v0 + kScan <= V; v0 += kScan) {
    const __m512i x = _mm512_sub_epi16(_mm512_loadu_si512(slot + v0), _mm512_set1_epi16(static_cast<short>(lo)));
    uint32_t hits = _mm512_cmplt_epu16_mask(x, _mm512_set1_epi16(static_cast<short>(width)));
    for (; hits; hits &= hits - 1) fn(v0 + __builtin_ctz(hits));
  }
  for (int64_t v = v0; v < V; ++v)
    if (slot[v] - lo < width) fn(v);
#else
  for_each_where(V, [=](int64_t v) { return slot[v] - lo < width; }, fn);
#endif
}

void sort_largest_first(std::vector<Candidate>& cand) {
  std::sort(cand.begin(), cand.end(), [](const Candidate& a, const Candidate& c) { return a.z > c.z; });
}

// The entries of bucket b, largest first.
template <int DT, bool CAP>
void gather(const Row<DT, CAP>& row, int64_t V, int b, Workspace& w) {
  w.cand.clear();
  const float* e = w.e.data();
  for_each_in_slots(w.slot.data(), V, static_cast<unsigned>(b), b == kTail ? kSpread : 1,
                    [&](int64_t v) { w.cand.push_back({row.raw(v), e[v]}); });
  sort_largest_first(w.cand);
}

// top_p's exact finish on the entries of its boundary's bracket (cand, largest first), `before`
// the mass of the entries above them: tie group by group, the smallest value still kept.
void top_p_finish(const std::vector<Candidate>& cand, double before, double limit, float& threshold) {
  for (size_t i = 0; i < cand.size() && above_keeps(before, limit);) {
    threshold = cand[i].z;
    for (; i < cand.size() && cand[i].z == threshold; ++i) before += cand[i].e;
  }
}

// What pass 2 finds besides e and the slots: the smallest raw logit min_p keeps (the row's minimum
// when min_p is off), how many entries it keeps and their mass.
struct Kept1 {
  float min_z;
  int64_t count;
  double mass;
};

// Pass 2 (see the header): e^(z'−m) of every entry into the workspace and, with SLOTS (top_k's
// search), its slot; without (top_p's), e = 0 where min_p drops the entry (it adds no mass), and the
// raw logits as fp32 when they are stored in 16 bits (the cutoff passes then read fp32 only).
template <bool SLOTS, int DT, bool CAP>
Kept1 exp_and_slots(const Row<DT, CAP>& row, int64_t V, float m, float log_min_p, Workspace& w) {
  float* __restrict e = w.e.data();
  uint16_t* __restrict slot = w.slot.data();
  float* __restrict raw = w.z.data();
  const auto* __restrict p = row.p;
  const LogitTransform f = row.f;  // a local copy: the stores above cannot alias it, so it stays in registers
  Kept1 k{kInf, 0, 0.0};
  for (int64_t v0 = 0; v0 < V; v0 += kBlock) {
    const int64_t v1 = v0 + kBlock < V ? v0 + kBlock : V;
    float min_z = kInf, mass = 0.f;
    int count = 0;
#pragma omp simd reduction(min : min_z) reduction(+ : mass, count)
    for (int64_t v = v0; v < v1; ++v) {
      const float z = Storage<DT>::load(p[v]), d = transform_logit<CAP>(z, f) - m;
      const int s = SLOTS ? slot_of(d, log_min_p, v) : 0;
      const bool kept = SLOTS ? s < kDroppedSlot : min_p_keeps(d, log_min_p);
      const float ev = softmax_exp(d);  // unconditional: a call under a condition does not vectorise
      e[v] = SLOTS || kept ? ev : 0.f;
      if (SLOTS) slot[v] = static_cast<uint16_t>(s);
      if (!SLOTS && DT != DT_FLOAT32) raw[v] = z;
      min_z = kept && z < min_z ? z : min_z;
      mass += kept ? ev : 0.f;
      count += kept;
    }
    k.min_z = min_z < k.min_z ? min_z : k.min_z;
    k.count += count;
    k.mass += mass;
  }
  return k;
}

// The tail's slots into bucket kTail.
void fold_tail(Workspace& w) {
  for (int i = 1; i < kSpread; ++i) {
    w.count[kTail] += w.count[kTail + i];
    w.mass[kTail] += w.mass[kTail + i];
  }
}

// Where top_k's boundary can be (top_k's search only; top_p alone has its own, top_p_threshold):
// from every kSample-th entry, the buckets [lo, hi) around where the sample's count from the top
// passes k (3 standard deviations and 4 entries to spare either way, widened by kSpareBuckets); no
// lower end when top_p follows (its boundary may lie above top_k's). hi beyond kTail: to the end of
// the row. A wrong guess costs time, never correctness (the stand-in buckets of histogram()).
constexpr int64_t kSample = 16;
constexpr int kSpareBuckets = static_cast<int>(kBucketsPerNat) / 4;
std::atomic<int64_t> g_whole_row_fallbacks{0};  // for tests (whole_row_fallbacks): the sample's misses

struct Window {
  int lo, hi;
};

Window sampled_window(int64_t V, const Truncation& tr, Workspace& w) {
  std::fill(w.count.begin(), w.count.end(), 0);
  for (int64_t v = 0; v < V; v += kSample) ++w.count[w.slot[v]];
  for (int i = 1; i < kSpread; ++i) w.count[kTail] += w.count[kTail + i];
  const double k = static_cast<double>(tr.top_k) / kSample;
  const double need_lo = tr.top_p < 1.f ? 0.0 : k - 3.0 * std::sqrt(k) - 4.0;
  const double need_hi = k + 3.0 * std::sqrt(k) + 4.0;
  Window win{0, kTail + 1};
  double cum = 0.0;
  bool lo_found = !(need_lo > 0.0);
  for (int b = 0; b <= kTail; ++b) {
    cum += static_cast<double>(w.count[b]);
    if (!lo_found && cum >= need_lo) {
      lo_found = true;
      win.lo = b - kSpareBuckets > 0 ? b - kSpareBuckets : 0;
    }
    if (cum >= need_hi && cum > 0.0) {
      win.hi = b + 1 + kSpareBuckets;
      break;
    }
  }
  return win;
}

// Pass 3: count and mass per bucket (only what the active steps read). win.hi <= kTail: only the
// entries of buckets [win.lo, win.hi) one by one; bucket win.hi then holds the totals of the
// others below, and bucket win.lo − 1 (when win.lo > 0) those above, summed in a vectorised loop:
// stand-ins the boundary must not fall in. Otherwise every entry; with min_p on, blocks of
// entries it all drops are skipped.
void histogram(int64_t V, const Truncation& tr, const Kept1& k1, Window win, Workspace& w) {
  constexpr int64_t kSkip = 32;
  const bool counts = tr.top_k > 0, masses = tr.top_p < 1.f, skip = tr.log_min_p > -kInf;
  const float* __restrict e = w.e.data();
  const uint16_t* __restrict slot = w.slot.data();
  int32_t* __restrict count = w.count.data();
  double* __restrict mass = w.mass.data();
  std::fill(w.count.begin(), w.count.end(), 0);
  std::fill(w.mass.begin(), w.mass.end(), 0.0);
  if (win.hi <= kTail) {
    const int lo = win.lo, hi = win.hi;
    for_each_in_slots(slot, V, static_cast<unsigned>(lo), static_cast<unsigned>(hi - lo), [&](int64_t v) {
      ++count[slot[v]];
      mass[slot[v]] += e[v];
    });
    if (lo > 0) {
      for (int64_t v0 = 0; v0 < V; v0 += kBlock) {
        const int64_t v1 = v0 + kBlock < V ? v0 + kBlock : V;
        float m = 0.f;
        int n = 0;
#pragma omp simd reduction(+ : m, n)
        for (int64_t v = v0; v < v1; ++v) {
          const bool above = slot[v] < lo;
          m += above ? e[v] : 0.f;
          n += above;
        }
        count[lo - 1] += n;
        mass[lo - 1] += m;
      }
    }
    int64_t n = 0;
    double m = 0.0;
    for (int b = 0; b < hi; ++b) {
      n += count[b];
      m += mass[b];
    }
    count[hi] = static_cast<int32_t>(k1.count - n);
    mass[hi] = k1.mass - m;
    return;
  }
  // fp32 partial masses (shorter store-to-load chains than fp64), added into fp64 every kBlock entries.
  float part[kSlots];
  for (int64_t v0 = 0; v0 < V; v0 += kBlock) {
    const int64_t v1 = v0 + kBlock < V ? v0 + kBlock : V;
    std::fill(part, part + kSlots, 0.f);
    for (int64_t u0 = v0; u0 < v1; u0 += kSkip) {
      const int64_t u1 = u0 + kSkip < v1 ? u0 + kSkip : v1;
      if (skip) {
        int kept = 0;
#pragma omp simd reduction(| : kept)
        for (int64_t v = u0; v < u1; ++v) kept |= slot[v] < kDroppedSlot;
        if (!kept) continue;
      }
      if (counts && masses) {
        for (int64_t v = u0; v < u1; ++v) {
          ++count[slot[v]];
          part[slot[v]] += e[v];
        }
      } else if (counts) {
        for (int64_t v = u0; v < u1; ++v) ++count[slot[v]];
      } else {
        for (int64_t v = u0; v < u1; ++v) part[slot[v]] += e[v];
      }
    }
    for (int b = 0; b < kDroppedSlot; ++b) mass[b] += part[b];
  }
  fold_tail(w);
}

// top_k, then top_p, on the histogram over buckets [0, last]; threshold holds min_p's and gets the
// final one. False when the boundary falls in a stand-in bucket (bucket `last` when `stand_in`,
// bucket `upper` when >= 0): the histogram must then be made over the whole row.
template <int DT, bool CAP>
bool thresholds(const Row<DT, CAP>& row, int64_t V, const Truncation& tr, int last, bool stand_in, int upper,
                Workspace& w, float& threshold) {
  // The kept set so far is an upper set of values: buckets [0, last), and bucket `last` either
  // whole or (restricted) only its entries in w.cand.
  bool restricted = false;
  if (tr.top_k > 0) {
    int64_t above = 0;
    for (int b = 0; b <= last; ++b) {
      if (w.count[b] == 0) continue;
      if (!above_keeps(static_cast<double>(above + w.count[b]), static_cast<double>(tr.top_k))) {
        if ((stand_in && b == last) || b == upper) return false;
        gather(row, V, b, w);  // the k-th largest is in bucket b: cand[top_k − above − 1]
        threshold = w.cand[static_cast<size_t>(tr.top_k - above - 1)].z;
        size_t n = static_cast<size_t>(tr.top_k - above);
        while (n < w.cand.size() && w.cand[n].z == threshold) ++n;  // its ties stay
        w.cand.resize(n);
        last = b;
        restricted = true;
        break;
      }
      above += w.count[b];
    }
  }
  if (tr.top_p < 1.f) {
    auto mass_of = [&](int b) {
      if (!(restricted && b == last)) return w.mass[b];
      double sum = 0.0;
      for (const Candidate& c : w.cand) sum += c.e;
      return sum;
    };
    double total = 0.0;
    for (int b = 0; b <= last; ++b) total += mass_of(b);
    const double limit = static_cast<double>(tr.top_p) * total;
    // The boundary bucket: the first whose mass brings the mass from the top to the limit (the
    // last one with mass if rounding never gets there); `before` is the mass above it. Its
    // entries then decide tie group by group, largest first.
    double above = 0.0, before = 0.0;
    int boundary = -1;
    for (int b = 0; b <= last; ++b) {
      const double mb = mass_of(b);
      if (!(mb > 0.0)) continue;
      boundary = b;
      before = above;
      above += mb;
      if (!above_keeps(above, limit)) break;
    }
    if (boundary >= 0) {
      if (!(restricted && boundary == last)) {
        if ((stand_in && boundary == last) || boundary == upper) return false;
        gather(row, V, boundary, w);
      }
      top_p_finish(w.cand, before, limit, threshold);
    }
  }
  return true;
}

// A searched threshold, and the slots [0, slots) that hold every entry it keeps when those are few
// (at most V / kSparse; 0 when they are many or their number is not known).
struct Searched {
  float threshold;
  unsigned slots;
};
constexpr int64_t kSparse = 8;

// Finds the threshold of a row (the smallest kept raw logit) without sorting it: see the header.
// m is the row's max z' (finite). Leaves e^(z'−m) and the slots in the workspace for kept_sums.
template <int DT, bool CAP>
Searched search_threshold(const Row<DT, CAP>& row, int64_t V, float m, const Truncation& tr, Workspace& w) {
  const Kept1 k1 = exp_and_slots<true>(row, V, m, tr.log_min_p, w);
  float threshold = k1.min_z;  // min_p's
  const Window win = sampled_window(V, tr, w);
  histogram(V, tr, k1, win, w);
  const bool windowed = win.hi <= kTail;
  if (!thresholds(row, V, tr, windowed ? win.hi : kTail, windowed, windowed ? win.lo - 1 : -1, w, threshold)) {
    threshold = k1.min_z;  // the sample misled us: the whole row
    g_whole_row_fallbacks.fetch_add(1, std::memory_order_relaxed);
    histogram(V, tr, k1, Window{0, kTail + 1}, w);
    thresholds(row, V, tr, kTail, false, -1, w, threshold);
  }
  if (tr.top_k <= 0) return {threshold, 0u};  // no counts
  const int b = slot_of(transform_logit<CAP>(threshold, row.f) - m, -kInf, 0);  // the threshold's bucket
  int64_t n = 0;
  for (int i = 0; i <= b && i <= kTail; ++i) n += w.count[i];
  return {threshold, n * kSparse <= V ? static_cast<unsigned>(b < kTail ? b + 1 : kTail + kSpread) : 0u};
}

// ---- top_p alone: its bound by cutoff passes (no histogram, no scatter).
// A pass tests several cutoffs c_0 > c_1 > ... at once: G_j = Σ e·[z >= c_j]. G(c) < limit means
// the entry just below c is kept, so the threshold is below c; G(c) >= limit, that every entry below
// c is dropped: the threshold lies in [c_j, c_{j−1}) for the first j with G_j >= limit.
//   The first pass is over the row: kRowCutoffs cutoffs kRowStepNats apart below the max (z'), in
// registers (AVX-512: 16 entries in the lanes, one compare and one masked add per cutoff). The
// entries of the bracket it leaves are then gathered (z, e), and each later pass is over those only,
// kCutoffs cutoffs evenly spaced in the bracket, keeping the entries of the new bracket, until at
// most kFinishMax are left: they are sorted and top_p_finish decides, ties included. Comparisons are
// on the raw logit (fp32), so every bracket is a set of values whatever the transform's rounding.
constexpr int kRowCutoffs = 8;
constexpr float kRowStepNats = 1.f;
constexpr int kCutoffs = 16;
constexpr int64_t kFinishMax = 64;
constexpr int kMaxCutoffPasses = 8;

// G[j] = Σ_v e[v]·[z[v] >= c[j]] over a row, fp32 lanes added into fp64 every kBlock entries.
template <int J>
void row_masses_at(const float* __restrict z, const float* __restrict e, int64_t V, const float* c, double* G) {
  std::fill(G, G + J, 0.0);
  for (int64_t v0 = 0; v0 < V; v0 += kBlock) {
    const int64_t v1 = v0 + kBlock < V ? v0 + kBlock : V;
#if defined(__AVX512F__)
    __m512 cut[J], acc[J];
    for (int j = 0; j < J; ++j) {
      cut[j] = _mm512_set1_ps(c[j]);
      acc[j] = _mm512_setzero_ps();
    }
    auto add = [&](__m512 zv, __m512 ev) {
#pragma GCC unroll 16
      for (int j = 0; j < J; ++j)
        acc[j] = _mm512_mask_add_ps(acc[j], _mm512_cmp_ps_mask(zv, cut[j], _CMP_GE_OQ), acc[j], ev);
    };
    int64_t v = v0;
    for (; v + 16 <= v1; v += 16) add(_mm512_loadu_ps(z + v), _mm512_loadu_ps(e + v));
    if (v < v1) {  // the last few: masked loads (e = 0 beyond the end adds nothing)
      const __mmask16 in = static_cast<__mmask16>((1u << (v1 - v)) - 1u);
      add(_mm512_maskz_loadu_ps(in, z + v), _mm512_maskz_loadu_ps(in, e + v));
    }
    for (int j = 0; j < J; ++j) G[j] += _mm512_reduce_add_ps(acc[j]);
#else
    float acc[J] = {};
    for (int64_t v = v0; v < v1; ++v) {
      const float zv = z[v], ev = e[v];
#pragma omp simd
      for (int j = 0; j < J; ++j) acc[j] += zv >= c[j] ? ev : 0.f;
    }
    for (int j = 0; j < J; ++j) G[j] += acc[j];
#endif
  }
}

// The bracket [lo, hi) that holds the threshold; `above` is the mass of the entries >= hi (< limit).
struct Bracket {
  float lo, hi;
  double above;

  // Narrows to the cutoff bracket that holds the threshold (c descending, G their masses counted
  // from `base`); false when nothing changed (the cutoffs no longer split it: float spacing).
  bool narrow(const float* c, const double* G, int J, double base, double limit) {
    int j = 0;
    while (j < J && !(base + G[j] >= limit)) ++j;
    bool changed = false;
    if (j < J && c[j] > lo) {
      lo = c[j];
      changed = true;
    }
    if (j > 0 && c[j - 1] < hi) {
      hi = c[j - 1];
      above = base + G[j - 1];
      changed = true;
    }
    return changed;
  }
};

// A raw logit whose transform is about z' (places the first cutoffs only: no exactness needed).
template <bool CAP>
float approx_raw_of(float z_prime, const LogitTransform& f) {
  if (!CAP) return z_prime / f.scale;
  const float r = z_prime / f.cap;
  return r <= -1.f ? -kInf : (r >= 1.f ? kInf : std::atanh(r) / f.scale);
}

// Copies the entries with lo <= z < hi, in order, to the front of oz, oe (which may be z, e: in
// place); returns their number. oz, oe hold n + 16 floats (AVX-512 stores 16 at a time).
int64_t compact_between(const float* z, const float* e, int64_t n, float lo, float hi, float* oz, float* oe) {
  int64_t k = 0, v = 0;
#if defined(__AVX512F__)
  const __m512 l = _mm512_set1_ps(lo), h = _mm512_set1_ps(hi);
  for (; v < n; v += 16) {
    const __mmask16 valid = n - v >= 16 ? __mmask16(0xFFFF) : static_cast<__mmask16>((1u << (n - v)) - 1u);
    const __m512 zv = _mm512_maskz_loadu_ps(valid, z + v), ev = _mm512_maskz_loadu_ps(valid, e + v);
    const __mmask16 in = _mm512_mask_cmp_ps_mask(_mm512_mask_cmp_ps_mask(valid, zv, l, _CMP_GE_OQ), zv, h, _CMP_LT_OQ);
    _mm512_storeu_ps(oz + k, _mm512_maskz_compress_ps(in, zv));  // a register compress: fast everywhere
    _mm512_storeu_ps(oe + k, _mm512_maskz_compress_ps(in, ev));
    k += __builtin_popcount(in);
  }
#else
  for (; v < n; ++v) {  // branch-free: the entries taken are unpredictable
    const float zv = z[v], ev = e[v];
    oz[k] = zv;
    oe[k] = ev;
    k += zv >= lo && zv < hi;
  }
#endif
  return k;
}

// top_p alone (min_p maybe): the smallest raw logit it keeps; m is the row's max z'. Leaves
// e^(z'−m) (0 where min_p drops) in the workspace for kept_sums.
template <int DT, bool CAP>
float top_p_threshold(const Row<DT, CAP>& row, int64_t V, float m, const Truncation& tr, Workspace& w) {
  const Kept1 k1 = exp_and_slots<false>(row, V, m, tr.log_min_p, w);
  const float* z = DT == DT_FLOAT32 ? reinterpret_cast<const float*>(row.p) : w.z.data();
  const float* e = w.e.data();
  const double limit = static_cast<double>(tr.top_p) * k1.mass;
  Bracket br{k1.min_z, kInf, 0.0};
  float c[kCutoffs];
  double G[kCutoffs];
  for (int j = 0; j < kRowCutoffs; ++j) c[j] = approx_raw_of<CAP>(m - kRowStepNats * (j + 1), row.f);
  row_masses_at<kRowCutoffs>(z, e, V, c, G);
  br.narrow(c, G, kRowCutoffs, 0.0, limit);
  // The bracket's entries (z, e) into the workspace's cz, ce (their first n), in order.
  float* cz = w.cz.data();
  float* ce = w.ce.data();
  int64_t n = compact_between(z, e, V, br.lo, br.hi, cz, ce);
  for (int pass = 0; pass < kMaxCutoffPasses && n > kFinishMax; ++pass) {
    float top = br.hi, bottom = br.lo;  // the bracket's ends, or its extreme entries where it is open
    if (!(top < kInf) || !(bottom > -kInf)) {
      top = -kInf;
      bottom = kInf;
      for (int64_t i = 0; i < n; ++i) {
        top = cz[i] > top ? cz[i] : top;
        bottom = cz[i] > -kInf && cz[i] < bottom ? cz[i] : bottom;
      }
    }
    const float step = (top - bottom) / (kCutoffs + 1);
    for (int j = 0; j < kCutoffs; ++j) c[j] = top - step * (j + 1);
    row_masses_at<kCutoffs>(cz, ce, n, c, G);
    if (!br.narrow(c, G, kCutoffs, br.above, limit)) break;
    n = compact_between(cz, ce, n, br.lo, br.hi, cz, ce);
  }
  w.cand.clear();
  for (int64_t i = 0; i < n; ++i) w.cand.push_back({cz[i], ce[i]});
  sort_largest_first(w.cand);
  float threshold = br.lo;
  top_p_finish(w.cand, br.above, limit, threshold);
  return threshold > k1.min_z ? threshold : k1.min_z;  // within what min_p keeps
}

// min_p alone: the smallest raw logit it keeps (no exp, nothing stored).
template <int DT, bool CAP>
float min_p_threshold(const Row<DT, CAP>& row, int64_t V, float m, float log_min_p) {
  const auto* __restrict p = row.p;
  const LogitTransform f = row.f;
  float lo = kInf;
#pragma omp simd reduction(min : lo)
  for (int64_t v = 0; v < V; ++v) {
    const float z = Storage<DT>::load(p[v]);
    lo = min_p_keeps(transform_logit<CAP>(z, f) - m, log_min_p) && z < lo ? z : lo;
  }
  return lo;
}

// kept_sums over the entries of slots [0, slots) only (a search's, Searched::slots), from w.e.
template <int DT, bool CAP>
RowStats<double> sparse_kept_sums(const Row<DT, CAP>& row, int64_t V, float shift, float threshold, unsigned slots,
                                  const Workspace& w) {
  RowStats<double> total{shift, 0.0, 0.0, 0.0};
  for_each_in_slots(w.slot.data(), V, 0, slots, [&](int64_t v) {
    const float z = row.raw(v);
    const SoftmaxTerm k = kept_term(w.e[v], transform_logit<CAP>(z, row.f) - shift, in_kept(z, threshold));
    total.s += k.e;
    total.t += k.ed;
    total.q += static_cast<double>(k.e) * k.e;
  });
  return total;
}

template <int DT, bool CAP>
void forward_rows(const RowsView& x, const int64_t* ids, LogitTransform f, bool with_entropy, const Truncation& tr,
                  const float* threshold_in, bool with_sum_pi_sq, float* logp, float* entropy, float* lse,
                  float* threshold_out, float* sum_pi_sq) {
  using S = Storage<DT>;
  const auto* base = static_cast<const typename S::T*>(x.logits);
  const int64_t V = x.V;
  const bool search = threshold_in == nullptr && tr.active();
#pragma omp parallel if (x.N * V >= kParallelElements)
  {
    Workspace w;
    if (search) {
      w.e.resize(static_cast<size_t>(V));
      if (tr.top_k > 0) w.slot.resize(static_cast<size_t>(V));
      if (DT != DT_FLOAT32) w.z.resize(static_cast<size_t>(V));
      w.cz.resize(static_cast<size_t>(V + 16));
      w.ce.resize(static_cast<size_t>(V + 16));
      w.count.resize(kSlots);
      w.mass.resize(kSlots);
    }
#pragma omp for schedule(dynamic, 4)
    for (int64_t r = 0; r < x.N; ++r) {
      const Row<DT, CAP> row{base + (r / x.T) * x.stride_b + (r % x.T) * x.stride_t, f};
      const int64_t y = ids[r];
      const bool has_target = owns_target(y, V);
      const float zmax = row_max(row, V), m = transform_logit<CAP>(zmax, f);
      float threshold = threshold_in ? threshold_in[r] : -kInf;
      RowStats<double> total;
      if (search && zmax > -kInf) {
        if (tr.top_k <= 0 && tr.top_p < 1.f) {
          threshold = top_p_threshold(row, V, m, tr, w);
          total = kept_sums<true>(row, V, m, threshold, w.e.data(), with_entropy, with_sum_pi_sq);
        } else if (tr.top_k > 0) {
          const Searched found = search_threshold(row, V, m, tr, w);
          threshold = found.threshold;
          total = found.slots ? sparse_kept_sums(row, V, m, threshold, found.slots, w)
                              : kept_sums<true>(row, V, m, threshold, w.e.data(), with_entropy, with_sum_pi_sq);
        } else {  // min_p alone: its bound, then the sums as without truncation
          threshold = min_p_threshold(row, V, m, tr.log_min_p);
          total = kept_sums<false>(row, V, m, threshold, nullptr, with_entropy, with_sum_pi_sq);
        }
      } else {
        // The sums' reference point: the largest kept z' (the max, unless a given threshold drops
        // it; then only the target is kept). 0 when nothing finite is kept.
        float shift = in_kept(zmax, threshold) ? m : (has_target ? row.prime(y) : -kInf);
        shift = std::isfinite(shift) ? shift : 0.f;
        total = kept_sums<false>(row, V, shift, threshold, nullptr, with_entropy, with_sum_pi_sq);
      }
      const float z_y = has_target ? row.prime(y) : 0.f;
      if (has_target && !in_kept(row.raw(y), threshold)) {  // the target is always kept
        const float d = z_y - total.m, ey = softmax_exp(d);
        const SoftmaxTerm k = kept_term(ey, d, true);
        total.merge(RowStats<float>{total.m, k.e, k.ed, k.e * k.e});
      }
      const RowResult res = finish(total, z_y);
      lse[r] = res.lse;
      logp[r] = res.logp;
      entropy[r] = with_entropy ? res.entropy : 0.f;
      sum_pi_sq[r] = with_sum_pi_sq ? res.sum_pi_sq : 0.f;
      threshold_out[r] = threshold;
    }
  }
}

template <int DT, bool CAP>
void backward_rows(const RowsView& x, const int64_t* ids, const float* lse, const float* entropy,
                   const float* grad_logp, const float* grad_entropy, const float* threshold, void* out_ptr,
                   int64_t out_sb, int64_t out_st, LogitTransform f) {
  using S = Storage<DT>;
  const auto* base = static_cast<const typename S::T*>(x.logits);
  auto* out_base = static_cast<typename S::T*>(out_ptr);
  const int64_t V = x.V;
  // firstprivate(f): each thread's own copy of the transform, which the fp32 stores to out cannot
  // alias. Through the shared f, gcc reloads f.scale every iteration and the loop does not vectorise.
#pragma omp parallel for schedule(static) firstprivate(f) if (x.N * V >= kParallelElements)
  for (int64_t r = 0; r < x.N; ++r) {
    const int64_t b = r / x.T, t = r % x.T;
    const auto* row = base + b * x.stride_b + t * x.stride_t;
    auto* out = out_base + b * out_sb + t * out_st;
    const RowGrad rg = row_grad(r, lse, entropy, grad_logp, grad_entropy);
    if (rg.is_zero()) {
      const auto zero = S::store(0.f);
#pragma omp simd
      for (int64_t v = 0; v < V; ++v) out[v] = zero;
      continue;
    }
    const int64_t y = ids[r];
    const bool has_target = owns_target(y, V);
    const float z_y = has_target ? transform_logit<CAP>(S::load(row[y]), f) : 0.f;  // read before an in-place write
    const float thr = threshold ? threshold[r] : -kInf;
    // Every element as a non-target (no branch on v in the vectorised loop), then the target's fixed.
#pragma omp simd
    for (int64_t v = 0; v < V; ++v) {
      const float z = S::load(row[v]);
      out[v] = S::store(rg.dlogit<CAP>(transform_logit<CAP>(z, f), false, f, in_kept(z, thr)));
    }
    if (has_target) out[y] = S::store(rg.dlogit<CAP>(z_y, true, f));
  }
}

// One entry point per (dtype, softcap) pair of the templates above.
template <template <int, bool> class Fn, typename... Args>
void dispatch(const RowsView& x, const LogitTransform& f, Args... args) {
  const bool cap = f.cap != 0.f;
  switch (x.dtype) {
    case DT_FLOAT32: return cap ? Fn<DT_FLOAT32, true>::run(x, f, args...) : Fn<DT_FLOAT32, false>::run(x, f, args...);
    case DT_BFLOAT16:
      return cap ? Fn<DT_BFLOAT16, true>::run(x, f, args...) : Fn<DT_BFLOAT16, false>::run(x, f, args...);
    default: return cap ? Fn<DT_FLOAT16, true>::run(x, f, args...) : Fn<DT_FLOAT16, false>::run(x, f, args...);
  }
}

template <int DT, bool CAP>
struct Forward {
  static void run(const RowsView& x, LogitTransform f, const int64_t* ids, bool with_entropy, Truncation tr,
                  const float* threshold_in, bool with_sum_pi_sq, float* logp, float* entropy, float* lse,
                  float* threshold_out, float* sum_pi_sq) {
    forward_rows<DT, CAP>(x, ids, f, with_entropy, tr, threshold_in, with_sum_pi_sq, logp, entropy, lse,
                          threshold_out, sum_pi_sq);
  }
};

template <int DT, bool CAP>
struct Backward {
  static void run(const RowsView& x, LogitTransform f, const int64_t* ids, const float* lse, const float* entropy,
                  const float* grad_logp, const float* grad_entropy, const float* threshold, void* out,
                  int64_t out_sb, int64_t out_st) {
    backward_rows<DT, CAP>(x, ids, lse, entropy, grad_logp, grad_entropy, threshold, out, out_sb, out_st, f);
  }
};

}  // namespace

int64_t whole_row_fallbacks() { return g_whole_row_fallbacks.load(std::memory_order_relaxed); }

void logprobs_forward(const RowsView& x, const int64_t* ids, LogitTransform f, bool with_entropy, Truncation tr,
                      const float* threshold_in, bool with_sum_pi_sq, float* logp, float* entropy, float* lse,
                      float* threshold_out, float* sum_pi_sq) {
  dispatch<Forward>(x, f, ids, with_entropy, tr, threshold_in, with_sum_pi_sq, logp, entropy, lse, threshold_out,
                    sum_pi_sq);
}

void logprobs_backward(const RowsView& x, const int64_t* ids, const float* lse, const float* entropy,
                       const float* grad_logp, const float* grad_entropy, const float* threshold, void* out,
                       int64_t out_sb, int64_t out_st, LogitTransform f) {
  dispatch<Backward>(x, f, ids, lse, entropy, grad_logp, grad_entropy, threshold, out, out_sb, out_st);
}

}  // namespace cpu
}  // namespace gk

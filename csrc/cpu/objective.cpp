// CPU GRPO objective: gk::objective_sequence (grpo_math.h) for every sequence, in parallel; and,
// for the tests only, the CUDA build's block algorithm emulated on the CPU.
#include <stdexcept>
#include <vector>

#include "../kernels.h"

namespace gk {
namespace cpu {

// Below this many rows a pass runs on one thread (an OpenMP region would cost more than the work).
constexpr int64_t kParallelRows = int64_t{1} << 14;

void objective(const ObjectiveArgs& args, int64_t seq_lo, int64_t seq_hi) {
#pragma omp parallel for schedule(static) if (args.row_hi - args.row_lo >= kParallelRows)
  for (int64_t b = seq_lo; b < seq_hi; ++b) objective_sequence(args, b);
}

namespace {

constexpr int kWarp = 32;

// csrc/cuda/common.cuh's block_reduce, step by step: an xor butterfly in each warp (every lane
// ends with the same value, IEEE + and fmax being commutative), then one over the warps' results
// (lanes past the last warp hold `identity`). Returns what every thread of the block gets.
template <typename T, typename Op>
T emulate_block_reduce(std::vector<T> v, T identity, Op op) {
  auto butterfly = [&](std::vector<T>& lanes) {  // lanes.size() == kWarp
    for (int offset = kWarp / 2; offset > 0; offset /= 2) {
      std::vector<T> next(lanes);
      for (int l = 0; l < kWarp; ++l) next[l] = op(lanes[l], lanes[l ^ offset]);
      lanes.swap(next);
    }
  };
  const int warps = static_cast<int>(v.size()) / kWarp;
  std::vector<T> lanes(kWarp, identity), partial(kWarp, identity);
  for (int w = 0; w < warps; ++w) {
    lanes.assign(v.begin() + w * kWarp, v.begin() + (w + 1) * kWarp);
    butterfly(lanes);
    partial[w] = lanes[0];
  }
  butterfly(partial);
  return partial[0];
}

// A thread block of `threads` threads as objective_sequence_by's team (grpo_math.h), its threads
// run one after another: each phase runs for every thread before the reduction that ends it, as
// the block's barriers order them.
struct EmulatedBlock {
  int threads;
  template <typename F, typename Merge>
  auto reduce(F f, Merge merge) const -> decltype(f(0, 1)) {
    using T = decltype(f(0, 1));
    std::vector<T> mine;
    for (int t = 0; t < threads; ++t) mine.push_back(f(t, threads));
    return emulate_block_reduce(mine, T{}, merge);
  }
  template <typename F>
  void for_each(F f) const {
    for (int t = 0; t < threads; ++t) f(t, threads);
  }
  bool leader() const { return true; }  // the block's thread 0: its merged sums are everyone's
};

}  // namespace

void objective_block_emulation(const ObjectiveArgs& args, int64_t seq_lo, int64_t seq_hi, int threads) {
  if (threads < kWarp || threads > 1024 || threads % kWarp != 0)
    throw std::invalid_argument("objective_block_emulation: threads must be a multiple of 32 in [32, 1024]");
  for (int64_t b = seq_lo; b < seq_hi; ++b) objective_sequence_by(args, b, EmulatedBlock{threads});
}

}  // namespace cpu
}  // namespace gk

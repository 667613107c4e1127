// Host-side stand-in for the CUDA runtime, so that the unchanged kernel
// bodies of csrc/cuda run on CPU threads (tests only; no torch needed).
//
// NOTE: [CUDA on CPU]
// * A launch runs one std::thread per CUDA thread of a block; the same
//   threads run every block of the grid, one block at a time, in an order
//   shuffled by a seed (set_block_order), so a block that reads another
//   block's output gives a result that depends on the seed.
// * threadIdx/blockIdx are thread_local; blockDim/gridDim are set before the
//   threads start.
// * __syncthreads is a std::barrier over the block's threads; __shfl_xor_sync
//   and __shfl_sync go through an exchange buffer between two passes of the
//   warp's barrier, which __syncwarp passes alone. All give ThreadSanitizer the happens-before edges a real barrier gives,
//   so a missing __syncthreads shows up as a data race; threads that meet at
//   different barriers raise an error (see CheckTags) instead of deadlocking.
// * __shared__ is `static`: one copy per kernel instantiation, reused by the
//   blocks in turn (blocks never overlap).
// * drop_sync(k) makes the k-th __syncthreads of every block (counted from 1;
//   block-uniform, so nothing deadlocks) a no-op: the tests' way to show
//   that a removed barrier is detected.
// * Global memory goes through gload / gstore (NOTE: [Global accesses] in
//   csrc/cuda/kernels.cuh), which the meter counts (NOTE: [Counted global
//   memory] below) while it is on.
// Only 1-D grids and blocks whose size is a multiple of 32 are supported,
// which is what csrc/cuda uses.
#pragma once

#include <algorithm>
#include <atomic>
#include <barrier>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <numeric>
#include <random>
#include <stdexcept>
#include <string>
#include <thread>
#include <tuple>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
using cudaStream_t = struct CUstream_st*;

inline thread_local dim3 threadIdx;
inline thread_local dim3 blockIdx;
inline dim3 blockDim;
inline dim3 gridDim;

namespace cuda_host {

// Every thread arrives at a barrier tagged with what it is doing: a
// __syncthreads (its source line), a warp shuffle, or the end of the block.
// The barrier's completion step checks that the tags of its threads agree,
// so threads that disagree raise an error; threads split between the block
// barrier and a warp barrier cannot meet, and the watchdog in launch()
// reports that (a missing or divergent barrier either way).
constexpr int kTagShuffle = -1;
constexpr int kTagBlockEnd = -2;
constexpr int kTagSyncWarp = -3;

// NOTE: [Counted global memory]
// While the meter is on, every gload / gstore is logged by its thread with
// a key: the source line of the access, the number of barriers (block or
// warp) the thread has passed, and how often it ran that line since the last
// one. At the end of each block the logs of a warp's 32 lanes are merged:
// equal keys are one warp-level instruction (the lanes of a warp run the
// same loops in step, so the k-th execution of a line between two barriers
// is the same instruction in every lane; a lane that has left a loop is an
// inactive lane). Per instruction and per registered region (the tensor an
// address falls in; anything else is "other"): bytes issued by the active
// lanes and the distinct 32-byte sectors they touch. Reads of the launch
// table (TensorArgs, BlockItem) are plain member reads, not counted: they
// are per-block scalars, cached on a device.
constexpr uintptr_t kSector = 32;

struct RegionCount {
  uintptr_t start = 0;
  size_t nbytes = 0;
  uint64_t read = 0, written = 0;           // bytes issued by active lanes
  uint64_t sectors_r = 0, sectors_w = 0;    // sum over instructions of distinct sectors
};

struct Access {
  unsigned __int128 key;
  uintptr_t addr;
  uint32_t bytes;
  bool store;
};

struct Meter {
  bool on = false;
  std::vector<RegionCount> regions;  // registration order; `other` is regions.back() once sorted
  RegionCount other;
  std::vector<std::vector<Access>> logs;  // per thread of the block
  std::vector<size_t> by_start;           // region indices sorted by start address
  void index() {
    by_start.resize(regions.size());
    std::iota(by_start.begin(), by_start.end(), size_t{0});
    std::sort(by_start.begin(), by_start.end(),
              [&](size_t a, size_t b) { return regions[a].start < regions[b].start; });
  }
  RegionCount& find(uintptr_t addr) {
    auto it = std::upper_bound(by_start.begin(), by_start.end(), addr,
                               [&](uintptr_t x, size_t r) { return x < regions[r].start; });
    if (it == by_start.begin()) return other;
    RegionCount& r = regions[*(it - 1)];
    return addr < r.start + r.nbytes ? r : other;
  }
  // The lanes' logs of one warp (threads first .. first+31) as instructions.
  void merge_warp(unsigned first) {
    std::vector<std::pair<Access, unsigned>> all;
    for (unsigned l = first; l < first + 32 && l < logs.size(); ++l)
      for (const Access& a : logs[l]) all.push_back({a, l});
    std::stable_sort(all.begin(), all.end(),
                     [](const auto& x, const auto& y) { return x.first.key < y.first.key; });
    std::vector<std::pair<RegionCount*, uintptr_t>> sectors;
    for (size_t i = 0; i < all.size();) {
      size_t j = i;
      sectors.clear();
      while (j < all.size() && all[j].first.key == all[i].first.key) {
        const Access& a = all[j].first;
        RegionCount& r = find(a.addr);
        (a.store ? r.written : r.read) += a.bytes;
        for (uintptr_t s = a.addr / kSector; s <= (a.addr + a.bytes - 1) / kSector; ++s)
          sectors.push_back({&r, s});
        ++j;
      }
      std::sort(sectors.begin(), sectors.end());
      sectors.erase(std::unique(sectors.begin(), sectors.end()), sectors.end());
      const bool store = all[i].first.store;
      for (const auto& sr : sectors) ++(store ? sr.first->sectors_w : sr.first->sectors_r);
      i = j;
    }
  }
  void merge_block() {
    if (by_start.size() != regions.size()) index();
    for (unsigned w = 0; w < logs.size(); w += 32) merge_warp(w);
    for (auto& l : logs) l.clear();
  }
};

inline Meter& meter() {
  static Meter m;
  return m;
}

// Starts counting (clearing every count and region); returns nothing.
inline void meter_start() {
  Meter& m = meter();
  m = Meter{};
  m.on = true;
}
// Registers [start, start + nbytes) as one region; returns its index.
inline size_t meter_region(const void* start, size_t nbytes) {
  Meter& m = meter();
  m.regions.push_back({reinterpret_cast<uintptr_t>(start), nbytes});
  m.by_start.clear();
  return m.regions.size() - 1;
}
inline void meter_stop() { meter().on = false; }

// Per-thread key state (see NOTE: [Counted global memory]): barriers passed
// (the same count in every lane), loop rounds marked since the last one
// (meter_round; a lane that left the loop marks no more, as a lane that left
// a loop issues no more accesses), and executions per line since either.
inline thread_local uint64_t barrier_epoch = 0;
inline thread_local uint64_t loop_round = 0;
inline thread_local std::vector<std::pair<int, uint32_t>> line_runs;  // (line, executions) this round

inline void next_epoch() {
  ++barrier_epoch;
  loop_round = 0;
  line_runs.clear();
}
inline void next_round() {
  ++loop_round;
  line_runs.clear();
}

inline void record(const void* p, size_t bytes, bool store, int line) {
  Meter& m = meter();
  if (!m.on) return;
  uint32_t k = 0;
  auto it = std::find_if(line_runs.begin(), line_runs.end(), [&](const auto& r) { return r.first == line; });
  if (it == line_runs.end()) line_runs.push_back({line, 1});
  else k = it->second++;
  using Key = unsigned __int128;
  const Key key = (static_cast<Key>(barrier_epoch) << 96) | (static_cast<Key>(loop_round) << 64) |
                  (static_cast<Key>(static_cast<uint32_t>(line)) << 32) | k;
  m.logs[threadIdx.x].push_back({key, reinterpret_cast<uintptr_t>(p), static_cast<uint32_t>(bytes), store});
}

struct State;
struct CheckTags {
  State* s;
  unsigned first, count;  // the threads this barrier serves
  void operator()() noexcept;
};

struct Warp {
  explicit Warp(State* s, unsigned first) : bar(32, CheckTags{s, first, 32}) {}
  std::barrier<CheckTags> bar;
};

struct State {
  uint64_t order_seed = 0;
  int drop_sync = 0;  // 0: none
  // Per launch:
  std::unique_ptr<std::barrier<CheckTags>> bar;
  std::vector<std::unique_ptr<Warp>> warps;
  std::vector<int> tag;
  std::vector<uint64_t> slot;  // the shuffle exchange buffer: two sets of one slot per thread
  std::atomic<uint64_t> phases{0};  // barrier phases completed (the watchdog's progress)
  std::atomic<bool> broken{false};
  std::mutex error_mu;
  std::string error;
};

inline State& state() {
  static State s;
  return s;
}
inline thread_local int sync_count = 0;

inline void CheckTags::operator()() noexcept {
  s->phases.fetch_add(1, std::memory_order_relaxed);
  // Every thread of the block waits here: their logs are complete.
  if (s->tag[first] == kTagBlockEnd && count == blockDim.x && meter().on) meter().merge_block();
  for (unsigned i = first + 1; i < first + count; ++i) {
    if (s->tag[i] != s->tag[first] && !s->broken) {
      std::lock_guard<std::mutex> lock(s->error_mu);
      s->broken = true;
      auto what = [](int t) {
        return t == kTagShuffle ? std::string("a warp shuffle")
               : t == kTagSyncWarp ? std::string("__syncwarp")
               : t == kTagBlockEnd ? std::string("the end of the block")
                                   : "__syncthreads at line " + std::to_string(t);
      };
      s->error = "cuda_host: block " + std::to_string(blockIdx.x) + ": thread " + std::to_string(first) +
                 " is at " + what(s->tag[first]) +
                 " but thread " + std::to_string(i) + " at " + what(s->tag[i]) +
                 " (a missing or divergent barrier)";
    }
  }
}

struct Broken {};  // unwinds a thread out of a broken launch

template <typename Barrier>
void arrive(Barrier& bar, int tag) {
  State& s = state();
  s.tag[threadIdx.x] = tag;
  bar.arrive_and_wait();
  if (s.broken) throw Broken{};
}

inline void set_block_order(uint64_t seed) { state().order_seed = seed; }
inline void drop_sync(int k) { state().drop_sync = k; }

inline void syncthreads(int line) {
  next_epoch();
  if (++sync_count == state().drop_sync) return;
  arrive(*state().bar, line);
}

inline thread_local unsigned shuffle_parity = 0;

// A shuffle synchronizes its warp only (as on the device), so it never hides
// a missing __syncthreads. One barrier per shuffle: consecutive shuffles
// alternate between two slot sets, and a lane can only overwrite a set after
// the next shuffle's barrier, which every lane reaches after its read.
// v of lane `src` (0..31) of this thread's warp.
template <typename T>
T shfl_from(T v, unsigned src) {
  static_assert(sizeof(T) <= sizeof(uint64_t));
  State& s = state();
  next_epoch();
  const unsigned warp0 = threadIdx.x & ~31u;
  uint64_t* slots = s.slot.data() + (shuffle_parity ^= 1u) * blockDim.x;
  std::memcpy(&slots[threadIdx.x], &v, sizeof(T));
  arrive(s.warps[threadIdx.x >> 5]->bar, kTagShuffle);  // every lane has written
  T out;
  std::memcpy(&out, &slots[warp0 + (src & 31)], sizeof(T));
  return out;
}
template <typename T>
T shfl_xor(T v, int lane_mask) {
  return shfl_from(v, (threadIdx.x & 31) ^ static_cast<unsigned>(lane_mask));
}

// __syncwarp: the warp's barrier (a happens-before edge between its lanes
// only, as on the device).
inline void syncwarp() {
  next_epoch();
  arrive(state().warps[threadIdx.x >> 5]->bar, kTagSyncWarp);
}

// Seconds without a completed barrier phase after which a launch is taken to
// be deadlocked (threads split between the block barrier and a warp barrier).
constexpr int kWatchdogSeconds = 60;

// kernel<<<grid, block>>>(args...) on CPU threads (see NOTE: [CUDA on CPU]).
template <typename... Params, typename... Args>
void launch(dim3 grid, dim3 block, void (*kernel)(Params...), Args&&... args) {
  if (grid.y != 1 || grid.z != 1 || block.y != 1 || block.z != 1 || block.x % 32 != 0 || block.x == 0)
    throw std::invalid_argument("cuda_host::launch: only 1-D grids and blocks of 32k threads");
  State& s = state();
  std::vector<unsigned> order(grid.x);
  std::iota(order.begin(), order.end(), 0u);
  std::mt19937_64 rng(s.order_seed);
  std::shuffle(order.begin(), order.end(), rng);
  blockDim = block;
  gridDim = grid;
  s.bar = std::make_unique<std::barrier<CheckTags>>(static_cast<std::ptrdiff_t>(block.x),
                                                    CheckTags{&s, 0, block.x});
  s.warps.clear();
  for (unsigned w = 0; w < block.x / 32; ++w) s.warps.push_back(std::make_unique<Warp>(&s, 32 * w));
  s.tag.assign(block.x, 0);
  s.slot.assign(2 * block.x, 0);
  s.broken = false;
  s.error.clear();
  meter().logs.assign(block.x, {});
  const std::tuple<Params...> argv(std::forward<Args>(args)...);
  std::vector<std::thread> threads;
  threads.reserve(block.x);
  for (unsigned i = 0; i < block.x; ++i) {
    threads.emplace_back([&, i] {
      threadIdx = dim3(i);
      try {
        for (unsigned b : order) {
          blockIdx = dim3(b);
          sync_count = 0;
          next_epoch();
          std::apply(kernel, argv);
          arrive(*s.bar, kTagBlockEnd);  // blocks run one after the other
        }
      } catch (const Broken&) {
      }
    });
  }
  std::mutex mu;
  std::condition_variable cv;
  bool finished = false;
  std::thread watchdog([&] {
    std::unique_lock<std::mutex> lock(mu);
    uint64_t seen = s.phases.load();
    while (!cv.wait_for(lock, std::chrono::seconds(kWatchdogSeconds), [&] { return finished; })) {
      const uint64_t now = s.phases.load();
      if (now == seen) {
        std::fprintf(stderr, "cuda_host: no barrier completed in %d s: the threads of a block wait at "
                             "different barriers (a missing or divergent __syncthreads or shuffle)\n",
                     kWatchdogSeconds);
        std::_Exit(70);  // the waiting threads cannot be released
      }
      seen = now;
    }
  });
  for (auto& t : threads) t.join();
  {
    std::lock_guard<std::mutex> lock(mu);
    finished = true;
  }
  cv.notify_one();
  watchdog.join();
  if (s.broken) throw std::runtime_error(s.error);
}

}  // namespace cuda_host

#define __syncthreads() cuda_host::syncthreads(__LINE__)

// Global memory accesses of the kernels (NOTE: [Global accesses] in
// csrc/cuda/kernels.cuh), counted here.
template <typename T>
T gload(const T* p, int line = __builtin_LINE()) {
  cuda_host::record(p, sizeof(T), false, line);
  return *p;
}
template <typename T>
void gstore(T* p, T v, int line = __builtin_LINE()) {
  cuda_host::record(p, sizeof(T), true, line);
  *p = v;
}
template <typename T>
T __shfl_xor_sync(unsigned /*mask: kernels pass the full warp*/, T v, int lane_mask) {
  return cuda_host::shfl_xor(v, lane_mask);
}
template <typename T>
T __shfl_sync(unsigned /*mask: kernels pass the full warp*/, T v, int src_lane) {
  return cuda_host::shfl_from(v, static_cast<unsigned>(src_lane));
}
inline void __syncwarp(unsigned /*mask: kernels pass the full warp*/ = 0xffffffffu) { cuda_host::syncwarp(); }
// NOTE: [Counted global memory]: the kernels mark the end of one round of a
// loop whose lanes may skip rounds in the middle (run tiles), so that the
// k-th access of a line is the same instruction in every lane; no barrier.
inline void meter_round() { cuda_host::next_round(); }

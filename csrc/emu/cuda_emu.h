// A CUDA-on-CPU emulator for the torch-free kernel headers (csrc/cuda/*.cuh), so that CI runs their logic on
// every submission without a GPU (tests/test_cuda_emulator.py). No dependency beyond libc; compile with g++ and
// -I csrc/emu (whose cuda_runtime.h, cuda_bf16.h and cuda_fp16.h stand in for CUDA's and include this file).
//
// What it models:
//  * every thread of a block is a fiber (a ucontext stack, switched with _setjmp/_longjmp); threadIdx is read
//    per fiber; blockIdx, blockDim, gridDim per block; blocks run one after another, in a seeded random order;
//  * __shared__ is one static per declaration: shared by the threads of the block running (one at a time);
//  * __syncthreads counts the arrivals of all threads of the block; a barrier that only some threads reach (the
//    others exited or wait elsewhere), or that threads reach from different call sites (a barrier inside a
//    divergent branch), fails the launch with a message;
//  * __shfl_{down,up,xor,}_sync exchange within a 32-lane warp and synchronise that warp only; all 32 lanes must
//    reach the same call site (full mask only);
//  * a seeded random schedule: the scheduler runs a random runnable thread, and every read of threadIdx, every
//    shuffle and every atomic may preempt the running thread (probability 1/4), so a missing
//    barrier or a read-after-write race through shared memory changes the result from one seed to the next;
//  * __nv_bfloat16 / __half rounded to nearest even (the double conversions round once, as cvt.rn.*.f64 does),
//    the _rz variants by truncation; CUDA's fmax/fmin (a NaN operand yields the other, max(-0, +0) = +0);
//  * cudaStream_t, cudaError_t, cudaGetLastError, cudaLaunchKernelEx (the launch API the headers use).
//
// What it cannot show (docs/gpu.md): FMA contraction and the GPU's exp/log/sqrt (the host's libm runs), the
// memory model between blocks and warps' lockstep timing, and speed.
#pragma once

#include <math.h>
#include <setjmp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <ucontext.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <random>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#define FASTFORGET_CUDA_EMULATION 1
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
#define __syncthreads() ::ff_emu::syncthreads(__FILE__, __LINE__)
#define __shfl_sync(mask, v, lane, ...) ::ff_emu::shfl(__LINE__, mask, v, ::ff_emu::kIdx, lane, ##__VA_ARGS__)
#define __shfl_down_sync(mask, v, d, ...) ::ff_emu::shfl(__LINE__, mask, v, ::ff_emu::kDown, d, ##__VA_ARGS__)
#define __shfl_up_sync(mask, v, d, ...) ::ff_emu::shfl(__LINE__, mask, v, ::ff_emu::kUp, d, ##__VA_ARGS__)
#define __shfl_xor_sync(mask, v, m, ...) ::ff_emu::shfl(__LINE__, mask, v, ::ff_emu::kXor, m, ##__VA_ARGS__)

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

enum cudaError_t : int {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorLaunchFailure = 719,
};
using cudaError = cudaError_t;
using cudaStream_t = struct CUstream_st*;

struct cudaLaunchConfig_t {
  dim3 gridDim;
  dim3 blockDim;
  size_t dynamicSmemBytes;
  cudaStream_t stream;
  void* attrs;
  unsigned int numAttrs;
};

constexpr int warpSize = 32;

// ------------------------------------------------------------------------------------------- 16-bit floats

struct __nv_bfloat16 {
  uint16_t __x;
};
struct __half {
  uint16_t __x;
};

namespace ff_emu {

// x rounded to a binary format with `digits` significand bits (implicit bit included), minimum normal exponent
// emin and maximum finite value max_finite: to nearest, ties to even (nearbyint in the default rounding mode), or
// toward zero. One rounding from the double, also for subnormals; overflow gives infinity (toward zero: the max).
inline double round_to_format(double x, int digits, int emin, double max_finite, bool toward_zero) {
  if (std::isnan(x) || std::isinf(x) || x == 0) return x;
  int e;
  std::frexp(x, &e);  // |x| in [2^(e-1), 2^e)
  const int quantum = std::max(e - digits, emin - digits + 1);
  const double scaled = std::ldexp(x, -quantum);
  const double y = std::ldexp(toward_zero ? std::trunc(scaled) : std::nearbyint(scaled), quantum);
  if (std::fabs(y) > max_finite) return toward_zero ? std::copysign(max_finite, x) : std::copysign(INFINITY, x);
  return y;
}

inline uint32_t float_bits(float f) {
  uint32_t u;
  memcpy(&u, &f, 4);
  return u;
}

inline uint16_t bfloat16_bits(double x, bool toward_zero) {
  if (std::isnan(x)) return std::signbit(x) ? 0xFFC0 : 0x7FC0;
  const double y = round_to_format(x, 8, -126, 0x1.FEp127, toward_zero);
  return static_cast<uint16_t>(float_bits(static_cast<float>(y)) >> 16);  // exact: y has 8 significant bits
}

inline uint16_t half_bits(double x, bool toward_zero) {
  if (std::isnan(x)) return std::signbit(x) ? 0xFE00 : 0x7E00;
  const double y = round_to_format(x, 11, -14, 65504.0, toward_zero);
  const uint16_t sign = std::signbit(y) ? 0x8000 : 0;
  const double a = std::fabs(y);
  if (std::isinf(a)) return sign | 0x7C00;
  if (a < 0x1p-14) return sign | static_cast<uint16_t>(a * 0x1p24);  // subnormal (or zero): exact multiple
  int e;
  const double m = std::frexp(a, &e);  // a = m 2^e, m in [0.5, 1)
  return sign | static_cast<uint16_t>((e + 14) << 10) | static_cast<uint16_t>((m * 2 - 1) * 1024);
}

inline float half_to_float(uint16_t h) {
  const float sign = (h & 0x8000) ? -1.0f : 1.0f;
  const int exponent = (h >> 10) & 0x1F, mantissa = h & 0x3FF;
  if (exponent == 0x1F) return mantissa ? NAN : sign * INFINITY;
  if (exponent == 0) return sign * std::ldexp(static_cast<float>(mantissa), -24);
  return sign * std::ldexp(static_cast<float>(mantissa + 1024), exponent - 25);
}

}  // namespace ff_emu

inline __nv_bfloat16 __float2bfloat16(float v) { return {ff_emu::bfloat16_bits(v, false)}; }
inline __nv_bfloat16 __float2bfloat16_rn(float v) { return {ff_emu::bfloat16_bits(v, false)}; }
inline __nv_bfloat16 __float2bfloat16_rz(float v) { return {ff_emu::bfloat16_bits(v, true)}; }
inline __nv_bfloat16 __double2bfloat16(double v) { return {ff_emu::bfloat16_bits(v, false)}; }
inline float __bfloat162float(__nv_bfloat16 v) {
  const uint32_t u = static_cast<uint32_t>(v.__x) << 16;
  float f;
  memcpy(&f, &u, 4);
  return f;
}
inline __half __float2half(float v) { return {ff_emu::half_bits(v, false)}; }
inline __half __float2half_rn(float v) { return {ff_emu::half_bits(v, false)}; }
inline __half __float2half_rz(float v) { return {ff_emu::half_bits(v, true)}; }
inline __half __double2half(double v) { return {ff_emu::half_bits(v, false)}; }
inline float __half2float(__half v) { return ff_emu::half_to_float(v.__x); }

// ------------------------------------------------------------------------------------------- the scheduler

namespace ff_emu {

enum ShuffleKind { kIdx, kDown, kUp, kXor };
enum FiberState { kRunnable, kAtBarrier, kAtShuffle, kDone };

constexpr size_t kStackBytes = 256 * 1024;
constexpr int kMaxThreads = 1024;

struct Fiber {
  ucontext_t start;
  jmp_buf resume;
  bool started = false;
  FiberState state = kRunnable;
  dim3 tid;
  const char* file = nullptr;  // where it waits
  int line = 0;
};

struct Warp {
  int arrived = 0;
  unsigned generation = 0;
  int line = 0;
  unsigned char slots[2][32][8];  // double-buffered by generation: a lane reads shuffle k while others write k + 1
};

struct Scheduler {
  std::mt19937_64 rng{0};
  uint32_t preempt_threshold = 1u << 30;  // preempt with probability threshold / 2^32 (1/4)
  std::vector<Fiber> fibers;
  std::vector<int> runnable;
  char* stacks = nullptr;
  size_t stack_count = 0;
  int current = -1;
  int block_threads = 0;
  jmp_buf scheduler;
  std::string error;
  // the barrier
  int barrier_arrived = 0;
  const char* barrier_file = nullptr;
  int barrier_line = 0;
  std::vector<Warp> warps;
  // the launch
  dim3 block_dim, grid_dim, block_idx;
  void (*body)(void*) = nullptr;
  void* body_arg = nullptr;
  cudaError_t last_error = cudaSuccess;
  std::string last_message;
};

inline Scheduler& sched() {
  static Scheduler s;
  return s;
}

// Seeds the schedule of the next launches (the order of blocks, of threads, and the preemption points).
inline void set_seed(uint64_t seed) { sched().rng.seed(seed); }

inline Fiber& self() { return sched().fibers[sched().current]; }

// Back to the scheduler; returns when the scheduler runs this fiber again.
inline void switch_out() {
  Scheduler& s = sched();
  if (_setjmp(self().resume) == 0) _longjmp(s.scheduler, 1);
}

// Ends the launch with `message` (the launch returns cudaErrorLaunchFailure; emu_last_message() says why).
[[noreturn]] inline void fail(const std::string& message) {
  Scheduler& s = sched();
  if (s.current < 0) {  // not in a kernel: nothing to unwind to
    fprintf(stderr, "cuda_emu: %s\n", message.c_str());
    abort();
  }
  if (s.error.empty()) s.error = message;
  _longjmp(s.scheduler, 1);
}

// A point where the running thread may be stopped so that others run first.
inline void maybe_preempt() {
  Scheduler& s = sched();
  if (s.current < 0 || static_cast<uint32_t>(s.rng()) >= s.preempt_threshold) return;
  s.runnable.push_back(s.current);
  switch_out();
}

inline std::string where(const char* file, int line) {
  const char* base = strrchr(file, '/');
  return std::string(base ? base + 1 : file) + ":" + std::to_string(line);
}

inline void syncthreads(const char* file, int line) {
  Scheduler& s = sched();
  if (s.current < 0) fail("__syncthreads outside a kernel");
  if (s.barrier_arrived == 0) {
    s.barrier_file = file;
    s.barrier_line = line;
  } else if (s.barrier_line != line || strcmp(s.barrier_file, file) != 0) {
    fail("__syncthreads reached at " + where(file, line) + " by thread " + std::to_string(self().tid.x) +
         " while other threads wait at " + where(s.barrier_file, s.barrier_line) +
         " (a barrier in divergent code)");
  }
  Fiber& me = self();
  me.file = file;
  me.line = line;
  if (++s.barrier_arrived == s.block_threads) {
    s.barrier_arrived = 0;
    for (int i = 0; i < s.block_threads; ++i) {
      if (s.fibers[i].state == kAtBarrier) {
        s.fibers[i].state = kRunnable;
        s.runnable.push_back(i);
      }
    }
    s.runnable.push_back(s.current);  // the last to arrive runs on in a random place among the others
  } else {
    me.state = kAtBarrier;
  }
  switch_out();
}

inline int linear_tid(const dim3& t) {
  const Scheduler& s = sched();
  return static_cast<int>(t.x + s.block_dim.x * (t.y + s.block_dim.y * t.z));
}

template <typename T>
T shfl(int line, unsigned mask, T v, ShuffleKind kind, int arg, int width = warpSize) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable_v<T>, "shuffle of a type wider than 8 bytes");
  Scheduler& s = sched();
  if (s.current < 0) fail("__shfl_sync outside a kernel");
  if (mask != 0xffffffffu) fail("__shfl_sync with a partial mask (the emulator models full warps only)");
  if (s.block_threads % warpSize != 0) fail("__shfl_sync in a block that is not whole warps");
  maybe_preempt();
  const int tid = linear_tid(self().tid), lane = tid % warpSize;
  Warp& w = s.warps[tid / warpSize];
  const unsigned buffer = w.generation & 1;
  if (w.arrived == 0) {
    w.line = line;
  } else if (w.line != line) {
    fail("__shfl_sync at line " + std::to_string(line) + " by lane " + std::to_string(lane) + " of warp " +
         std::to_string(tid / warpSize) + " while other lanes wait at line " + std::to_string(w.line));
  }
  memcpy(w.slots[buffer][lane], &v, sizeof(T));
  self().line = line;
  if (++w.arrived == warpSize) {
    w.arrived = 0;
    ++w.generation;
    const int first = tid - lane;
    for (int i = first; i < first + warpSize; ++i) {
      if (s.fibers[i].state == kAtShuffle) {
        s.fibers[i].state = kRunnable;
        s.runnable.push_back(i);
      }
    }
    s.runnable.push_back(s.current);
  } else {
    self().state = kAtShuffle;
  }
  switch_out();
  const int base = lane - lane % width, sub = lane % width;
  int source = lane;
  switch (kind) {
    case kIdx: source = base + ((arg % width) + width) % width; break;
    case kDown: source = sub + arg < width ? lane + arg : lane; break;
    case kUp: source = sub - arg >= 0 ? lane - arg : lane; break;
    case kXor: source = (lane ^ arg) < base + width ? lane ^ arg : lane; break;
  }
  T out;
  memcpy(&out, w.slots[buffer][source], sizeof(T));
  return out;
}

inline void fiber_main() {
  Scheduler& s = sched();
  s.body(s.body_arg);
  self().state = kDone;
  _longjmp(s.scheduler, 1);
}

inline std::string deadlock_message() {
  const Scheduler& s = sched();
  int at_barrier = 0, at_shuffle = 0, done = 0;
  const Fiber* barrier = nullptr;
  const Fiber* shuffle = nullptr;
  for (int i = 0; i < s.block_threads; ++i) {
    const Fiber& f = s.fibers[i];
    if (f.state == kAtBarrier) ++at_barrier, barrier = &f;
    if (f.state == kAtShuffle) ++at_shuffle, shuffle = &f;
    if (f.state == kDone) ++done;
  }
  std::string m = "deadlock in block " + std::to_string(s.block_idx.x) + ": ";
  if (barrier) {
    m += "__syncthreads at " + where(barrier->file, barrier->line) + " reached by only " +
         std::to_string(at_barrier) + " of " + std::to_string(s.block_threads) + " threads";
  }
  if (shuffle) {
    m += std::string(barrier ? "; " : "") + std::to_string(at_shuffle) + " lanes wait at __shfl_sync (line " +
         std::to_string(shuffle->line) + ") for lanes that never arrive";
  }
  return m + " (" + std::to_string(done) + " threads exited)";
}

// Runs one block to completion (or to an error).
inline void run_block() {
  Scheduler& s = sched();
  s.runnable.clear();
  s.barrier_arrived = 0;
  s.warps.assign((s.block_threads + warpSize - 1) / warpSize, Warp{});
  for (int i = 0; i < s.block_threads; ++i) {
    Fiber& f = s.fibers[i];
    f.started = false;
    f.state = kRunnable;
    f.tid = dim3(i % s.block_dim.x, (i / s.block_dim.x) % s.block_dim.y, i / (s.block_dim.x * s.block_dim.y));
    s.runnable.push_back(i);
  }
  int finished = 0;
  while (s.error.empty()) {
    if (s.runnable.empty()) {
      if (finished < s.block_threads) s.error = deadlock_message();
      break;
    }
    const size_t pick = s.rng() % s.runnable.size();
    s.current = s.runnable[pick];
    s.runnable[pick] = s.runnable.back();
    s.runnable.pop_back();
    Fiber& f = s.fibers[s.current];
    if (_setjmp(s.scheduler) == 0) {
      if (!f.started) {
        f.started = true;
        getcontext(&f.start);
        f.start.uc_stack.ss_sp = s.stacks + s.current * kStackBytes;
        f.start.uc_stack.ss_size = kStackBytes;
        f.start.uc_link = nullptr;
        makecontext(&f.start, fiber_main, 0);
        setcontext(&f.start);
      }
      _longjmp(f.resume, 1);
    }
    if (s.fibers[s.current].state == kDone) ++finished;
  }
  s.current = -1;
}

template <typename Body>
cudaError_t run_grid(dim3 grid, dim3 block, Body& body) {
  Scheduler& s = sched();
  const uint64_t threads = uint64_t(block.x) * block.y * block.z;
  if (threads == 0 || threads > kMaxThreads || grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.y > 65535 ||
      grid.z > 65535) {
    s.last_message = "invalid launch configuration";
    return cudaErrorInvalidConfiguration;
  }
  if (s.stacks == nullptr) {
    s.stacks = static_cast<char*>(
        mmap(nullptr, kMaxThreads * kStackBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0));
    if (s.stacks == MAP_FAILED) abort();
    s.fibers.resize(kMaxThreads);
  }
  s.block_threads = static_cast<int>(threads);
  s.block_dim = block;
  s.grid_dim = grid;
  s.error.clear();
  s.body = [](void* b) { (*static_cast<Body*>(b))(); };
  s.body_arg = &body;
  const uint64_t blocks = uint64_t(grid.x) * grid.y * grid.z;
  std::vector<uint64_t> order(blocks);
  for (uint64_t b = 0; b < blocks; ++b) order[b] = b;
  for (uint64_t b = blocks; b > 1; --b) std::swap(order[b - 1], order[s.rng() % b]);  // blocks in random order
  for (const uint64_t b : order) {
    s.block_idx = dim3(b % grid.x, (b / grid.x) % grid.y, b / (uint64_t(grid.x) * grid.y));
    run_block();
    if (!s.error.empty()) {
      s.last_message = s.error;
      return cudaErrorLaunchFailure;
    }
  }
  return cudaSuccess;
}

// The component of the running thread's index; reading it is a preemption point.
struct ThreadIndexComponent {
  int axis;
  operator unsigned() const {
    maybe_preempt();
    const dim3& t = self().tid;
    return axis == 0 ? t.x : axis == 1 ? t.y : t.z;
  }
};
struct ThreadIndex {
  ThreadIndexComponent x{0}, y{1}, z{2};
};
struct BlockValue {
  const dim3 Scheduler::* member;
  struct Component {
    const dim3 Scheduler::* member;
    int axis;
    operator unsigned() const {
      const dim3& d = sched().*member;
      return axis == 0 ? d.x : axis == 1 ? d.y : d.z;
    }
  } x, y, z;
  constexpr BlockValue(const dim3 Scheduler::* m) : member(m), x{m, 0}, y{m, 1}, z{m, 2} {}
};

inline cudaError_t record(cudaError_t err) {
  if (err != cudaSuccess) sched().last_error = err;
  return err;
}

inline const char* last_message() { return sched().last_message.c_str(); }

}  // namespace ff_emu

inline ff_emu::ThreadIndex threadIdx;
inline ff_emu::BlockValue blockIdx(&ff_emu::Scheduler::block_idx);
inline ff_emu::BlockValue blockDim(&ff_emu::Scheduler::block_dim);
inline ff_emu::BlockValue gridDim(&ff_emu::Scheduler::grid_dim);

inline cudaError_t cudaGetLastError() {
  const cudaError_t err = ff_emu::sched().last_error;
  ff_emu::sched().last_error = cudaSuccess;
  return err;
}
inline cudaError_t cudaPeekAtLastError() { return ff_emu::sched().last_error; }

// CUDA's launch API: the arguments are converted to the kernel's parameter types, as the real one does; every
// thread gets its own copy of them (kernel parameters are by value).
template <typename... ExpTypes, typename... ActTypes>
cudaError_t cudaLaunchKernelEx(const cudaLaunchConfig_t* config, void (*kernel)(ExpTypes...), ActTypes&&... args) {
  std::tuple<std::decay_t<ExpTypes>...> params(std::forward<ActTypes>(args)...);
  auto body = [&] { std::apply(kernel, params); };
  return ff_emu::record(ff_emu::run_grid(config->gridDim, config->blockDim, body));
}

// ------------------------------------------------------------------------------------------- device math

// CUDA's fmax/fmin: a NaN operand yields the other operand; max(-0, +0) = +0, min(-0, +0) = -0.
namespace ff_emu {
template <typename T>
inline T cuda_fmax(T a, T b) {
  if (std::isnan(a)) return b;
  if (std::isnan(b)) return a;
  if (a == b) return std::signbit(a) ? b : a;
  return a > b ? a : b;
}
template <typename T>
inline T cuda_fmin(T a, T b) {
  if (std::isnan(a)) return b;
  if (std::isnan(b)) return a;
  if (a == b) return std::signbit(a) ? a : b;
  return a < b ? a : b;
}
}  // namespace ff_emu

inline float ff_emu_fmax(float a, float b) { return ff_emu::cuda_fmax(a, b); }
inline double ff_emu_fmax(double a, double b) { return ff_emu::cuda_fmax(a, b); }
inline float ff_emu_fmin(float a, float b) { return ff_emu::cuda_fmin(a, b); }
inline double ff_emu_fmin(double a, double b) { return ff_emu::cuda_fmin(a, b); }
#define fmax ff_emu_fmax
#define fmaxf ff_emu_fmax
#define fmin ff_emu_fmin
#define fminf ff_emu_fmin

// The device overloads of max/min (floating point: fmax/fmin semantics).
inline float max(float a, float b) { return ff_emu::cuda_fmax(a, b); }
inline double max(double a, double b) { return ff_emu::cuda_fmax(a, b); }
inline float min(float a, float b) { return ff_emu::cuda_fmin(a, b); }
inline double min(double a, double b) { return ff_emu::cuda_fmin(a, b); }
inline int max(int a, int b) { return a > b ? a : b; }
inline int min(int a, int b) { return a < b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }

// Atomics (a preemption point first, so concurrent updates land in schedule order).
template <typename T>
inline T atomicAdd(T* address, T value) {
  ff_emu::maybe_preempt();
  const T old = *address;
  *address = old + value;
  return old;
}

inline void __syncwarp(unsigned = 0xffffffffu) {}

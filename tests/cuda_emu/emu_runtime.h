#pragma once
// The SIMT machine of the CUDA emulator: each thread of a block is a fiber (ucontext) on one host thread, blocks
// run one after another, and every point where CUDA threads wait for each other (__syncthreads, __syncwarp, a warp
// shuffle or vote, mma.sync, ldmatrix, a warpgroup's wgmma) is a barrier at which the fiber yields. So a kernel
// runs as written, with its real control flow, on the CPU: its results can be compared with the CPU ops where no
// GPU is lent. What the machine reports instead of running on: a barrier some threads of a block never reach
// (deadlock), a warp collective whose lanes disagree on the kind of barrier, a shuffle naming an exited lane, a
// __trap, a misaligned shared or asynchronous access; each abandons the block (its other threads unwind) and raises
// a RuntimeError naming the block and thread from the op that launched the kernel. Built under a sanitizer
// (build.py's asan / tsan variants), the kernels are checked as compute-sanitizer's memcheck and racecheck would
// (emu_runtime.cpp says how the fibers are announced to each).
//
// Not modelled: timing, memory consistency between blocks (they run one at a time), bank conflicts. Asynchronous
// copies (cp.async) and wgmma are deferred to their wait, so a read before the wait sees stale data, and wgmma's
// shared-memory operand is read at issue and at completion and must not change in between.
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <vector>

namespace ws_emu {

constexpr int kWarp = 32;

enum class Wait : int { None = 0, Block, Warp, Warpgroup, Done };

// Aborts with a message naming the current block and thread.
[[noreturn]] void fail(const char* what);

// The block and thread the running fiber emulates (also published as blockIdx / threadIdx).
int linear_thread();
int block_threads();
bool lane_live(int warp, int lane);

// Yields until every live thread of the scope has arrived at a barrier of the same kind.
void barrier(Wait kind);

// A per-warp (or warpgroup) exchange area: each lane writes its bytes, a barrier, each reads any lane's, a barrier.
// The second barrier keeps a fast lane's next write from overwriting a slot another lane still reads.
constexpr int kSlotBytes = 512;
unsigned char* warp_slot(int warp, int lane);
// The first lane of the current thread's warpgroup (4 warps).
int warpgroup_first_warp();

// A collective over the caller's warp: publishes `n` bytes of `mine`, then runs `read(slots)` where slots(l) is
// lane l's bytes.
template <typename F>
void warp_collective(const void* mine, size_t n, F&& read) {
  const int t = linear_thread(), w = t / kWarp, l = t % kWarp;
  std::memcpy(warp_slot(w, l), mine, n);
  barrier(Wait::Warp);
  read([w](int lane) -> const unsigned char* { return warp_slot(w, lane); });
  barrier(Wait::Warp);
}

template <typename F>
void warpgroup_collective(const void* mine, size_t n, F&& read) {
  const int t = linear_thread(), w = t / kWarp, l = t % kWarp;
  std::memcpy(warp_slot(w, l), mine, n);
  barrier(Wait::Warpgroup);
  const int w0 = warpgroup_first_warp();
  read([w0](int thread) -> const unsigned char* { return warp_slot(w0 + thread / kWarp, thread % kWarp); });
  barrier(Wait::Warpgroup);
}

// Shared memory: 32-bit "shared addresses" are the low halves of host pointers (so alignment survives, as the
// kernels' OR-addressing needs); every __shared__ object lives in this library's static storage and the dynamic
// area, inside one 4 GiB window, which shared_address checks.
uint32_t shared_address(const void* p);
void* shared_pointer(uint32_t address);
unsigned char* dynamic_shared();  // the block's extern __shared__ area
constexpr size_t kDynamicSharedBytes = 232448;  // 227 KiB: an H100/H200 block's opt-in maximum

// Deferred work of the current thread: cp.async groups and wgmma groups, run by their waits (and at thread exit).
void cp_async_push(std::function<void()> copy);
void cp_async_commit();
void cp_async_wait(int pending_allowed);
void wgmma_push(std::function<void()> op);
void wgmma_commit();
void wgmma_wait(int pending_allowed);

// Notes a launch (the kernel as the source names it, and the function that launched it, whose template arguments
// name a kernel passed in one) in the log that the op weightshare_emu::launches returns and clear_launches
// empties: tests assert which kernels took a call, as the GPU tests do with the profiler.
void record_launch(const char* kernel, const char* caller, dim3 grid, dim3 block, size_t smem);

// What the wgmma emulation knows of one thread's accumulator registers (keyed by their address): how many wgmma
// on them are in flight, and the values they must hold when the oldest completes.
struct AccumulatorState {
  int in_flight = 0;
  std::vector<float> expect;
};
std::shared_ptr<AccumulatorState> accumulator_state(const float* registers);

// Runs kernel(args) over the grid; `smem` bytes of dynamic shared memory.
void launch(dim3 grid, dim3 block, size_t smem, const std::function<void()>& body);

// The emulated device: an H200's attributes (132 SMs, compute capability 9.0, 227 KiB opt-in shared memory).
constexpr int kSms = 132;

}  // namespace ws_emu

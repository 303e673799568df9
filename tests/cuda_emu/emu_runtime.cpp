// The emulator's scheduler (emu_runtime.h): fibers for the threads of one block at a time, barrier release, the
// deferred cp.async / wgmma groups, shared addresses, and the CUDA runtime calls the project's host code makes,
// answered as an H200 would.
#include "emu_runtime.h"

#include <sys/mman.h>
#include <ucontext.h>

#include <cstdio>
#include <cstdlib>
#include <algorithm>
#include <deque>
#include <random>
#include <map>
#include <stdexcept>
#include <string>
#include <vector>

#include <torch/library.h>

// Under AddressSanitizer (build.py's asan variant) the fiber switches are announced, so that it follows each
// thread's stack, and the dynamic shared area past a launch's size is poisoned: an access outside any tensor,
// __shared__ array or the launch's shared memory is reported where it happens.
#if defined(__SANITIZE_ADDRESS__)
#include <dlfcn.h>
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#define WS_EMU_ASAN 1
#else
#define WS_EMU_ASAN 0
#endif

// Under ThreadSanitizer (the tsan variant) every emulated thread is a TSan fiber, switched without synchronisation,
// and the only happens-before edges between the threads of a block are the ones CUDA gives: its barriers (each
// thread releases at arrival and acquires at release, per scope and barrier episode) and relaxed atomics. So two
// threads of a block touching the same shared or global bytes, one writing, with no barrier between them are
// reported as a data race: compute-sanitizer's racecheck. Blocks are ordered one after another (racecheck's scope
// too), and the scheduler's own bookkeeping is hidden from the tool.
#if defined(__SANITIZE_THREAD__)
#define WS_EMU_TSAN 1
extern "C" {
void* __tsan_get_current_fiber(void);
void* __tsan_create_fiber(unsigned flags);
void __tsan_destroy_fiber(void* fiber);
void __tsan_switch_to_fiber(void* fiber, unsigned flags);
void __tsan_set_fiber_name(void* fiber, const char* name);
void __tsan_acquire(void* addr);
void __tsan_release(void* addr);
void __tsan_func_exit(void);
void AnnotateIgnoreReadsBegin(const char* file, int line);
void AnnotateIgnoreReadsEnd(const char* file, int line);
void AnnotateIgnoreWritesBegin(const char* file, int line);
void AnnotateIgnoreWritesEnd(const char* file, int line);
}
#else
#define WS_EMU_TSAN 0
#endif

uint3 threadIdx, blockIdx;
dim3 blockDim, gridDim;

namespace ws_emu {
namespace {

constexpr size_t kStackBytes = 512 * 1024;
constexpr int kMaxThreads = 1024;

// One thread's asynchronous operations of one kind (cp.async, wgmma): issued into the open group, committed as a
// group, run oldest first by a wait that leaves at most `keep` groups pending.
struct AsyncGroups {
  std::vector<std::function<void()>> open;  // issued since the last commit
  std::deque<std::vector<std::function<void()>>> committed;  // oldest first

  void push(std::function<void()> op) { open.push_back(std::move(op)); }
  void commit() {
    committed.push_back(std::move(open));
    open.clear();
  }
  void wait(size_t keep) {
    while (committed.size() > keep) {
      std::vector<std::function<void()>> group = std::move(committed.front());
      committed.pop_front();
      for (auto& op : group) op();
    }
  }
  void clear() {
    open.clear();
    committed.clear();
  }
};

struct Fiber {
  ucontext_t ctx;
  unsigned char* stack = nullptr;
  void* asan_fake_stack = nullptr;
  Wait wait = Wait::None;
  bool started = false;  // has run in this block (a fiber never started has nothing to unwind)
  void* tsan_fiber = nullptr;
  AsyncGroups cp_async, wgmma;
};

ucontext_t scheduler;
std::vector<Fiber> fibers(kMaxThreads);
int current = -1, nthreads = 0;
const std::function<void()>* body = nullptr;
alignas(1024) unsigned char dynamic_area[kDynamicSharedBytes];
alignas(16) unsigned char slots[kMaxThreads / kWarp][kWarp][kSlotBytes];

// The scheduler's own stack, learned by the first fiber switch (AddressSanitizer's fiber interface).
const void* scheduler_stack = nullptr;
size_t scheduler_stack_size = 0;
void* scheduler_fake_stack = nullptr;

#if WS_EMU_TSAN
// Barrier scopes: 0 the block, 1 + w warp w, 1 + 32 + g warpgroup g; episodes counted per scope. A thread's
// arrival releases into (scope, episode % 4) and its departure acquires from it: a fast thread arriving at the next
// episode cannot reach a slow one still leaving this one.
constexpr int kScopes = 1 + kMaxThreads / kWarp + kMaxThreads / (4 * kWarp);
int episodes[kScopes];
char barrier_sync[kScopes][4];
char block_start, block_end, exited_sync;  // the host before a block, its threads' ends, threads that exited
void* scheduler_fiber = nullptr;

int scope_of(Wait kind, int t) {
  return kind == Wait::Block ? 0 : kind == Wait::Warp ? 1 + t / kWarp : 1 + kMaxThreads / kWarp + t / (4 * kWarp);
}

// The scheduler's reads and writes of the fibers' state are not the kernel's: hidden from the tool while it runs.
struct HiddenFromTsan {
  HiddenFromTsan() {
    AnnotateIgnoreReadsBegin(__FILE__, __LINE__);
    AnnotateIgnoreWritesBegin(__FILE__, __LINE__);
  }
  ~HiddenFromTsan() {
    AnnotateIgnoreWritesEnd(__FILE__, __LINE__);
    AnnotateIgnoreReadsEnd(__FILE__, __LINE__);
  }
};
#endif

// The C library's swapcontext. AddressSanitizer's interceptor of it clears the shadow of the whole target stack at
// every switch (its answer to stacks it is not told about), which made the asan variant's run 15 minutes of mostly
// system time; the fibers' stacks are announced to it instead (__sanitizer_start_switch_fiber), so the interceptor is
// bypassed.
inline int switch_context(ucontext_t* from, const ucontext_t* to) {
#if WS_EMU_ASAN
  using Swap = int (*)(ucontext_t*, const ucontext_t*);
  static const Swap libc_swap = [] {
    void* libc = dlopen("libc.so.6", RTLD_NOW | RTLD_NOLOAD);
    void* f = libc == nullptr ? nullptr : dlsym(libc, "swapcontext");
    return f == nullptr ? &swapcontext : reinterpret_cast<Swap>(f);
  }();
  return libc_swap(from, to);
#else
  return swapcontext(from, to);
#endif
}

// Scheduler -> fiber t, returning when the fiber yields or exits.
__attribute__((always_inline)) inline void enter_fiber(int t) {
#if WS_EMU_TSAN
  __tsan_switch_to_fiber(fibers[t].tsan_fiber, 1);  // 1: no synchronisation between the two
#endif
#if WS_EMU_ASAN
  __sanitizer_start_switch_fiber(&scheduler_fake_stack, fibers[t].stack, kStackBytes);
#endif
  switch_context(&scheduler, &fibers[t].ctx);
#if WS_EMU_ASAN
  __sanitizer_finish_switch_fiber(scheduler_fake_stack, nullptr, nullptr);
#endif
}

// The running fiber -> the scheduler; `exiting`: the fiber is never resumed. Inlined, so that under TSan no frame of
// its own stays on an exiting fiber's shadow stack.
__attribute__((always_inline)) inline void leave_fiber(Fiber& f, bool exiting) {
#if WS_EMU_TSAN
  __tsan_switch_to_fiber(scheduler_fiber, 1);
#endif
#if WS_EMU_ASAN
  __sanitizer_start_switch_fiber(exiting ? nullptr : &f.asan_fake_stack, scheduler_stack, scheduler_stack_size);
#endif
  switch_context(&f.ctx, &scheduler);
#if WS_EMU_ASAN
  __sanitizer_finish_switch_fiber(f.asan_fake_stack, &scheduler_stack, &scheduler_stack_size);
#endif
}

std::map<std::pair<int, const float*>, std::shared_ptr<AccumulatorState>> accumulators;
std::string error;  // the failure that ended the running block ("" while none)

// Thrown out of barrier() into the threads still parked when their block failed, so that each unwinds its kernel's
// frames (destructors run, the sanitizers see the thread end) before the launch raises the error.
struct Abandon {};
bool abandoning = false;

// A thread's end, however it came: its writes precede the host's next step and later barriers of its block.
__attribute__((always_inline)) inline void finish_fiber(Fiber& f) {
  f.wait = Wait::Done;
#if WS_EMU_TSAN
  __tsan_release(&block_end);
  __tsan_release(&exited_sync);
  __tsan_func_exit();  // entry() never returns: its frame leaves the fiber's shadow stack here
#endif
  leave_fiber(f, true);
  std::abort();  // never resumed
}

void entry() {
#if WS_EMU_ASAN
  __sanitizer_finish_switch_fiber(nullptr, &scheduler_stack, &scheduler_stack_size);
#endif
#if WS_EMU_TSAN
  __tsan_acquire(&block_start);
#endif
  fibers[current].started = true;
  bool failed = false;  // the thread ends outside its catch handler: the exception is freed, not left in flight
  try {
    (*body)();
  } catch (const Abandon&) {  // another thread's failure ended the block
    failed = true;
  } catch (const std::exception& e) {  // fail() in this thread: the block is abandoned, launch() raises
    error = e.what();
    failed = true;
  }
  if (failed) finish_fiber(fibers[current]);
  Fiber& f = fibers[current];
  // a thread's outstanding asynchronous work completes (cp.async into shared memory nobody reads any more, or the
  // kernel's bug: the sanitizers' business on a GPU; here it simply lands)
  if (!f.cp_async.open.empty()) f.cp_async.commit();
  f.cp_async.wait(0);
  if (!f.wgmma.open.empty()) fail("wgmma issued but never committed");
  f.wgmma.wait(0);
  finish_fiber(f);
}

void set_thread(int t) {
  current = t;
  threadIdx.x = t % blockDim.x;
  threadIdx.y = (t / blockDim.x) % blockDim.y;
  threadIdx.z = t / (blockDim.x * blockDim.y);
}

// After a failure: each thread that started and has not ended resumes only to unwind (Abandon).
void abandon_block() {
  abandoning = true;
  for (int t = 0; t < nthreads; ++t) {
    if (!fibers[t].started || fibers[t].wait == Wait::Done) continue;
    set_thread(t);
    enter_fiber(t);
  }
  abandoning = false;
}

// Releases every scope whose live threads all wait at its kind of barrier; returns whether any was released.
bool release() {
  bool any = false;
  bool all_block = true, none_left = true;
  for (int t = 0; t < nthreads; ++t) {
    if (fibers[t].wait == Wait::Done) continue;
    none_left = false;
    if (fibers[t].wait != Wait::Block) all_block = false;
  }
  if (none_left) return false;
  if (all_block) {
    for (int t = 0; t < nthreads; ++t) {
      if (fibers[t].wait == Wait::Block) fibers[t].wait = Wait::None;
    }
#if WS_EMU_TSAN
    episodes[0]++;
#endif
    return true;
  }
  auto release_scope = [&](int first, int count, Wait kind) {
    bool waiting = false;
    for (int t = first; t < first + count && t < nthreads; ++t) {
      if (fibers[t].wait == Wait::Done) continue;
      if (fibers[t].wait != kind) return;
      waiting = true;
    }
    if (!waiting) return;
    for (int t = first; t < first + count && t < nthreads; ++t) {
      if (fibers[t].wait == kind) fibers[t].wait = Wait::None;
    }
#if WS_EMU_TSAN
    episodes[scope_of(kind, first)]++;
#endif
    any = true;
  };
  for (int w = 0; w * kWarp < nthreads; ++w) release_scope(w * kWarp, kWarp, Wait::Warp);
  for (int g = 0; g * 4 * kWarp < nthreads; ++g) release_scope(g * 4 * kWarp, 4 * kWarp, Wait::Warpgroup);
  return any;
}

// The order in which the threads of a block run between barriers (WS_EMU_SCHEDULE, read per launch): "forward"
// (thread 0 first; the default), "reverse", or "shuffle" (a new random order at every barrier). A kernel whose
// result depends on it reads or writes memory another thread writes without a barrier in between: a race.
enum class Schedule { Forward, Reverse, Shuffle };
Schedule schedule = Schedule::Forward;
std::mt19937 shuffler(12345);
std::vector<int> order;

void run_block() {
  for (;;) {
    bool ran = false;
    order.resize(nthreads);
    for (int t = 0; t < nthreads; ++t) order[t] = schedule == Schedule::Reverse ? nthreads - 1 - t : t;
    if (schedule == Schedule::Shuffle) std::shuffle(order.begin(), order.end(), shuffler);
    for (const int t : order) {
      if (fibers[t].wait != Wait::None) continue;
      set_thread(t);
      enter_fiber(t);
      ran = true;
      if (!error.empty()) return;
    }
    bool done = true;
    for (int t = 0; t < nthreads; ++t) done = done && fibers[t].wait == Wait::Done;
    if (done) return;
    if (!release() && !ran) {
      char msg[160];
      int counts[5] = {};
      for (int t = 0; t < nthreads; ++t) counts[static_cast<int>(fibers[t].wait)]++;
      std::snprintf(msg, sizeof msg, "deadlock: threads at __syncthreads %d, warp barriers %d, warpgroup barriers %d, "
                    "exited %d", counts[1], counts[2], counts[3], counts[4]);
      error = std::string("cuda_emu: ") + msg + " (block " + std::to_string(blockIdx.x) + "," +
              std::to_string(blockIdx.y) + "," + std::to_string(blockIdx.z) + ")";
      return;
    }
  }
}

}  // namespace

void fail(const char* what) {
  char msg[512];
  if (current >= 0) {
    std::snprintf(msg, sizeof msg, "cuda_emu: %s (block %u,%u,%u of %u,%u,%u; thread %d)", what, blockIdx.x,
                  blockIdx.y, blockIdx.z, gridDim.x, gridDim.y, gridDim.z, current);
  } else {
    std::snprintf(msg, sizeof msg, "cuda_emu: %s (block %u,%u,%u)", what, blockIdx.x, blockIdx.y, blockIdx.z);
  }
  throw std::runtime_error(msg);  // inside a fiber: caught by entry(); in the scheduler: out of launch()
}

int linear_thread() { return current; }
int block_threads() { return nthreads; }
bool lane_live(int warp, int lane) {
#if WS_EMU_TSAN
  const HiddenFromTsan hidden;  // the emulator's state
#endif
  const int t = warp * kWarp + lane;
  return t < nthreads && fibers[t].wait != Wait::Done;
}

void barrier(Wait kind) {
  if (current < 0) fail("a barrier outside a kernel");
  Fiber& f = fibers[current];
#if WS_EMU_TSAN
  const int scope = scope_of(kind, current), episode = episodes[scope] % 4;
  __tsan_release(&barrier_sync[scope][episode]);
#endif
  f.wait = kind;  // only this thread writes it; the emulator's reads are hidden from TSan
  leave_fiber(f, false);
  if (abandoning) throw Abandon{};
#if WS_EMU_TSAN
  __tsan_acquire(&barrier_sync[scope][episode]);
  __tsan_acquire(&exited_sync);
#endif
}

unsigned char* warp_slot(int warp, int lane) { return slots[warp][lane]; }
int warpgroup_first_warp() { return (current / kWarp) & ~3; }

uint32_t shared_address(const void* p) {
  const uintptr_t u = reinterpret_cast<uintptr_t>(p);
  if ((u >> 32) != (reinterpret_cast<uintptr_t>(dynamic_area) >> 32)) fail("a __shared__ object outside the window");
  return static_cast<uint32_t>(u);
}

void* shared_pointer(uint32_t address) {
  return reinterpret_cast<void*>(((reinterpret_cast<uintptr_t>(dynamic_area) >> 32) << 32) | address);
}

unsigned char* dynamic_shared() { return dynamic_area; }

void cp_async_push(std::function<void()> copy) { fibers[current].cp_async.push(std::move(copy)); }
void cp_async_commit() { fibers[current].cp_async.commit(); }
void cp_async_wait(int pending_allowed) { fibers[current].cp_async.wait(pending_allowed); }
std::shared_ptr<AccumulatorState> accumulator_state(const float* registers) {
#if WS_EMU_TSAN
  const HiddenFromTsan hidden;  // the emulator's table, not the kernel's memory
#endif
  auto& slot = accumulators[{current, registers}];  // cleared with each block (stack addresses repeat)
  if (!slot) slot = std::make_shared<AccumulatorState>();
  return slot;
}

void wgmma_push(std::function<void()> op) { fibers[current].wgmma.push(std::move(op)); }
void wgmma_commit() { fibers[current].wgmma.commit(); }
void wgmma_wait(int pending_allowed) { fibers[current].wgmma.wait(pending_allowed); }

namespace {
std::vector<std::string> launch_log;

std::vector<std::string> launches() { return launch_log; }
void clear_launches() { launch_log.clear(); }
}  // namespace

void record_launch(const char* kernel, const char* caller, dim3 grid, dim3 block, size_t smem) {
  launch_log.push_back(std::string(kernel) + " [in " + caller + "] grid(" + std::to_string(grid.x) + "," +
                       std::to_string(grid.y) + "," +
                       std::to_string(grid.z) + ") block(" + std::to_string(block.x) + ") smem " +
                       std::to_string(smem));
}

void launch(dim3 grid, dim3 block, size_t smem, const std::function<void()>& kernel) {
  const long threads = long(block.x) * block.y * block.z;
  if (threads <= 0 || threads > kMaxThreads) fail("launch: block size outside 1..1024");
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.y > 65535 || grid.z > 65535) fail("launch: grid dimension");
  if (smem > kDynamicSharedBytes) fail("launch: more dynamic shared memory than the device has");
  nthreads = static_cast<int>(threads);
#if WS_EMU_TSAN
  const HiddenFromTsan hidden;
  scheduler_fiber = __tsan_get_current_fiber();
#endif
  const char* sched = std::getenv("WS_EMU_SCHEDULE");
  const std::string sched_name = sched == nullptr ? "forward" : sched;
  if (sched_name != "forward" && sched_name != "reverse" && sched_name != "shuffle") {
    fail("WS_EMU_SCHEDULE must be forward, reverse or shuffle");
  }
  schedule = sched_name == "reverse" ? Schedule::Reverse
                                     : (sched_name == "shuffle" ? Schedule::Shuffle : Schedule::Forward);
  blockDim = block;
  gridDim = grid;
  body = &kernel;
  for (int t = 0; t < nthreads; ++t) {
    Fiber& f = fibers[t];
    if (f.stack == nullptr) {
      void* m = mmap(nullptr, kStackBytes + 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                     -1, 0);
      if (m == MAP_FAILED) fail("mmap of a fiber stack");
      mprotect(m, 4096, PROT_NONE);  // a guard page: an overflowing kernel faults instead of corrupting
      f.stack = static_cast<unsigned char*>(m) + 4096;
    }
  }
  for (unsigned bz = 0; bz < grid.z; ++bz) {
    for (unsigned by = 0; by < grid.y; ++by) {
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        blockIdx.x = bx;
        blockIdx.y = by;
        blockIdx.z = bz;
        // shared memory starts as garbage on a GPU: a kernel that reads what it did not write sees NaN patterns here
#if WS_EMU_ASAN
        ASAN_UNPOISON_MEMORY_REGION(dynamic_area, smem);
        ASAN_POISON_MEMORY_REGION(dynamic_area + smem, kDynamicSharedBytes - smem);
#endif
        std::memset(dynamic_area, 0xff, smem);
#if WS_EMU_TSAN
        __tsan_acquire(&block_end);   // the previous blocks' threads, then this block's start: blocks in order
        __tsan_release(&block_start);
#endif
        for (int t = 0; t < nthreads; ++t) {
          Fiber& f = fibers[t];
#if WS_EMU_TSAN
          if (f.tsan_fiber == nullptr || f.wait != Wait::Done) {  // new, or abandoned mid-block by an error
            if (f.tsan_fiber != nullptr) __tsan_destroy_fiber(f.tsan_fiber);
            f.tsan_fiber = __tsan_create_fiber(0);
            const std::string fiber_name = "CUDA thread " + std::to_string(t);  // reports name the thread so
            __tsan_set_fiber_name(f.tsan_fiber, fiber_name.c_str());
          }
#endif
          f.wait = Wait::None;
          f.started = false;
          f.cp_async.clear();
          f.wgmma.clear();
#if WS_EMU_ASAN
          ASAN_UNPOISON_MEMORY_REGION(f.stack, kStackBytes);  // frames an abandoned block left behind
#endif
          getcontext(&f.ctx);
          f.ctx.uc_stack.ss_sp = f.stack;
          f.ctx.uc_stack.ss_size = kStackBytes;
          f.ctx.uc_link = nullptr;
          makecontext(&f.ctx, entry, 0);
        }
        error.clear();
        accumulators.clear();
        run_block();
        if (!error.empty()) abandon_block();
        current = -1;
#if WS_EMU_TSAN
        __tsan_acquire(&block_end);  // the host after the launch sees what the kernel wrote
#endif
        if (!error.empty()) {
          body = nullptr;
          throw std::runtime_error(error);
        }
      }
    }
  }
  body = nullptr;
}

}  // namespace ws_emu

TORCH_LIBRARY_FRAGMENT(weightshare_emu, m) {
  m.def("launches() -> str[]", &ws_emu::launches);
  m.def("clear_launches() -> ()", &ws_emu::clear_launches);
}

// ------------------------------------------------------------------------------------------------ CUDA runtime
// The calls the project's host code makes (cuda_linear.h, fused_gemm_staging.h, cuda_utils.h), answered as an H200.
extern "C" {

cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device) {
  (void)device;
  switch (attr) {
    case cudaDevAttrMultiProcessorCount: *value = ws_emu::kSms; break;
    case cudaDevAttrComputeCapabilityMajor: *value = 9; break;
    case cudaDevAttrComputeCapabilityMinor: *value = 0; break;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *value = static_cast<int>(ws_emu::kDynamicSharedBytes); break;
    case cudaDevAttrMaxSharedMemoryPerMultiprocessor: *value = 233472; break;
    case cudaDevAttrL2CacheSize: *value = 60 << 20; break;
    default: *value = 0; return cudaErrorInvalidValue;
  }
  return cudaSuccess;
}

cudaError_t cudaFuncGetAttributes(cudaFuncAttributes* attr, const void*) {
  *attr = cudaFuncAttributes{};
  attr->ptxVersion = 90;
  attr->binaryVersion = 90;
  return cudaSuccess;
}

cudaError_t cudaFuncSetAttribute(const void*, cudaFuncAttribute, int) { return cudaSuccess; }

cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* blocks, const void*, int threads, size_t smem) {
  // registers are not modelled: the shared-memory and thread limits of an SM
  const int by_smem = smem == 0 ? 32 : static_cast<int>(233472 / (smem + 1024));
  const int by_threads = 2048 / threads;
  *blocks = by_smem < by_threads ? by_smem : by_threads;
  return cudaSuccess;
}

cudaError_t cudaGetLastError(void) { return cudaSuccess; }
cudaError_t cudaPeekAtLastError(void) { return cudaSuccess; }
const char* cudaGetErrorString(cudaError_t) { return "cuda_emu"; }

cudaError_t cudaStreamIsCapturing(cudaStream_t, cudaStreamCaptureStatus* status) {
  *status = cudaStreamCaptureStatusNone;
  return cudaSuccess;
}

}  // extern "C"

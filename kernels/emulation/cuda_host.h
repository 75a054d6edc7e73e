// Host emulation of the little CUDA that the ProST kernels use, so that the same .cu sources
// compile as plain C++ and their arithmetic can be tested on a machine without a GPU:
//
//   g++ -x c++ -std=c++17 -O2 -shared -fPIC -Wno-unknown-pragmas
//       -include kernels/emulation/cuda_host.h kernels/prost.cu -o libprost_host.so
//
// A launch runs every block, and every thread of a block, one after the other in a plain loop,
// with blockIdx / threadIdx / blockDim / gridDim set as (thread-local) globals. That is exact for
// kernels whose threads never wait for one another, which is why the kernels avoid shared memory
// and __syncthreads (left undefined here, so that using them fails to compile):
//
//   * atomicAdd is a plain read-add-write (one thread runs at a time), or an `omp atomic` update
//     when built with -fopenmp (see below);
//   * warpSize is 1, so a warp reduction is the identity and every thread is its warp's lane 0:
//     the pose-gradient sum becomes one add per ray instead of one per warp. The shuffle tree
//     itself runs only on a GPU.
//
// Built with -fopenmp (the "cpu" backend), a launch runs its blocks in parallel, one OpenMP
// thread per block at a time, each block's threads still one after another on that OpenMP
// thread; the warp stays one thread wide, so the warp reductions remain exact. atomicAdd is then
// an `omp atomic` update (float and double alike), the only memory that blocks share being what
// the kernels write with atomicAdd, and the order of those adds varies from run to run. Blocks
// are taken as threads come free (schedule(dynamic)), or, after prost_host_set_fixed_order(1),
// dealt round robin (block i to thread i mod n: schedule(static, 1)), so that which thread runs
// which block, in which order, is fixed for a given thread count; prost::host_worker() is then
// the OpenMP thread's number, by which the kernels pick a private copy of what they scatter
// into (prost_common.cuh, "the reductions").
// prost_host_set_threads(n) sets the number of threads launches use (n <= 0: OpenMP's default).
// A kernel exported with PROST_HOST_EXPORT_LANES(kernel, lanes_kernel, lanes) runs each block's
// threads `lanes` at a time instead, one call of lanes_kernel per group (the cpu build's vector
// lanes: lanes.h).
//
// Each kernel listed with PROST_HOST_EXPORT(name) gets an entry point
//
//   extern "C" void name_host(unsigned grid_x, grid_y, grid_z, block_x, block_y, block_z,
//                             void** args)
//
// whose args are cuLaunchKernel's: args[i] points to the value of the kernel's i-th parameter.

#pragma once

#include <math.h>
#include <stdint.h>

#include <cstddef>
#include <type_traits>
#include <utility>

#ifdef _OPENMP
#include <omp.h>
#endif

#define PROST_HOST_EMULATION 1

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)

struct uint3 {
  unsigned int x, y, z;
};

struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int x_ = 1, unsigned int y_ = 1, unsigned int z_ = 1)
      : x(x_), y(y_), z(z_) {}
};

inline thread_local uint3 threadIdx = {0, 0, 0};
inline thread_local uint3 blockIdx = {0, 0, 0};
inline thread_local dim3 blockDim;
inline thread_local dim3 gridDim;

constexpr int warpSize = 1;

template <typename T>
inline T atomicAdd(T* address, T value) {
#ifdef _OPENMP
  T old;
#pragma omp atomic capture
  {
    old = *address;
    *address += value;
  }
  return old;
#else
  const T old = *address;
  *address = old + value;
  return old;
#endif
}

template <typename T>
inline T __ldg(const T* address) {
  return *address;
}

// Never called: warp loops run zero times with warpSize 1.
template <typename T>
inline T __shfl_down_sync(unsigned int, T value, unsigned int) {
  return value;
}

namespace prost_host {

template <typename R, typename... A, std::size_t... I>
inline R call(R (*kernel)(A...), void** args, std::index_sequence<I...>) {
  return kernel(*static_cast<std::remove_cv_t<std::remove_reference_t<A>>*>(args[I])...);
}

// The threads a launch uses (<= 0: OpenMP's default); ignored without OpenMP.
inline int num_threads = 0;
// Whether blocks are dealt to threads in a fixed round robin (else as threads come free).
inline bool fixed_order = false;
// The OpenMP thread running the current block (0 without OpenMP).
inline thread_local long long worker = 0;

// Block i of kernel<<<grid, block>>>(args...), its threads one after another.
template <typename... A>
inline void run_block(void (*kernel)(A...), dim3 grid, dim3 block, void** args, long long i) {
  gridDim = grid;  // thread-local: set on every OpenMP thread
  blockDim = block;
  blockIdx = {(unsigned int)(i % grid.x), (unsigned int)(i / grid.x % grid.y),
              (unsigned int)(i / ((long long)grid.x * grid.y))};
  for (unsigned int tz = 0; tz < block.z; ++tz)
    for (unsigned int ty = 0; ty < block.y; ++ty)
      for (unsigned int tx = 0; tx < block.x; ++tx) {
        threadIdx = {tx, ty, tz};
        call(kernel, args, std::index_sequence_for<A...>{});
      }
}

// Block i with `lanes` threads per call of lanes_kernel (threads threadIdx.x, ...,
// threadIdx.x + lanes - 1; block.x a multiple of lanes, block.y = block.z = 1); where it returns
// false, those threads run one by one in kernel instead.
template <typename... A>
inline void run_block_lanes(void (*kernel)(A...), bool (*lanes_kernel)(A...), int lanes,
                            dim3 grid, dim3 block, void** args, long long i) {
  gridDim = grid;
  blockDim = block;
  blockIdx = {(unsigned int)(i % grid.x), (unsigned int)(i / grid.x % grid.y),
              (unsigned int)(i / ((long long)grid.x * grid.y))};
  for (unsigned int tx = 0; tx < block.x; tx += lanes) {
    threadIdx = {tx, 0, 0};
    if (call(lanes_kernel, args, std::index_sequence_for<A...>{})) continue;
    for (unsigned int t = tx; t < tx + lanes; ++t) {
      threadIdx = {t, 0, 0};
      call(kernel, args, std::index_sequence_for<A...>{});
    }
  }
}

// Run kernel<<<grid, block>>>(args...) as loops over blocks and, inside each, over its threads
// (or groups of `lanes` threads in lanes_kernel, when given).
template <typename... A>
inline void launch(void (*kernel)(A...), dim3 grid, dim3 block, void** args,
                   bool (*lanes_kernel)(A...) = nullptr, int lanes = 1) {
  const auto block_run = [&](long long i) {
    if (lanes_kernel != nullptr && block.x % lanes == 0 && block.y == 1 && block.z == 1) {
      run_block_lanes(kernel, lanes_kernel, lanes, grid, block, args, i);
    } else {
      run_block(kernel, grid, block, args, i);
    }
  };
  const long long blocks = (long long)grid.x * grid.y * grid.z;
#ifdef _OPENMP
  const int threads = num_threads > 0 ? num_threads : omp_get_max_threads();
  if (fixed_order) {
#pragma omp parallel num_threads(threads)
    {
      worker = omp_get_thread_num();
#pragma omp for schedule(static, 1)
      for (long long i = 0; i < blocks; ++i) block_run(i);
    }
    return;
  }
#pragma omp parallel for schedule(dynamic) num_threads(threads)
#endif
  for (long long i = 0; i < blocks; ++i) block_run(i);
}

}  // namespace prost_host

extern "C" void prost_host_set_threads(int n) { prost_host::num_threads = n; }
extern "C" void prost_host_set_fixed_order(int on) { prost_host::fixed_order = on != 0; }

// The same entry point for a kernel with a lanes version (prost.cu, PROST_KERNEL_LANES).
#define PROST_HOST_EXPORT_LANES(kernel, lanes_kernel, lanes)                                 \
  extern "C" void kernel##_host(unsigned int gx, unsigned int gy, unsigned int gz,           \
                                unsigned int bx, unsigned int by, unsigned int bz,           \
                                void** args) {                                               \
    prost_host::launch(kernel, dim3(gx, gy, gz), dim3(bx, by, bz), args, lanes_kernel, lanes); \
  }

#define PROST_HOST_EXPORT(kernel)                                                          \
  extern "C" void kernel##_host(unsigned int gx, unsigned int gy, unsigned int gz,         \
                                unsigned int bx, unsigned int by, unsigned int bz,         \
                                void** args) {                                             \
    prost_host::launch(kernel, dim3(gx, gy, gz), dim3(bx, by, bz), args);                  \
  }

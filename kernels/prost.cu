// The ProST projector's four primitives as fused CUDA kernels (float and double).
//
// With f_V the zero-padded trilinear interpolant of the volume V, x_pk = M (tau_k d_p, 1) the
// sample positions (prost_common.cuh), s the step and g a cotangent image (B, C, P):
//
//   forward   out[b, ch, p] = s sum_k f_V(x_pk)                                    (B, C, P)
//   jvp       out[b, ch, p] = s sum_k grad f_V(x_pk) . (dM (tau_k d_p, 1))         (B, C, P)
//   vjp       gvol += scatter of s g[b, ch, p] w_n(x_pk) to each cell corner n     (Bv, C, D, H, W)
//             gM[b] += s sum_{p,k} (sum_ch g grad f_V(x_pk)) (tau_k d_p, 1)^T      (B, 3, 4)
//   jvp_vjp   the gradients of <g, jvp(V, M, dM)>:
//             gvol += scatter of s g (grad w_n(x_pk) . dq_pk)                      (Bv, C, D, H, W)
//             gM[b] += s sum_{p,k} (sum_ch g H f_V(x_pk) dq_pk) (tau_k d_p, 1)^T   (B, 3, 4)
//
// (gradients and Hessians w.r.t. x, in mm; dq the index-space velocity along dM). These are the
// primitives of prostlab/projector/backends/torch_backend.py, whose docstring states the same
// maths; prostlab/projector/autograd.py composes them into a twice-differentiable projection.
//
// Launch: one thread per (batch item, ray), grid (ceil(P / blockDim.x), B), blockDim.x a
// multiple of 32. Each thread walks its ray's clipped samples, generating the positions on the
// fly; nothing of size P x K is stored. Volume gradients are scattered with atomicAdd; pose
// gradients are summed per ray in registers, then over the warp (shuffles), then added with one
// atomicAdd per entry per warp. gvol and gM must be zeroed before the launch; out need not be.
// Either sum can be done in a fixed order instead (pose_slots, gvol_copy, gvol_fixed: see "the
// reductions" in prost_common.cuh), which makes the gradients bit-reproducible.
// A ray whose geometry (M or d) is not finite has no samples and NaN outputs (images, gM).
//
// Kernel names: prost_<primitive>_<f32|f64>; all take the same parameter list (PROST_PARAMS).

#include "prost_common.cuh"

namespace prost {

// Channels whose sums a thread keeps in registers at once (forward and jvp).
constexpr int kChannelTile = 4;

template <typename T>
__device__ __forceinline__ void forward_body(const Launch<T>& L) {
  const int b = blockIdx.y;
  const int p = blockIdx.x * blockDim.x + threadIdx.x;
  if (p >= L.P) return;
  const Ray<T> ray = make_ray(L, b, p);
  for (int c0 = 0; c0 < L.C; c0 += kChannelTile) {
    T acc[kChannelTile] = {};
    const T* ahead = L.vol + L.channel_offset(b, c0);
    for (int k = 0; k < ray.count; ++k) {
      prefetch_cell(ray, ray.k_first + k + kPrefetchDistance, L, ahead, false);
      const T tau = T(ray.k_first + k) * L.step;
      const Cell<T> cell(ray, tau, L);
      const Weights<T> wt(cell.f);
PROST_UNROLL
      for (int j = 0; j < kChannelTile; ++j) {
        if (c0 + j >= L.C) break;
        T v[8];
        cell.gather(L.vol + L.channel_offset(b, c0 + j), v);
        acc[j] += wt.value(v);
      }
    }
PROST_UNROLL
    for (int j = 0; j < kChannelTile; ++j) {
      if (c0 + j >= L.C) break;
      L.out[L.image_index(b, c0 + j, p)] = acc[j] * L.step + ray.poison;
    }
  }
}

template <typename T>
__device__ __forceinline__ void jvp_body(const Launch<T>& L) {
  const int b = blockIdx.y;
  const int p = blockIdx.x * blockDim.x + threadIdx.x;
  if (p >= L.P) return;
  const Ray<T> ray = make_ray(L, b, p);
  const Velocity<T> vel(L.dM + 12 * (long long)b, ray.d);
  for (int c0 = 0; c0 < L.C; c0 += kChannelTile) {
    T acc[kChannelTile] = {};
    const T* ahead = L.vol + L.channel_offset(b, c0);
    for (int k = 0; k < ray.count; ++k) {
      prefetch_cell(ray, ray.k_first + k + kPrefetchDistance, L, ahead, false);
      const T tau = T(ray.k_first + k) * L.step;
      const Cell<T> cell(ray, tau, L);
      const Weights<T> wt(cell.f);
      T dq[3];
      vel.at(tau, L.inv_s, dq);
PROST_UNROLL
      for (int j = 0; j < kChannelTile; ++j) {
        if (c0 + j >= L.C) break;
        T v[8], grad[3];
        cell.gather(L.vol + L.channel_offset(b, c0 + j), v);
        wt.gradient(v, grad);
        acc[j] += grad[0] * dq[0] + grad[1] * dq[1] + grad[2] * dq[2];
      }
    }
PROST_UNROLL
    for (int j = 0; j < kChannelTile; ++j) {
      if (c0 + j >= L.C) break;
      L.out[L.image_index(b, c0 + j, p)] = acc[j] * L.step + ray.poison;
    }
  }
}

// vjp (second_order = false) and jvp_vjp (second_order = true) share one walk: per sample,
// scatter into gvol (need_vol) and accumulate the sample-position gradient gx for gM (need_M).
// The two flags are template parameters, so that each of the walks a launch can ask for is
// compiled without the other's work or tests in its inner loop (vjp_body picks one).
template <typename T, bool second_order, bool need_vol, bool need_M>
__device__ __forceinline__ void vjp_walk(const Launch<T>& L, int b, int p, T S0[3], T S1[3],
                                         T d[3]) {
  const Ray<T> ray = make_ray(L, b, p);
PROST_UNROLL
  for (int a = 0; a < 3; ++a) d[a] = ray.d[a];
PROST_UNROLL
  for (int a = 0; a < 3; ++a) S0[a] = S1[a] = ray.poison;  // non-finite geometry: NaN gM
  const Velocity<T> vel(second_order ? L.dM + 12 * (long long)b : L.M, ray.d);
  for (int k = 0; k < ray.count; ++k) {
    const long long next = ray.k_first + k + kPrefetchDistance;
    if (need_M) prefetch_cell(ray, next, L, L.vol + L.channel_offset(b, 0), false);
    if (need_vol && !(L.gvol_fixed > T(0)))
      prefetch_cell(ray, next, L, L.gvol + host_worker() * L.gvol_copy + L.channel_offset(b, 0),
                    true);
    const T tau = T(ray.k_first + k) * L.step;
    const Cell<T> cell(ray, tau, L);
    const Weights<T> wt(cell.f);
    T dq[3] = {};
    if (second_order) vel.at(tau, L.inv_s, dq);
    T rate[8];  // what each corner's coefficient is per unit of s g: its weight, or its rate
    if (need_vol) {
PROST_UNROLL
      for (int n = 0; n < 8; ++n) rate[n] = second_order ? wt.weight_rate(n, dq) : wt.weight(n);
    }
    T mixed[8] = {};  // sum_ch s g_ch V_ch at each corner
    for (int ch = 0; ch < L.C; ++ch) {
      const T gs = L.g[L.image_index(b, ch, p)] * L.step;
      const long long offset = L.channel_offset(b, ch);
      if (need_vol) {
        T coeff[8];
PROST_UNROLL
        for (int n = 0; n < 8; ++n) coeff[n] = gs * rate[n];
        cell.scatter(L, offset, coeff);
      }
      if (need_M) {
        T v[8];
        cell.gather(L.vol + offset, v);
PROST_UNROLL
        for (int n = 0; n < 8; ++n) mixed[n] += gs * v[n];
      }
    }
    if (need_M) {
      T gq[3];
      if (second_order) {
        wt.hessian_times(mixed, dq, gq);
      } else {
        wt.gradient(mixed, gq);
      }
PROST_UNROLL
      for (int a = 0; a < 3; ++a) {
        const T gx = gq[a] * L.inv_s[a];
        S0[a] += gx;
        S1[a] += tau * gx;
      }
    }
  }
}

template <typename T, bool second_order>
__device__ __forceinline__ void vjp_body(const Launch<T>& L) {
  const int b = blockIdx.y;
  const int p = blockIdx.x * blockDim.x + threadIdx.x;
  T S0[3] = {}, S1[3] = {};  // sum_k gx_k, sum_k tau_k gx_k
  T d[3] = {};
  if (p < L.P) {  // no early return: every lane takes part in the warp sum below
    if (L.need_vol && L.need_M) {
      vjp_walk<T, second_order, true, true>(L, b, p, S0, S1, d);
    } else if (L.need_vol) {
      vjp_walk<T, second_order, true, false>(L, b, p, S0, S1, d);
    } else if (L.need_M) {
      vjp_walk<T, second_order, false, true>(L, b, p, S0, S1, d);
    }
  }
  if (L.need_M) add_pose_gradient(L, b, p, S0, S1, d);
}

}  // namespace prost

// ------------------------------------------------------------------------------ extern "C" API

#define PROST_PARAMS(T)                                                                     \
  const T *__restrict__ vol, const T *__restrict__ M, const T *__restrict__ dM,             \
      const T *__restrict__ dirs, const T *__restrict__ lengths, const T *__restrict__ g,   \
      T *__restrict__ out, T *__restrict__ gvol, T *__restrict__ gM, int B, int P, int C,   \
      int vol_batched, int D, int H, int W, T inv_s0, T inv_s1, T inv_s2, T h0, T h1, T h2, \
      T step, int need_vol, int need_M, int brick_shift, int pose_slots, long long gvol_copy, \
      T gvol_fixed

#define PROST_LAUNCH(T)                                                           \
  prost::Launch<T> {                                                              \
    vol, M, dM, dirs, lengths, g, out, gvol, gM, B, P, C, vol_batched, {D, H, W}, \
        {inv_s0, inv_s1, inv_s2}, {h0, h1, h2}, step, need_vol, need_M, brick_shift,   \
        pose_slots, gvol_copy, gvol_fixed                                          \
  }

#define PROST_KERNEL(name, T, ...)                                            \
  extern "C" __global__ void __launch_bounds__(128) name(PROST_PARAMS(T)) {   \
    __VA_ARGS__(PROST_LAUNCH(T));                                              \
  }                                                                            \
  PROST_HOST_EXPORT(name)

// The float kernels also have a host version walking eight rays per
// call in vector lanes (emulation/lanes.h; the cpu backend's build): LANES(L) runs the lanes of
// emulated threads threadIdx.x, ..., threadIdx.x + 7, or returns false for a launch it does not
// cover, which then runs the scalar kernel thread by thread.
#if defined(PROST_HOST_LANES) && defined(__AVX2__)
#include "emulation/lanes.h"
#define PROST_KERNEL_LANES(name, T, LANES, ...)                                    \
  extern "C" __global__ void name(PROST_PARAMS(T)) { __VA_ARGS__(PROST_LAUNCH(T)); } \
  static bool name##_lanes(PROST_PARAMS(T)) { return LANES(PROST_LAUNCH(T)); }     \
  PROST_HOST_EXPORT_LANES(name, name##_lanes, prost::lanes::kLanes)
#else
#define PROST_KERNEL_LANES(name, T, LANES, ...) PROST_KERNEL(name, T, __VA_ARGS__)
#endif

PROST_KERNEL_LANES(prost_forward_f32, float, prost::lanes::line_integrals_of_block<false>,
                   prost::forward_body<float>)
PROST_KERNEL(prost_forward_f64, double, prost::forward_body<double>)
PROST_KERNEL_LANES(prost_jvp_f32, float, prost::lanes::line_integrals_of_block<true>, prost::jvp_body<float>)
PROST_KERNEL(prost_jvp_f64, double, prost::jvp_body<double>)
PROST_KERNEL_LANES(prost_vjp_f32, float, prost::lanes::gradients_of_block<false>,
                   prost::vjp_body<float, false>)
PROST_KERNEL(prost_vjp_f64, double, prost::vjp_body<double, false>)
PROST_KERNEL_LANES(prost_jvp_vjp_f32, float, prost::lanes::gradients_of_block<true>,
                   prost::vjp_body<float, true>)
PROST_KERNEL(prost_jvp_vjp_f64, double, prost::vjp_body<double, true>)

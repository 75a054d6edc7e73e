// Device building blocks of the ProST ray-marching kernels (prost.cu).
//
// Frames and sampling follow docs/geometry.md and prostlab/projector/rays.py:
//
//   * a ray p of batch item b leaves the source along the unit camera-frame direction d_p; its
//     sample k sits at tau_k = k * step and, in the volume frame (mm), at
//         x = c + tau_k w,      c = M[b][:, 3],  w = M[b][:, :3] d_p;
//   * its continuous voxel index along array axis a is q_a = x_a / s_a + (N_a - 1) / 2;
//   * only samples inside the support box |x_a| <= h_a = (N_a + 1) / 2 * s_a, with
//     0 <= tau_k <= L_p, are visited (clip_ray: the slab test of RayBundle.sample_range);
//   * the volume is read through its trilinear interpolant, zero outside the grid: each of the
//     8 corners of a sample's cell is bounds-checked, so no padded copy of the volume is needed.
//
// Derivatives are in index units (d/dq); the kernels divide by the spacing to get mm.
//
// Everything here also compiles as plain C++ with emulation/cuda_host.h (host emulation).

#ifndef PROST_COMMON_CUH
#define PROST_COMMON_CUH

#ifndef PROST_HOST_EXPORT
// Under nvcc / NVRTC a kernel's host-emulation entry point is nothing (see emulation/cuda_host.h).
#define PROST_HOST_EXPORT(kernel)
#endif

// Fully unroll the next loop. `#pragma unroll` is nvcc's spelling; g++ ignores it (with a
// warning that the host build silences) and needs its own, without which the small per-corner
// and per-axis loops stay loops and their arrays live in memory.
#ifdef PROST_HOST_EMULATION
#define PROST_UNROLL _Pragma("GCC unroll 16")
#else
#define PROST_UNROLL _Pragma("unroll")
#endif

namespace prost {

// ------------------------------------------------------------------------------- scalar helpers

__device__ __forceinline__ float floor_(float x) { return floorf(x); }
__device__ __forceinline__ double floor_(double x) { return floor(x); }
__device__ __forceinline__ float ceil_(float x) { return ceilf(x); }
__device__ __forceinline__ double ceil_(double x) { return ceil(x); }
__device__ __forceinline__ float abs_(float x) { return fabsf(x); }
__device__ __forceinline__ double abs_(double x) { return fabs(x); }

template <typename T>
__device__ __forceinline__ T min_(T a, T b) { return b < a ? b : a; }
template <typename T>
__device__ __forceinline__ T max_(T a, T b) { return a < b ? b : a; }

// The host worker (OpenMP thread) running this block, 0 on a GPU (emulation/cuda_host.h).
__device__ __forceinline__ long long host_worker() {
#ifdef PROST_HOST_EMULATION
  return prost_host::worker;
#else
  return 0;
#endif
}

// x in fixed point, round(x scale), as the two's-complement bits that an unsigned atomicAdd
// sums exactly (integer addition does not depend on the order).
template <typename T>
__device__ __forceinline__ unsigned long long to_fixed(T x, T scale) {
  return (unsigned long long)llrint((double)x * (double)scale);
}

// A value larger than any ray parameter (stands for +inf in the slab test).
template <typename T> __device__ __forceinline__ T huge_();
template <> __device__ __forceinline__ float huge_<float>() { return 1e30f; }
template <> __device__ __forceinline__ double huge_<double>() { return 1e300; }

// ---------------------------------------------------------------------------------- the launch

// Everything a kernel reads, for one launch. Pointers that a kernel does not use may be null.
//   vol (Bv, C, D, H, W), M (B, 3, 4), dM (B, 3, 4), dirs (P, 3), lengths (P,), g (B, C, P),
//   out (B, C, P), gvol (Bv, C, D, H, W), gM (B, 3, 4); Bv = B if vol_batched else 1.
//
// The layout of vol and gvol within a channel is linear (D, H, W) when brick_shift is 0. With
// brick_shift = b > 0 it is bricked: the grid, padded up to whole bricks of e = 2^b voxels a side,
// is cut into nb_a = ceil(N_a / e) bricks along each axis, stored brick after brick in (D, H, W)
// order, each brick's e^3 voxels in (D, H, W) order. Voxel (i0, i1, i2) then sits at
//   sum_a (i_a >> b) B_a + (i_a & (e - 1)) e^(2 - a),   B = (nb_1 nb_2, nb_2, 1) e^3,
// a sum of one term per axis, as in the linear layout (i_a times its stride). A trilinear cell's
// eight corners then lie in one brick of 2 KiB (float32, e = 8) or a few, and rays that pass
// near each other, in any direction, share bricks: far fewer cache misses in volumes larger than
// the caches. (Morton order inside the bricks measured slower.) Padding voxels are never read
// (the corner checks use N_a).
template <typename T>
struct Launch {
  const T* __restrict__ vol;
  const T* __restrict__ M;
  const T* __restrict__ dM;
  const T* __restrict__ dirs;
  const T* __restrict__ lengths;
  const T* __restrict__ g;
  T* __restrict__ out;
  T* __restrict__ gvol;
  T* __restrict__ gM;
  int B, P, C, vol_batched;
  int n[3];       // grid (D, H, W)
  T inv_s[3];     // 1 / spacing, array-axis order
  T half[3];      // half-sides of the support box, (N_a + 1) / 2 * s_a, mm
  T step;         // sample spacing along a ray, mm
  int need_vol, need_M;
  int brick_shift;  // 0: linear layout; b > 0: bricks of 2^b voxels a side (see above)
  // How the reductions across threads are done (see "the reductions" below):
  int pose_slots;      // 0: atomicAdd into gM (B, 3, 4); 1: gM is (B, pose_slot_count(), 12)
  long long gvol_copy; // > 0 (host only): each host worker w scatters into gvol + w gvol_copy
  T gvol_fixed;        // > 0: gvol is int64 (fixed point, this many units per 1), added exactly

  // Voxels per channel as stored (the padded grid when bricked).
  __device__ __forceinline__ long long voxels() const {
    if (brick_shift == 0) return (long long)n[0] * n[1] * n[2];
    long long count = 1;
PROST_UNROLL
    for (int a = 0; a < 3; ++a) count *= (long long)((n[a] + (1 << brick_shift) - 1) >> brick_shift);
    return count << (3 * brick_shift);
  }
  // The offset of index i along axis a within a channel (i may be -1 or N_a: the offset is then
  // computed but never used to read or write).
  __device__ __forceinline__ int axis_offset(int a, int i) const {
    if (brick_shift == 0) {
      return a == 0 ? i * n[1] * n[2] : (a == 1 ? i * n[2] : i);
    }
    const int b = brick_shift, e = 1 << b;
    const int nb1 = (n[1] + e - 1) >> b, nb2 = (n[2] + e - 1) >> b;
    const int brick = a == 0 ? nb1 * nb2 : (a == 1 ? nb2 : 1);
    const int local = a == 0 ? e * e : (a == 1 ? e : 1);
    return ((i >> b) * brick << (3 * b)) + (i & (e - 1)) * local;
  }
  // The first voxel of channel ch of the volume that batch item b reads.
  __device__ __forceinline__ long long channel_offset(int b, int ch) const {
    return ((long long)(vol_batched ? b : 0) * C + ch) * voxels();
  }
  // Index of (b, ch, p) in a (B, C, P) array.
  __device__ __forceinline__ long long image_index(int b, int ch, int p) const {
    return ((long long)b * C + ch) * P + p;
  }
};

// ------------------------------------------------------------------------------------- the ray

// A ray in the volume frame, x(tau) = c + tau w, clipped to the support: samples
// k = k_first, ..., k_first + count - 1.
template <typename T>
struct Ray {
  T c[3];
  T w[3];
  T d[3];          // camera-frame unit direction (for the pose gradient)
  T poison;        // 0, or NaN where c or w is not finite: added to the ray's outputs
  long long k_first;
  int count;
};

// The slab test of RayBundle.sample_range, operation for operation: on each axis the ray is
// inside the slab |x_a| <= h_a for tau in [min(t0, t1), max(t0, t1)] (the whole line, or none of
// it, when |w_a| < 1e-12); the ray's interval is the intersection of the three, then cut to
// [0, L]. The samples are the k with k * step in that interval.
template <typename T>
__device__ __forceinline__ void clip_ray(Ray<T>& ray, const T half[3], T length, T step) {
  T t_in = -huge_<T>(), t_out = huge_<T>();
PROST_UNROLL
  for (int a = 0; a < 3; ++a) {
    T lo, hi;
    if (abs_(ray.w[a]) < T(1e-12)) {
      const bool inside = abs_(ray.c[a]) <= half[a];
      lo = inside ? -huge_<T>() : huge_<T>();
      hi = inside ? huge_<T>() : -huge_<T>();
    } else {
      const T t0 = (-half[a] - ray.c[a]) / ray.w[a];
      const T t1 = (half[a] - ray.c[a]) / ray.w[a];
      lo = min_(t0, t1);
      hi = max_(t0, t1);
      if (!(t0 == t0 && t1 == t1)) {  // NaN in M or d: no samples (as in sample_range)
        lo = huge_<T>();
        hi = -huge_<T>();
      }
    }
    t_in = max_(t_in, lo);
    t_out = min_(t_out, hi);
  }
  ray.k_first = 0;
  ray.count = 0;
  // As in sample_range: a miss, a box wholly behind the source or beyond the pixel, or NaN.
  if (!(t_in <= t_out) || t_out < T(0) || t_in > length) return;
  t_in = min_(max_(t_in, T(0)), length);
  t_out = min_(max_(t_out, T(0)), length);
  const T k_first = ceil_(t_in / step);
  const T k_last = floor_(t_out / step);
  if (k_last < k_first) return;
  ray.k_first = (long long)k_first;
  ray.count = (int)(k_last - k_first) + 1;
}

// Ray p of batch item b: c = M[:, 3], w = M[:, :3] d_p, clipped to the support.
template <typename T>
__device__ __forceinline__ Ray<T> make_ray(const Launch<T>& L, int b, int p) {
  Ray<T> ray;
  const T* m = L.M + 12 * (long long)b;
PROST_UNROLL
  for (int a = 0; a < 3; ++a) ray.d[a] = L.dirs[3 * (long long)p + a];
PROST_UNROLL
  for (int a = 0; a < 3; ++a) {
    ray.c[a] = m[4 * a + 3];
    ray.w[a] = m[4 * a] * ray.d[0] + m[4 * a + 1] * ray.d[1] + m[4 * a + 2] * ray.d[2];
  }
  ray.poison = (ray.c[0] + ray.c[1] + ray.c[2] + ray.w[0] + ray.w[1] + ray.w[2]) * T(0);
  clip_ray(ray, L.half, L.lengths[p], L.step);
  return ray;
}

// Index-space velocity of the ray's samples along a tangent dM: dq(tau) = (dc + tau dw) / s,
// with dc = dM[:, 3] and dw = dM[:, :3] d.
template <typename T>
struct Velocity {
  T dc[3];
  T dw[3];

  __device__ __forceinline__ Velocity(const T* dm, const T d[3]) {
PROST_UNROLL
    for (int a = 0; a < 3; ++a) {
      dc[a] = dm[4 * a + 3];
      dw[a] = dm[4 * a] * d[0] + dm[4 * a + 1] * d[1] + dm[4 * a + 2] * d[2];
    }
  }
  __device__ __forceinline__ void at(T tau, const T inv_s[3], T dq[3]) const {
PROST_UNROLL
    for (int a = 0; a < 3; ++a) dq[a] = (dc[a] + tau * dw[a]) * inv_s[a];
  }
};

// ------------------------------------------------------------------------------------ the cell

// The cell of one sample: the offsets of its corner indices floor(q_a) and floor(q_a) + 1 along
// each axis (Launch::axis_offset; meaningful only for corners inside the grid; a channel holds
// fewer than 2^31 voxels), the fractional position f in [0, 1) and which corners exist.
// The index is clamped to [-1, N_a] first, as the torch backend does; inside the support this
// changes nothing.
template <typename T>
struct Cell {
  int off[3][2];
  T f[3];
  bool lo[3];  // corner index floor(q_a) is inside the grid
  bool hi[3];  // corner index floor(q_a) + 1 is inside the grid
  bool all;    // all eight corners are inside the grid (most samples: no per-corner test)

  __device__ __forceinline__ Cell(const Ray<T>& ray, T tau, const Launch<T>& L) {
PROST_UNROLL
    for (int a = 0; a < 3; ++a) {
      const T x = ray.c[a] + tau * ray.w[a];
      T q = x * L.inv_s[a] + T(L.n[a] - 1) * T(0.5);
      q = min_(max_(q, T(-1)), T(L.n[a]));
      const T fl = floor_(q);
      const int i = (int)fl;
      f[a] = q - fl;
      // Unsigned compares: 0 <= i < N, checked in full so that no input can read out of bounds.
      lo[a] = (unsigned)i < (unsigned)L.n[a];
      hi[a] = (unsigned)(i + 1) < (unsigned)L.n[a];
      off[a][0] = L.axis_offset(a, i);
      off[a][1] = L.axis_offset(a, i + 1);
    }
    all = lo[0] && hi[0] && lo[1] && hi[1] && lo[2] && hi[2];
  }

  // Whether corner n = 4 a + 2 b + c (offsets a, b, c along the three axes) lies in the grid.
  __device__ __forceinline__ bool inside(int n) const {
    return ((n & 4) ? hi[0] : lo[0]) && ((n & 2) ? hi[1] : lo[1]) && ((n & 1) ? hi[2] : lo[2]);
  }
  __device__ __forceinline__ int index(int n) const {
    return off[0][(n >> 2) & 1] + off[1][(n >> 1) & 1] + off[2][n & 1];
  }

  // v[n] = channel[corner n], or 0 outside the grid.
  __device__ __forceinline__ void gather(const T* __restrict__ channel, T v[8]) const {
    if (all) {
PROST_UNROLL
      for (int n = 0; n < 8; ++n) v[n] = __ldg(channel + index(n));
    } else {
PROST_UNROLL
      for (int n = 0; n < 8; ++n) v[n] = inside(n) ? __ldg(channel + index(n)) : T(0);
    }
  }

  // gvol[offset + corner n] += coeff[n] for the corners inside the grid, as L.gvol_fixed and
  // L.gvol_copy say (see "the reductions" below).
  __device__ __forceinline__ void scatter(const Launch<T>& L, long long offset,
                                          const T coeff[8]) const {
    if (L.gvol_fixed > T(0)) {
      unsigned long long* fixed = reinterpret_cast<unsigned long long*>(L.gvol) + offset;
PROST_UNROLL
      for (int n = 0; n < 8; ++n)
        if (inside(n)) atomicAdd(fixed + index(n), to_fixed(coeff[n], L.gvol_fixed));
    } else if (L.gvol_copy > 0) {
      T* own = L.gvol + host_worker() * L.gvol_copy + offset;
      if (all) {
PROST_UNROLL
        for (int n = 0; n < 8; ++n) own[index(n)] += coeff[n];
      } else {
PROST_UNROLL
        for (int n = 0; n < 8; ++n)
          if (inside(n)) own[index(n)] += coeff[n];
      }
    } else {
      T* channel = L.gvol + offset;
PROST_UNROLL
      for (int n = 0; n < 8; ++n)
        if (inside(n)) atomicAdd(channel + index(n), coeff[n]);
    }
  }
};

// ----------------------------------------------------------------------------- host prefetch

// Samples a host thread looks ahead. A CPU thread walks one ray at a time, and the cells of a
// ray through a volume larger than the caches are a chain of cache misses: asking for the cell
// of sample k + kPrefetchDistance while sample k is computed overlaps those misses. On a GPU the
// other warps of a multiprocessor hide the latency instead, and this compiles to nothing.
constexpr int kPrefetchDistance = 32;

// Prefetch the cache lines of the cell of sample k (an absolute index, k_first <= k) of the
// ray in channel; for_write when the cell will be scattered into. The four addresses are the
// corners (i, j, l), (i, j+1, l), (i+1, j, l), (i+1, j+1, l), whose lines also hold (..., l+1)
// but at a line's or brick's edge; the indices are clamped into the grid, so no address outside
// the channel is formed.
template <typename T>
__device__ __forceinline__ void prefetch_cell(const Ray<T>& ray, long long k, const Launch<T>& L,
                                              const T* channel, bool for_write) {
#ifdef PROST_HOST_EMULATION
  if (k >= ray.k_first + ray.count) return;
  const T tau = T(k) * L.step;
  int i[3];
PROST_UNROLL
  for (int a = 0; a < 3; ++a) {
    const T q = (ray.c[a] + tau * ray.w[a]) * L.inv_s[a] + T(L.n[a] - 1) * T(0.5);
    i[a] = min_(max_((int)floor_(q), 0), max_(L.n[a] - 2, 0));
  }
  const T* base = channel + L.axis_offset(2, i[2]);
PROST_UNROLL
  for (int n = 0; n < 4; ++n) {
    const T* line = base + L.axis_offset(0, i[0] + (n >> 1)) + L.axis_offset(1, i[1] + (n & 1));
    if (for_write) {
      __builtin_prefetch(line, 1);
    } else {
      __builtin_prefetch(line, 0);
    }
  }
#else
  (void)ray; (void)k; (void)L; (void)channel; (void)for_write;
#endif
}

// ------------------------------------------------------------- the trilinear interpolant's jets

// With per-axis weights u_a = (1 - f_a, f_a), the interpolant of corner values v is
//   f(q) = sum_{abc} u_0[a] u_1[b] u_2[c] v[abc]
// and its derivatives in index units inside the cell are
//   df/dq_0 = sum_{bc} u_1[b] u_2[c] (v[1bc] - v[0bc])                      (and cyclically),
//   d2f/dq_0 dq_1 = sum_c u_2[c] (v[11c] - v[10c] - v[01c] + v[00c])         (and cyclically),
//   d2f/dq_a^2 = 0.
template <typename T>
struct Weights {
  T u[3][2];

  __device__ __forceinline__ explicit Weights(const T f[3]) {
PROST_UNROLL
    for (int a = 0; a < 3; ++a) {
      u[a][0] = T(1) - f[a];
      u[a][1] = f[a];
    }
  }

  // The trilinear weight of corner n: u_0[a] u_1[b] u_2[c].
  __device__ __forceinline__ T weight(int n) const {
    return u[0][(n >> 2) & 1] * u[1][(n >> 1) & 1] * u[2][n & 1];
  }

  __device__ __forceinline__ T value(const T v[8]) const {
    T s = T(0);
PROST_UNROLL
    for (int n = 0; n < 8; ++n) s += weight(n) * v[n];
    return s;
  }

  // grad[a] = df/dq_a.
  __device__ __forceinline__ void gradient(const T v[8], T grad[3]) const {
    grad[0] = grad[1] = grad[2] = T(0);
PROST_UNROLL
    for (int i = 0; i < 2; ++i) {
PROST_UNROLL
      for (int j = 0; j < 2; ++j) {
        grad[0] += u[1][i] * u[2][j] * (v[4 + 2 * i + j] - v[2 * i + j]);
        grad[1] += u[0][i] * u[2][j] * (v[4 * i + 2 + j] - v[4 * i + j]);
        grad[2] += u[0][i] * u[1][j] * (v[4 * i + 2 * j + 1] - v[4 * i + 2 * j]);
      }
    }
  }

  // out = H dq, the Hessian (zero diagonal) of the interpolant times dq.
  __device__ __forceinline__ void hessian_times(const T v[8], const T dq[3], T out[3]) const {
    T h01 = T(0), h02 = T(0), h12 = T(0);
PROST_UNROLL
    for (int i = 0; i < 2; ++i) {
      h01 += u[2][i] * (v[6 + i] - v[4 + i] - v[2 + i] + v[i]);
      h02 += u[1][i] * (v[5 + 2 * i] - v[4 + 2 * i] - v[1 + 2 * i] + v[2 * i]);
      h12 += u[0][i] * (v[4 * i + 3] - v[4 * i + 2] - v[4 * i + 1] + v[4 * i]);
    }
    out[0] = h01 * dq[1] + h02 * dq[2];
    out[1] = h01 * dq[0] + h12 * dq[2];
    out[2] = h02 * dq[0] + h12 * dq[1];
  }

  // The rate of change of corner n's weight along dq: grad(weight_n) . dq.
  __device__ __forceinline__ T weight_rate(int n, const T dq[3]) const {
    const int a = (n >> 2) & 1, b = (n >> 1) & 1, c = n & 1;
    const T s0 = a ? T(1) : T(-1), s1 = b ? T(1) : T(-1), s2 = c ? T(1) : T(-1);
    return s0 * u[1][b] * u[2][c] * dq[0] + s1 * u[0][a] * u[2][c] * dq[1] +
           s2 * u[0][a] * u[1][b] * dq[2];
  }
};

// ------------------------------------------------------------------------------ the reductions

// Two sums run across threads: the pose gradient gM[b] over the rays of b, and the volume
// gradient over the samples that touch a voxel. By default both use atomicAdd, whose order
// varies from run to run (floating-point addition is not associative), so repeated gradients
// differ in their last bits. A launch can ask for a fixed order instead:
//
//   * pose_slots: each warp (on the host: each run of kSlotRays (32) consecutive rays, which one
//     worker walks in order) adds its rays' 12 entries into its own slot, with plain adds;
//     the caller sums the slots in a fixed tree. Slot of ray p: p / 32.
//   * gvol_copy (host): blocks are dealt to workers in a fixed round robin, and each worker
//     scatters into its own copy of gvol with plain adds; the caller sums the copies in worker
//     order. The result depends on the number of workers, not on their timing.
//   * gvol_fixed (GPU or host): gvol is an int64 array and each contribution is rounded to a
//     multiple of 1 / gvol_fixed first; integer atomics give the same sum in any order.
constexpr int kSlotRays = 32;

// The sum of v over the warp, in lane 0 (the identity where warpSize is 1, as in the host
// emulation). Every lane of the warp must call it.
template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
PROST_UNROLL
  for (int offset = warpSize / 2; offset > 0; offset /= 2)
    v += __shfl_down_sync(0xffffffffu, v, offset);
  return v;
}

// Add ray p's share of the pose gradient of batch item b:
//   gM[b] += [ S1 d^T | S0 ],   S0 = sum_k gx_k,  S1 = sum_k tau_k gx_k,
// where gx_k is the gradient w.r.t. the sample position x_k (mm). The 12 entries are summed over
// the warp first, so a warp issues 12 adds rather than 12 per ray: atomics into gM, or, with
// pose_slots, plain adds into the warp's slot (slots of gridDim.x blockDim.x / kSlotRays per
// batch item). Every thread of the block must call it (inactive threads with zero sums), since
// the warp sum needs all lanes.
template <typename T>
__device__ __forceinline__ void add_pose_gradient(const Launch<T>& L, int b, int p, const T S0[3],
                                                  const T S1[3], const T d[3]) {
  const bool lane0 = (threadIdx.x % warpSize) == 0;
  const long long slots = (long long)gridDim.x * blockDim.x / kSlotRays;
  T* target = L.pose_slots ? L.gM + 12 * ((long long)b * slots + p / kSlotRays)
                           : L.gM + 12 * (long long)b;
PROST_UNROLL
  for (int i = 0; i < 3; ++i) {
PROST_UNROLL
    for (int j = 0; j < 4; ++j) {
      const T e = warp_sum(j < 3 ? S1[i] * d[j] : S0[i]);
      if (!lane0) continue;
      if (L.pose_slots) {
        target[4 * i + j] += e;
      } else {
        atomicAdd(target + 4 * i + j, e);
      }
    }
  }
}

}  // namespace prost

#endif  // PROST_COMMON_CUH

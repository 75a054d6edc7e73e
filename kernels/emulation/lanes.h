// Eight rays at a time in the lanes of an AVX2 vector: the host's float32 kernels.
//
// The cpu backend runs prost.cu's kernels one emulated thread (one ray) after another, and a
// sample's scalar work (its cell, the eight trilinear weights, the gathers of each channel) is
// what a step of training or registration spends most of its time on. Here the same walk runs
// for the eight rays p0, ..., p0 + 7 of a block at once, one ray per lane of a float vector:
// every lane does the arithmetic of the scalar kernel, operation for operation and in the same
// order (IEEE single precision, no contraction), so each lane's result has the same bits as the
// scalar kernel's for its ray. The rays of a block are neighbouring pixels (the backend tiles
// them in Morton order), so their clipped sample ranges nearly agree: the walk steps through
// the union of the eight ranges, absolute sample index k, and a lane adds nothing where k lies
// outside its own range. The Weights formulas of prost_common.cuh are reused on the F8 type.
//
// Images and pose gradients have the scalar kernel's bits. A volume gradient is scattered from
// the lanes one ray after another at each sample (neighbouring rays share corners), into the
// host worker's own copy: the scalar kernel's terms, added to a voxel in another order, so equal
// to rounding. Float only; double, and the volume gradients summed by atomics or in fixed point
// (the GPU's reductions, emulated), run the scalar kernels.
// Compiled into the cpu backend (-DPROST_HOST_LANES, AVX2), never into the GPU's kernels or the
// single-threaded emulation the tests compare them with.

#ifndef PROST_LANES_H
#define PROST_LANES_H

#include <immintrin.h>

#include <cmath>

namespace prost {
namespace lanes {

constexpr int kLanes = 8;
// Samples the lanes look ahead (kPrefetchDistance of prost_common.cuh) where that pays
// (prefetch_pays): a 128^2 DRR of the 512 x 512 x 133 chest CT went from 58 to 44 ms (AP) and
// 105 to 61 ms (oblique), a 256^2 one from 281 to 164 ms (one thread).
constexpr int kLanePrefetch = 16;
constexpr long long kPrefetchVoxels = 1LL << 23;

typedef float f8 __attribute__((vector_size(32)));
typedef int i8 __attribute__((vector_size(32)));
typedef unsigned int u8 __attribute__((vector_size(32)));

// Eight floats with the arithmetic that prost_common.cuh's templates use on T (+, -, *, T(x)).
struct F8 {
  f8 v;
  F8() : v(f8{}) {}
  F8(f8 x) : v(x) {}
  F8(double x) : v(f8{} + (float)x) {}
  F8 operator+(F8 o) const { return v + o.v; }
  F8 operator-(F8 o) const { return v - o.v; }
  F8 operator*(F8 o) const { return v * o.v; }
  F8 operator-() const { return -v; }
  F8& operator+=(F8 o) { v += o.v; return *this; }
};

inline i8 splat_int(int x) { return i8{} + x; }

// Where mask is set, a; elsewhere b (masks are 0 or -1 per lane).
inline f8 select(i8 mask, f8 a, f8 b) { return mask ? a : b; }

// base[idx] in the lanes where mask is set, 0 elsewhere (no read there).
inline f8 gather(const float* base, i8 idx, i8 mask) {
  return (f8)_mm256_mask_i32gather_ps(_mm256_setzero_ps(), base, (__m256i)idx, (__m256)mask, 4);
}

// Launch::axis_offset, lane by lane.
inline i8 axis_offset(const Launch<float>& L, int a, i8 i) {
  if (L.brick_shift == 0) {
    return a == 0 ? i * splat_int(L.n[1]) * L.n[2] : (a == 1 ? i * splat_int(L.n[2]) : i);
  }
  const int b = L.brick_shift, e = 1 << b;
  const int nb1 = (L.n[1] + e - 1) >> b, nb2 = (L.n[2] + e - 1) >> b;
  const int brick = a == 0 ? nb1 * nb2 : (a == 1 ? nb2 : 1);
  const int local = a == 0 ? e * e : (a == 1 ? e : 1);
  return (((i >> b) * brick) << (3 * b)) + (i & (e - 1)) * local;
}

// The eight rays p0 + l of batch item b (make_ray each), packed lane by lane; lanes past the
// last ray have no samples.
struct Rays8 {
  f8 c[3], w[3], d[3], poison;
  i8 k_first, k_end;  // samples k_first <= k < k_end
  long long k_lo = 0, k_hi = 0;  // the union of the lanes' ranges
  int p0;

  Rays8(const Launch<float>& L, int b, int p0_) : p0(p0_) {
    bool any = false;
    for (int l = 0; l < kLanes; ++l) {
      Ray<float> ray{};
      if (p0 + l < L.P) ray = make_ray(L, b, p0 + l);
      for (int a = 0; a < 3; ++a) {
        c[a][l] = ray.c[a];
        w[a][l] = ray.w[a];
        d[a][l] = ray.d[a];
      }
      poison[l] = ray.poison;
      k_first[l] = (int)ray.k_first;
      k_end[l] = (int)ray.k_first + ray.count;
      if (ray.count > 0) {
        k_lo = any ? min_(k_lo, ray.k_first) : ray.k_first;
        k_hi = any ? max_(k_hi, ray.k_first + ray.count) : ray.k_first + ray.count;
        any = true;
      }
    }
  }
  // Lanes whose ray has sample k.
  i8 active(long long k) const {
    const i8 kk = splat_int((int)k);
    return (kk >= k_first) & (kk < k_end);
  }
};

// Cell<float> of one sample in each lane: the corner offsets, the fractions and which corners
// exist, with the scalar constructor's arithmetic.
struct Cell8 {
  i8 off[3][2];
  F8 f[3];
  i8 lo[3], hi[3];

  Cell8(const Rays8& rays, float tau, const Launch<float>& L) {
    for (int a = 0; a < 3; ++a) {
      const f8 x = rays.c[a] + tau * rays.w[a];
      f8 q = x * L.inv_s[a] + float(L.n[a] - 1) * 0.5f;
      const f8 lower = f8{} - 1.0f, upper = f8{} + float(L.n[a]);
      q = select(q < lower, lower, q);  // max_(q, -1)
      q = select(upper < q, upper, q);  // min_(q, N)
      const f8 fl = (f8)_mm256_floor_ps((__m256)q);
      const i8 i = __builtin_convertvector(fl, i8);
      f[a] = q - fl;
      const u8 n = (u8{} + (unsigned)L.n[a]);
      lo[a] = (i8)((u8)i < n);
      hi[a] = (i8)((u8)(i + 1) < n);
      off[a][0] = axis_offset(L, a, i);
      off[a][1] = axis_offset(L, a, i + 1);
    }
  }
  // Lanes where corner n exists, among those in mask.
  i8 inside(int n, i8 mask) const {
    return mask & ((n & 4) ? hi[0] : lo[0]) & ((n & 2) ? hi[1] : lo[1]) &
           ((n & 1) ? hi[2] : lo[2]);
  }
  i8 index(int n) const {
    return off[0][(n >> 2) & 1] + off[1][(n >> 1) & 1] + off[2][n & 1];
  }
  // v[n] = channel[corner n] in the lanes of mask where the corner exists, else 0.
  void gather_corners(const float* channel, i8 mask, F8 v[8]) const {
    if (pairs_adjacent(mask)) {
      for (int n = 0; n < 8; n += 2) gather_pair(channel, n, inside(n, mask), v);
      return;
    }
    for (int n = 0; n < 8; ++n) v[n] = gather(channel, index(n), inside(n, mask));
  }
  // Whether, in every lane of mask, corners n and n + 1 (one voxel apart along axis 2) both
  // exist or both do not, and lie side by side in memory (the linear layout, or a cell inside
  // one brick): then one 64-bit load reads the pair.
  bool pairs_adjacent(i8 mask) const {
    const i8 apart = (off[2][1] - off[2][0]) != 1;
    const i8 edge = ~(lo[2] & hi[2]);
    return _mm256_movemask_ps((__m256)((apart | edge) & mask)) == 0;
  }
  // v[n], v[n + 1] (n even) for the lanes of exists, 0 elsewhere: two gathers of four 64-bit
  // pairs, split into the pairs' first and second floats (the same values as eight-float gathers
  // of each corner, in half the gathers).
  void gather_pair(const float* channel, int n, i8 exists, F8 v[8]) const {
    const __m256i at = (__m256i)index(n);
    const __m256i live = (__m256i)exists;
    const long long* base = reinterpret_cast<const long long*>(channel);
    const __m256i low = _mm256_mask_i32gather_epi64(
        _mm256_setzero_si256(), base, _mm256_castsi256_si128(at),
        _mm256_cvtepi32_epi64(_mm256_castsi256_si128(live)), 4);
    const __m256i high = _mm256_mask_i32gather_epi64(
        _mm256_setzero_si256(), base, _mm256_extracti128_si256(at, 1),
        _mm256_cvtepi32_epi64(_mm256_extracti128_si256(live, 1)), 4);
    // low = (a0 b0 a1 b1 | a2 b2 a3 b3), high = (a4 b4 ... a7 b7): the a's and the b's, in order.
    const __m256 first = _mm256_shuffle_ps((__m256)low, (__m256)high, 0x88);
    const __m256 second = _mm256_shuffle_ps((__m256)low, (__m256)high, 0xDD);
    v[n] = (f8)_mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(first), 0xD8));
    v[n + 1] = (f8)_mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(second), 0xD8));
  }
};

// Whether looking ahead pays for a group of rays: in a volume of at least kPrefetchVoxels voxels
// a channel (32 MiB of float32, as large as a big last-level cache) whose rays lie a voxel or
// more apart at mid-depth (lanes 0 and 1 are neighbouring pixels), so that each ray's cells are
// its own and miss the caches. Where the caches hold the volume, or neighbouring rays share their
// cells, the prefetches cost more than they save (a fifth of a 64^3 volume's time, a quarter of a
// 256^2 DRR of a 256^3 cube's).
inline bool prefetch_pays(const Rays8& rays, const Launch<float>& L) {
  if (L.voxels() < kPrefetchVoxels || rays.k_lo >= rays.k_hi) return false;
  const float tau = 0.5f * float(rays.k_lo + rays.k_hi) * L.step;
  float apart = 0.0f;
  for (int a = 0; a < 3; ++a)
    apart = max_(apart, std::fabs(tau * (rays.w[a][1] - rays.w[a][0])) * L.inv_s[a]);
  return apart >= 1.0f;
}

// prefetch_cell for each lane: the four cache lines of the cell of sample k of the lane's ray
// (the indices clamped into the grid, so every address lies in the channel).
inline void prefetch_cells(const Rays8& rays, long long k, const Launch<float>& L,
                           const float* channel) {
  const float tau = float(k) * L.step;
  i8 i[3];
  for (int a = 0; a < 3; ++a) {
    const f8 q = (rays.c[a] + tau * rays.w[a]) * L.inv_s[a] + float(L.n[a] - 1) * 0.5f;
    i8 cell = __builtin_convertvector((f8)_mm256_floor_ps((__m256)q), i8);
    const i8 top = splat_int(L.n[a] - 2 > 0 ? L.n[a] - 2 : 0);
    cell = cell < 0 ? splat_int(0) : cell;
    i[a] = top < cell ? top : cell;
  }
  const i8 base = axis_offset(L, 2, i[2]);
  const i8 row[2] = {axis_offset(L, 1, i[1]), axis_offset(L, 1, i[1] + 1)};
  const i8 slice[2] = {axis_offset(L, 0, i[0]), axis_offset(L, 0, i[0] + 1)};
  for (int n = 0; n < 4; ++n) {
    const i8 at = base + slice[n >> 1] + row[n & 1];
    for (int l = 0; l < kLanes; ++l) __builtin_prefetch(channel + at[l], 0);
  }
}

// out[b, ch, p] for the lanes' rays: value * step + poison (as the scalar kernels store it).
inline void store(const Launch<float>& L, const Rays8& rays, int b, int ch, F8 acc) {
  const f8 value = acc.v * L.step + rays.poison;
  for (int l = 0; l < kLanes && rays.p0 + l < L.P; ++l)
    L.out[L.image_index(b, ch, rays.p0 + l)] = value[l];
}

// forward_body and jvp_body of prost.cu (jvp = true: the derivative along dM) for eight rays,
// looking ahead or not (a template parameter: a test in the loop slowed the walks that do not).
template <bool jvp, bool prefetch>
inline void line_integrals(const Launch<float>& L, int b, const Rays8& rays) {
  f8 dc[3], dw[3];  // Velocity of each lane's ray
  if (jvp) {
    for (int l = 0; l < kLanes; ++l) {
      const float d[3] = {rays.d[0][l], rays.d[1][l], rays.d[2][l]};
      const Velocity<float> vel(L.dM + 12 * (long long)b, d);
      for (int a = 0; a < 3; ++a) {
        dc[a][l] = vel.dc[a];
        dw[a][l] = vel.dw[a];
      }
    }
  }
  for (int c0 = 0; c0 < L.C; c0 += kChannelTile) {
    F8 acc[kChannelTile];
    for (long long k = rays.k_lo; k < rays.k_hi; ++k) {
      if (prefetch && k + kLanePrefetch < rays.k_hi)
        prefetch_cells(rays, k + kLanePrefetch, L, L.vol + L.channel_offset(b, c0));
      const i8 live = rays.active(k);
      const float tau = float(k) * L.step;
      const Cell8 cell(rays, tau, L);
      const Weights<F8> wt(cell.f);
      F8 dq[3];
      if (jvp)
        for (int a = 0; a < 3; ++a) dq[a] = (dc[a] + tau * dw[a]) * L.inv_s[a];
      PROST_UNROLL
      for (int j = 0; j < kChannelTile; ++j) {
        if (c0 + j >= L.C) break;
        F8 v[8];
        cell.gather_corners(L.vol + L.channel_offset(b, c0 + j), live, v);
        F8 sample;
        if (jvp) {
          F8 grad[3];
          wt.gradient(v, grad);
          sample = grad[0] * dq[0] + grad[1] * dq[1] + grad[2] * dq[2];
        } else {
          sample = wt.value(v);
        }
        acc[j].v = select(live, (acc[j] + sample).v, acc[j].v);
      }
    }
    for (int j = 0; j < kChannelTile && c0 + j < L.C; ++j) store(L, rays, b, c0 + j, acc[j]);
  }
}

// s g[b, ch, p] of the lanes' pixels p = p0 + l (0 past the last), as the scalar kernel scales it.
inline f8 scaled_cotangent(const Launch<float>& L, int b, int ch, int p0) {
  f8 gs{};
  for (int l = 0; l < kLanes && p0 + l < L.P; ++l)
    gs[l] = L.g[L.image_index(b, ch, p0 + l)] * L.step;
  return gs;
}

// own[corner n] += coeff[n] for each lane of mask where the corner exists, lane after lane (the
// order of the rays), as Cell::scatter does into a host worker's copy of gvol.
inline void scatter_lanes(float* own, const Cell8& cell, i8 mask, const F8 coeff[8]) {
  i8 at[8];
  int exists[8];
  for (int n = 0; n < 8; ++n) {
    at[n] = cell.index(n);
    exists[n] = _mm256_movemask_ps((__m256)cell.inside(n, mask));
  }
  for (int l = 0; l < kLanes; ++l) {
    PROST_UNROLL
    for (int n = 0; n < 8; ++n)
      if (exists[n] >> l & 1) own[at[n][l]] += coeff[n].v[l];
  }
}

// vjp_walk<float, second_order, need_vol, need_M> for eight rays: each lane computes the scalar
// kernel's coefficients and pose-gradient sums, operation for operation. The pose gradient is
// then added lane by lane (the order the scalar kernel adds its rays in): the same bits. The
// volume gradient is scattered sample by sample, the eight rays in turn, into the worker's copy
// of gvol: the same terms as the scalar kernel's, added to a voxel in another order (its rays'
// samples interleaved), so equal to rounding, and the same bits from run to run.
// (flatten: inline every call, which g++ stopped doing for the pose-only walk once the volume's
// walks were compiled beside it: 0.8x its speed.)
template <bool second_order, bool need_vol, bool need_M, bool prefetch>
__attribute__((flatten)) inline void gradients(const Launch<float>& L, int b, const Rays8& rays) {
  const int p0 = rays.p0;
  f8 dc[3], dw[3];
  for (int l = 0; l < kLanes; ++l) {
    const float d[3] = {rays.d[0][l], rays.d[1][l], rays.d[2][l]};
    const Velocity<float> vel(second_order ? L.dM + 12 * (long long)b : L.M, d);
    for (int a = 0; a < 3; ++a) {
      dc[a][l] = vel.dc[a];
      dw[a][l] = vel.dw[a];
    }
  }
  float* own = need_vol ? L.gvol + host_worker() * L.gvol_copy : nullptr;
  // s g of each lane's pixel, for the first kChannelTile channels read once, not every sample
  // (the stores into gvol may alias g for all the compiler knows; 1.04-1.13x on the pose passes).
  f8 held[kChannelTile];
  for (int ch = 0; ch < kChannelTile && ch < L.C; ++ch) held[ch] = scaled_cotangent(L, b, ch, p0);
  F8 S0[3], S1[3];
  for (int a = 0; a < 3; ++a) S0[a] = S1[a] = rays.poison;
  for (long long k = rays.k_lo; k < rays.k_hi; ++k) {
    if (prefetch && k + kLanePrefetch < rays.k_hi) {
      if (need_M) prefetch_cells(rays, k + kLanePrefetch, L, L.vol + L.channel_offset(b, 0));
      if (need_vol) prefetch_cells(rays, k + kLanePrefetch, L, own + L.channel_offset(b, 0));
    }
    const i8 live = rays.active(k);
    const float tau = float(k) * L.step;
    const Cell8 cell(rays, tau, L);
    const Weights<F8> wt(cell.f);
    F8 dq[3];
    if (second_order)
      for (int a = 0; a < 3; ++a) dq[a] = (dc[a] + tau * dw[a]) * L.inv_s[a];
    F8 rate[8];
    if (need_vol) {
      PROST_UNROLL
      for (int n = 0; n < 8; ++n) rate[n] = second_order ? wt.weight_rate(n, dq) : wt.weight(n);
    }
    F8 mixed[8];
    for (int ch = 0; ch < L.C; ++ch) {
      const f8 gs = ch < kChannelTile ? held[ch] : scaled_cotangent(L, b, ch, p0);
      if (need_vol) {
        F8 coeff[8];
        PROST_UNROLL
        for (int n = 0; n < 8; ++n) coeff[n] = F8(gs) * rate[n];
        scatter_lanes(own + L.channel_offset(b, ch), cell, live, coeff);
      }
      if (need_M) {
        F8 v[8];
        cell.gather_corners(L.vol + L.channel_offset(b, ch), live, v);
        PROST_UNROLL
        for (int n = 0; n < 8; ++n) mixed[n] += F8(gs) * v[n];
      }
    }
    if (need_M) {
      F8 gq[3];
      if (second_order) {
        wt.hessian_times(mixed, dq, gq);
      } else {
        wt.gradient(mixed, gq);
      }
      for (int a = 0; a < 3; ++a) {
        const F8 gx = gq[a] * F8(L.inv_s[a]);
        S0[a].v = select(live, (S0[a] + gx).v, S0[a].v);
        S1[a].v = select(live, (S1[a] + F8(tau) * gx).v, S1[a].v);
      }
    }
  }
  if (!need_M) return;
  const unsigned first = threadIdx.x;
  for (int l = 0; l < kLanes; ++l) {
    threadIdx.x = first + l;
    const float s0[3] = {S0[0].v[l], S0[1].v[l], S0[2].v[l]};
    const float s1[3] = {S1[0].v[l], S1[1].v[l], S1[2].v[l]};
    const float d[3] = {rays.d[0][l], rays.d[1][l], rays.d[2][l]};
    add_pose_gradient(L, b, p0 + l, s0, s1, d);
  }
  threadIdx.x = first;
}

template <bool second_order, bool need_vol, bool need_M>
inline void gradients_of_rays(const Launch<float>& L, int b, const Rays8& rays) {
  if (prefetch_pays(rays, L)) {
    gradients<second_order, need_vol, need_M, true>(L, b, rays);
  } else {
    gradients<second_order, need_vol, need_M, false>(L, b, rays);
  }
}

// The launch entries (prost.cu, PROST_KERNEL_LANES): the eight emulated threads from
// threadIdx.x on.
template <bool jvp>
inline bool line_integrals_of_block(const Launch<float>& L) {
  const Rays8 rays(L, blockIdx.y, blockIdx.x * blockDim.x + threadIdx.x);
  if (prefetch_pays(rays, L)) {
    line_integrals<jvp, true>(L, blockIdx.y, rays);
  } else {
    line_integrals<jvp, false>(L, blockIdx.y, rays);
  }
  return true;
}

// The vjp and jvp_vjp kernels' lanes: the pose gradient, the volume gradient scattered into a
// host worker's own copy (gvol_copy), or both. A volume gradient summed by atomics or in fixed
// point (the launches that emulate the GPU's reductions) is left to the scalar kernel: false.
template <bool second_order>
inline bool gradients_of_block(const Launch<float>& L) {
  if (L.need_vol && (L.gvol_copy <= 0 || L.gvol_fixed > 0.0f)) return false;
  const Rays8 rays(L, blockIdx.y, blockIdx.x * blockDim.x + threadIdx.x);
  if (L.need_vol && L.need_M) {
    gradients_of_rays<second_order, true, true>(L, blockIdx.y, rays);
  } else if (L.need_vol) {
    gradients_of_rays<second_order, true, false>(L, blockIdx.y, rays);
  } else if (L.need_M) {
    gradients_of_rays<second_order, false, true>(L, blockIdx.y, rays);
  }
  return true;
}

}  // namespace lanes
}  // namespace prost

#endif  // PROST_LANES_H

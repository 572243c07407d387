// Grouped convs with few outputs per group, vectorised over input channels: see narrow_conv.h.
//
// Lane l of 16-channel block b holds input channel c = 16 b + l, which belongs to group
// g = c / (C/G) and feeds that group's outputs g * (O/G) + m. For each m the forward pass is then a
// depthwise conv of x with the kernel entries that lane's channel contributes to output m, summed
// over the group's lanes; the weight gradient is a depthwise product of x with dy of output m
// spread over the group's lanes (one masked load and one lane permutation per pixel); the input
// gradient a depthwise correlation of that spread dy with the kernel entries, with no lane sums.
//
// Work is split over OpenMP threads by output rows; each thread keeps its own weight-gradient
// accumulator, summed at the end. Borders are handled by splitting each row into the pixels whose
// taps all fall inside the image (no checks) and the few near the edges (checked).

#include "narrow_conv.h"

#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <numeric>
#include <vector>

namespace pyconv {
namespace {

constexpr int64_t kLanes = 16;
constexpr int64_t kMaxKernelWidth = 11;
constexpr int64_t kMaxOutputsPerGroup = 4;
// Output rows a weight-gradient pass walks before moving to the next channel block: their input
// rows (about a hundred kilobytes) stay in cache across the block's kernel rows.
constexpr int64_t kRowBlock = 4;
// All three kernels take output pixels kBlock at a time where they can, with the accumulators in
// registers: independent FMA chains hide the latency of a single pixel's chain of taps, and each
// input pixel is loaded once for all the accumulators it feeds.
constexpr int64_t kBlock = 8;

int64_t FloorDiv(int64_t a, int64_t b) { return a >= 0 ? a / b : -((-a + b - 1) / b); }

int64_t InPerGroup(const NarrowConv& g) { return g.c / g.groups; }
int64_t OutPerGroup(const NarrowConv& g) { return g.out_c / g.groups; }

// Which dy (or output) channels the 16 lanes of block `block` read for output `m` of a group:
// `base + index[l]`, all within `base + width`.
struct LaneMap {
  int64_t base = 0;
  int64_t width = 0;
  int32_t index[kLanes] = {};
};

LaneMap MakeLaneMap(const NarrowConv& g, int64_t block, int64_t m) {
  LaneMap map;
  const int64_t cin = InPerGroup(g), k = OutPerGroup(g);
  map.base = (block * kLanes / cin) * k + m;
  for (int64_t l = 0; l < kLanes; ++l) {
    map.index[l] = static_cast<int32_t>(((block * kLanes + l) / cin) * k + m - map.base);
  }
  map.width = map.index[kLanes - 1] + 1;
  return map;
}

// The output pixels [lo, hi) of a row whose taps all fall inside the image along width.
struct Interior {
  int64_t lo, hi;
};

Interior InteriorColumns(const NarrowConv& g) {
  const int64_t lo = std::min(g.out_w, FloorDiv(g.pad_l + g.stride_w - 1, g.stride_w));
  const int64_t last = FloorDiv(g.w - 1 + g.pad_l - (g.kw - 1) * g.dil_w, g.stride_w);
  return {lo, std::max(lo, std::min(g.out_w, last + 1))};
}

// spread[m][i][j][c]: the kernel entry through which channel c feeds output m of its group.
std::vector<float> SpreadKernel(const NarrowConv& g, const float* kernel) {
  const int64_t k = OutPerGroup(g), cin = InPerGroup(g);
  std::vector<float> spread(k * g.kh * g.kw * g.c);
  for (int64_t m = 0; m < k; ++m) {
    for (int64_t i = 0; i < g.kh; ++i) {
      for (int64_t j = 0; j < g.kw; ++j) {
        for (int64_t c = 0; c < g.c; ++c) {
          spread[((m * g.kh + i) * g.kw + j) * g.c + c] =
              kernel[((i * g.kw + j) * cin + c % cin) * g.out_c + (c / cin) * k + m];
        }
      }
    }
  }
  return spread;
}

std::vector<LaneMap> LaneMaps(const NarrowConv& g) {
  std::vector<LaneMap> maps;
  for (int64_t m = 0; m < OutPerGroup(g); ++m) {
    for (int64_t b = 0; b < g.c / kLanes; ++b) maps.push_back(MakeLaneMap(g, b, m));
  }
  return maps;
}

}  // namespace

bool NarrowSupported(const NarrowConv& g) {
  if (!__builtin_cpu_supports("avx512f")) return false;
  if (g.groups < 1 || g.c % kLanes != 0 || g.c % g.groups != 0 || g.out_c % g.groups != 0) {
    return false;
  }
  const int64_t cin = InPerGroup(g);
  if (kLanes % cin != 0 && cin % kLanes != 0) return false;
  // More outputs per group than that is oneDNN's (or the paired kernels') ground: one lane sum
  // per output per pixel costs more than the idle lanes there.
  if (OutPerGroup(g) > kMaxOutputsPerGroup) return false;
  if (g.kw < 1 || g.kw > kMaxKernelWidth || g.kh < 1) return false;
  if (g.stride_h < 1 || g.stride_w < 1 || g.dil_h < 1 || g.dil_w < 1) return false;
  if (g.pad_t < 0 || g.pad_l < 0) return false;
  for (int64_t m = 0; m < OutPerGroup(g); ++m) {
    if (MakeLaneMap(g, 0, m).width > kLanes) return false;
  }
  return true;
}

#pragma GCC push_options
#pragma GCC target("avx512f")

namespace {

// dy of output `m` at one pixel, spread over the lanes of the group each lane belongs to.
inline __m512 Spread(const float* dy_pixel, const LaneMap& map, __m512i index, __mmask16 mask) {
  return _mm512_permutexvar_ps(index, _mm512_maskz_loadu_ps(mask, dy_pixel + map.base));
}

// One output pixel's contribution to the KW accumulators of one kernel row; `kCheck` for the
// pixels near the left and right edges, whose taps may fall outside the image.
template <int KW, bool kCheck>
__attribute__((always_inline)) inline void WeightGradPixel(
    const NarrowConv& g, const float* x_row, const float* dy_row, int64_t ow, const LaneMap& map,
    __m512i index, __mmask16 mask, __m512 (&a)[KW]) {
  const __m512 d = Spread(dy_row + ow * g.out_c, map, index, mask);
  const int64_t iw0 = ow * g.stride_w - g.pad_l;
#pragma GCC unroll 16
  for (int j = 0; j < KW; ++j) {
    const int64_t iw = iw0 + j * g.dil_w;
    if (kCheck && (iw < 0 || iw >= g.w)) continue;
    a[j] = _mm512_fmadd_ps(_mm512_loadu_ps(x_row + iw * g.c), d, a[j]);
  }
}

// WeightGradPixel for kBlock pixels of an undilated row with stride S, all of whose taps fall
// inside the image: each input pixel is loaded once and multiplied into every accumulator it feeds.
template <int KW, int S>
__attribute__((always_inline)) inline void WeightGradBlock(
    const NarrowConv& g, const float* x_row, const float* dy_row, int64_t ow, const LaneMap& map,
    __m512i index, __mmask16 mask, __m512 (&a)[KW]) {
  __m512 d[kBlock];
#pragma GCC unroll 16
  for (int p = 0; p < kBlock; ++p) d[p] = Spread(dy_row + (ow + p) * g.out_c, map, index, mask);
  const float* x_block = x_row + (ow * S - g.pad_l) * g.c;
  constexpr int kInputs = (kBlock - 1) * S + KW;
#pragma GCC unroll 32
  for (int q = 0; q < kInputs; ++q) {
    const __m512 xv = _mm512_loadu_ps(x_block + q * g.c);
#pragma GCC unroll 16
    for (int p = 0; p < kBlock; ++p) {
      const int j = q - p * S;
      if (j >= 0 && j < KW) a[j] = _mm512_fmadd_ps(xv, d[p], a[j]);
    }
  }
}

template <int KW>
void WeightGradRows(const NarrowConv& g, const float* x, const float* dy, int64_t row_begin,
                    int64_t row_end, const std::vector<LaneMap>& maps, float* acc) {
  const int64_t blocks = g.c / kLanes, k = OutPerGroup(g);
  const Interior interior = InteriorColumns(g);
  const bool blocked = g.dil_w == 1 && (g.stride_w == 1 || g.stride_w == 2);
  for (int64_t r0 = row_begin; r0 < row_end; r0 += kRowBlock) {
    const int64_t r1 = std::min(row_end, r0 + kRowBlock);
    for (int64_t m = 0; m < k; ++m) {
      for (int64_t b = 0; b < blocks; ++b) {
        const LaneMap& map = maps[m * blocks + b];
        const __m512i index = _mm512_loadu_si512(map.index);
        const __mmask16 mask = static_cast<__mmask16>((1u << map.width) - 1);
        for (int64_t i = 0; i < g.kh; ++i) {
          float* a_ptr = acc + ((m * g.kh + i) * KW) * g.c + b * kLanes;
          __m512 a[KW];
#pragma GCC unroll 16
          for (int j = 0; j < KW; ++j) a[j] = _mm512_loadu_ps(a_ptr + j * g.c);
          for (int64_t r = r0; r < r1; ++r) {
            const int64_t n = r / g.out_h, oh = r % g.out_h;
            const int64_t ih = oh * g.stride_h - g.pad_t + i * g.dil_h;
            if (ih < 0 || ih >= g.h) continue;
            const float* x_row = x + ((n * g.h + ih) * g.w) * g.c + b * kLanes;
            const float* dy_row = dy + ((n * g.out_h + oh) * g.out_w) * g.out_c;
            for (int64_t ow = 0; ow < interior.lo; ++ow) {
              WeightGradPixel<KW, true>(g, x_row, dy_row, ow, map, index, mask, a);
            }
            int64_t ow = interior.lo;
            for (; blocked && ow + kBlock <= interior.hi; ow += kBlock) {
              if (g.stride_w == 1) {
                WeightGradBlock<KW, 1>(g, x_row, dy_row, ow, map, index, mask, a);
              } else {
                WeightGradBlock<KW, 2>(g, x_row, dy_row, ow, map, index, mask, a);
              }
            }
            for (; ow < interior.hi; ++ow) {
              WeightGradPixel<KW, false>(g, x_row, dy_row, ow, map, index, mask, a);
            }
            for (int64_t ow = interior.hi; ow < g.out_w; ++ow) {
              WeightGradPixel<KW, true>(g, x_row, dy_row, ow, map, index, mask, a);
            }
          }
#pragma GCC unroll 16
          for (int j = 0; j < KW; ++j) _mm512_storeu_ps(a_ptr + j * g.c, a[j]);
        }
      }
    }
  }
}

// Output pixels [ow, ow + P) of output row (n, oh) for output m of each group of channel block
// b: the depthwise conv of x with `w` (that block's spread kernel entries for m), accumulated in
// registers over every tap; `kCheck` for pixels whose taps may fall outside the image along width.
template <int KW, int P, bool kCheck>
__attribute__((always_inline)) inline void ForwardPixels(const NarrowConv& g, const float* x,
                                                         const float* w, int64_t oh, int64_t ow,
                                                         __m512 (&a)[P]) {
#pragma GCC unroll 16
  for (int p = 0; p < P; ++p) a[p] = _mm512_setzero_ps();
  for (int64_t i = 0; i < g.kh; ++i) {
    const int64_t ih = oh * g.stride_h - g.pad_t + i * g.dil_h;
    if (ih < 0 || ih >= g.h) continue;
    const float* x_row = x + ih * g.w * g.c;
    const float* w_row = w + i * KW * g.c;
#pragma GCC unroll 16
    for (int j = 0; j < KW; ++j) {
      const __m512 wv = _mm512_loadu_ps(w_row + j * g.c);
#pragma GCC unroll 16
      for (int p = 0; p < P; ++p) {
        const int64_t iw = (ow + p) * g.stride_w - g.pad_l + j * g.dil_w;
        if (kCheck && (iw < 0 || iw >= g.w)) continue;
        a[p] = _mm512_fmadd_ps(_mm512_loadu_ps(x_row + iw * g.c), wv, a[p]);
      }
    }
  }
}

// ForwardPixels for kBlock pixels of an undilated row with stride S, all of whose taps fall inside
// the image: each input pixel is loaded once per kernel row and multiplied into every accumulator
// it feeds, the row's kernel entries held in registers.
template <int KW, int S>
__attribute__((always_inline)) inline void ForwardBlock(const NarrowConv& g, const float* x,
                                                        const float* w, int64_t oh, int64_t ow,
                                                        __m512 (&a)[kBlock]) {
#pragma GCC unroll 16
  for (int p = 0; p < kBlock; ++p) a[p] = _mm512_setzero_ps();
  constexpr int kInputs = (kBlock - 1) * S + KW;
  for (int64_t i = 0; i < g.kh; ++i) {
    const int64_t ih = oh * g.stride_h - g.pad_t + i * g.dil_h;
    if (ih < 0 || ih >= g.h) continue;
    const float* x_row = x + (ih * g.w + ow * S - g.pad_l) * g.c;
    __m512 wv[KW];
#pragma GCC unroll 16
    for (int j = 0; j < KW; ++j) wv[j] = _mm512_loadu_ps(w + (i * KW + j) * g.c);
#pragma GCC unroll 32
    for (int q = 0; q < kInputs; ++q) {
      const __m512 xv = _mm512_loadu_ps(x_row + q * g.c);
#pragma GCC unroll 16
      for (int p = 0; p < kBlock; ++p) {
        const int j = q - p * S;
        if (j >= 0 && j < KW) a[p] = _mm512_fmadd_ps(xv, wv[j], a[p]);
      }
    }
  }
}

// Sums each group's lanes of the P pixel vectors `a` into their output (`m` of each group in
// block b) of the output row y_row, from pixel ow on.
template <int P>
__attribute__((always_inline)) inline void SumGroupLanes(const NarrowConv& g, const __m512 (&a)[P],
                                                         int64_t b, int64_t m, int64_t ow,
                                                         float* y_row) {
  const int64_t k = OutPerGroup(g), cin = InPerGroup(g);
  if (cin >= kLanes) {
    const int64_t out = (b * kLanes / cin) * k + m;
#pragma GCC unroll 16
    for (int p = 0; p < P; ++p) y_row[(ow + p) * g.out_c + out] += _mm512_reduce_add_ps(a[p]);
    return;
  }
  // A tree of lane swaps leaves each group's sum in its first lane.
  const int64_t groups_here = kLanes / cin, g0 = b * groups_here;
  alignas(64) float sums[kLanes];
#pragma GCC unroll 16
  for (int p = 0; p < P; ++p) {
    __m512 v = a[p];
    for (int64_t step = 1; step < cin; step *= 2) {
      v = _mm512_add_ps(v, _mm512_permutexvar_ps(
          _mm512_xor_si512(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                           _mm512_set1_epi32(static_cast<int>(step))), v));
    }
    _mm512_store_ps(sums, v);
    float* yp = y_row + (ow + p) * g.out_c + g0 * k + m;
    for (int64_t q = 0; q < groups_here; ++q) yp[q * k] = sums[q * cin];
  }
}

// One output row, kBlock pixels at a time between the checked pixels near the edges.
template <int KW>
void ForwardRow(const NarrowConv& g, const float* x, const float* spread_kernel, int64_t r,
                float* y) {
  const int64_t blocks = g.c / kLanes, k = OutPerGroup(g);
  const Interior interior = InteriorColumns(g);
  const int64_t n = r / g.out_h, oh = r % g.out_h;
  float* y_row = y + r * g.out_w * g.out_c;
  std::fill(y_row, y_row + g.out_w * g.out_c, 0.0f);
  for (int64_t m = 0; m < k; ++m) {
    for (int64_t b = 0; b < blocks; ++b) {
      const float* x_b = x + n * g.h * g.w * g.c + b * kLanes;
      const float* w = spread_kernel + m * g.kh * KW * g.c + b * kLanes;
      __m512 one[1], block[kBlock];
      for (int64_t ow = 0; ow < interior.lo; ++ow) {
        ForwardPixels<KW, 1, true>(g, x_b, w, oh, ow, one);
        SumGroupLanes<1>(g, one, b, m, ow, y_row);
      }
      int64_t ow = interior.lo;
      const bool blocked = g.dil_w == 1 && (g.stride_w == 1 || g.stride_w == 2);
      for (; blocked && ow + kBlock <= interior.hi; ow += kBlock) {
        if (g.stride_w == 1) {
          ForwardBlock<KW, 1>(g, x_b, w, oh, ow, block);
        } else {
          ForwardBlock<KW, 2>(g, x_b, w, oh, ow, block);
        }
        SumGroupLanes<kBlock>(g, block, b, m, ow, y_row);
      }
      for (; ow < interior.hi; ++ow) {
        ForwardPixels<KW, 1, false>(g, x_b, w, oh, ow, one);
        SumGroupLanes<1>(g, one, b, m, ow, y_row);
      }
      for (ow = interior.hi; ow < g.out_w; ++ow) {
        ForwardPixels<KW, 1, true>(g, x_b, w, oh, ow, one);
        SumGroupLanes<1>(g, one, b, m, ow, y_row);
      }
    }
  }
}

template <int KW>
void WeightGrad(const NarrowConv& g, const float* x, const float* dy, float* dkernel) {
  const int64_t k = OutPerGroup(g), cin = InPerGroup(g);
  const std::vector<LaneMap> maps = LaneMaps(g);
  const int64_t acc_size = k * g.kh * KW * g.c, rows = g.n * g.out_h;
  const int threads = std::max<int64_t>(1, std::min<int64_t>(omp_get_max_threads(), rows));
  std::vector<float> partial(static_cast<size_t>(threads) * acc_size, 0.0f);
#pragma omp parallel num_threads(threads)
  {
    const int64_t t = omp_get_thread_num(), count = omp_get_num_threads();
    WeightGradRows<KW>(g, x, dy, rows * t / count, rows * (t + 1) / count, maps,
                       partial.data() + t * acc_size);
  }
  // acc[m][i][j][c] -> dkernel[i][j][c % cin][(c / cin) * k + m], summed over threads.
  for (int64_t m = 0; m < k; ++m) {
    for (int64_t i = 0; i < g.kh; ++i) {
      for (int64_t j = 0; j < KW; ++j) {
        for (int64_t c = 0; c < g.c; ++c) {
          const int64_t at = ((m * g.kh + i) * KW + j) * g.c + c;
          float s = 0.0f;
          for (int t = 0; t < threads; ++t) s += partial[t * acc_size + at];
          dkernel[((i * KW + j) * cin + c % cin) * g.out_c + (c / cin) * k + m] = s;
        }
      }
    }
  }
}

// Input gradient. dx[n, ih, iw, c] sums dy[n, oh, ow, o] * kernel[i, j, c % cin, o] over the taps
// (i, j) with oh * stride - pad + i = ih (same along width) and the outputs o of c's group. In lane
// form: for each output m of a group, a depthwise correlation of dy spread over the lanes (as in
// the weight gradient) with the kernel entries of `spread`, accumulated straight into dx: no lane
// sums. Each spread dy row is computed once per thread into a ring of rows with zero margins, so
// the inner loop has no border checks.

// Output pixels p in [0, count) of one class of dx pixels (every `stride`-th): acc[p] += the sum
// over taps t of sd[p - t] * w[t], where sd is a spread dy row and acc a dx row (stride apart).
template <int NT, int P>
__attribute__((always_inline)) inline void CorrelatePixels(const float* sd, int64_t sd_step,
                                                           float* acc, int64_t acc_step,
                                                           const __m512 (&w)[NT]) {
  __m512 a[P];
#pragma GCC unroll 16
  for (int p = 0; p < P; ++p) a[p] = _mm512_loadu_ps(acc + p * acc_step);
#pragma GCC unroll 16
  for (int t = 0; t < NT; ++t) {
#pragma GCC unroll 16
    for (int p = 0; p < P; ++p) {
      a[p] = _mm512_fmadd_ps(_mm512_loadu_ps(sd + p * kLanes - t * sd_step), w[t], a[p]);
    }
  }
#pragma GCC unroll 16
  for (int p = 0; p < P; ++p) _mm512_storeu_ps(acc + p * acc_step, a[p]);
}

template <int NT>
void CorrelateClass(const float* sd, int64_t sd_step, int64_t count, float* acc,
                    int64_t acc_step, const float* w, int64_t w_step) {
  __m512 wv[NT];
#pragma GCC unroll 16
  for (int t = 0; t < NT; ++t) wv[t] = _mm512_loadu_ps(w + t * w_step);
  int64_t p = 0;
  for (; p + kBlock <= count; p += kBlock) {
    CorrelatePixels<NT, kBlock>(sd + p * kLanes, sd_step, acc + p * acc_step, acc_step, wv);
  }
  for (; p < count; ++p) {
    CorrelatePixels<NT, 1>(sd + p * kLanes, sd_step, acc + p * acc_step, acc_step, wv);
  }
}

// The spread dy rows one thread needs, kept for the dx rows that read them again.
class SpreadRows {
 public:
  SpreadRows(const NarrowConv& g, const std::vector<LaneMap>& maps, int64_t left, int64_t width)
      : g_(g), maps_(maps), left_(left), width_(width),
        slots_((g.kh - 1) * g.dil_h / g.stride_h + 2),
        row_size_(static_cast<int64_t>(maps.size()) * width * kLanes),
        data_(slots_ * row_size_, 0.0f), tags_(slots_, -1) {}

  // The spread row of dy row q (= n * out_h + oh) for output m and channel block b, margins
  // included: pixel ow at index (left + ow) * kLanes.
  const float* Get(const float* dy, int64_t q, int64_t m, int64_t b) {
    const int64_t slot = q % slots_;
    float* row = data_.data() + slot * row_size_;
    if (tags_[slot] != q) {
      const float* dy_row = dy + q * g_.out_w * g_.out_c;
      for (size_t e = 0; e < maps_.size(); ++e) {
        const LaneMap& map = maps_[e];
        const __m512i index = _mm512_loadu_si512(map.index);
        const __mmask16 mask = static_cast<__mmask16>((1u << map.width) - 1);
        float* sd = row + (e * width_ + left_) * kLanes;
        for (int64_t ow = 0; ow < g_.out_w; ++ow) {
          _mm512_storeu_ps(sd + ow * kLanes, Spread(dy_row + ow * g_.out_c, map, index, mask));
        }
      }
      tags_[slot] = q;
    }
    const int64_t blocks = g_.c / kLanes;
    return row + ((m * blocks + b) * width_ + left_) * kLanes;
  }

 private:
  const NarrowConv& g_;
  const std::vector<LaneMap>& maps_;
  int64_t left_, width_, slots_, row_size_;
  std::vector<float> data_;
  std::vector<int64_t> tags_;
};

#define PYCONV_BY_TAPS(fn, nt, ...)       \
  switch (nt) {                           \
    case 1: fn<1>(__VA_ARGS__); break;    \
    case 2: fn<2>(__VA_ARGS__); break;    \
    case 3: fn<3>(__VA_ARGS__); break;    \
    case 4: fn<4>(__VA_ARGS__); break;    \
    case 5: fn<5>(__VA_ARGS__); break;    \
    case 6: fn<6>(__VA_ARGS__); break;    \
    case 7: fn<7>(__VA_ARGS__); break;    \
    case 8: fn<8>(__VA_ARGS__); break;    \
    case 9: fn<9>(__VA_ARGS__); break;    \
    case 10: fn<10>(__VA_ARGS__); break;  \
    case 11: fn<11>(__VA_ARGS__); break;  \
  }

void InputGrad(const NarrowConv& g, const float* dy, const float* kernel, float* dx) {
  const std::vector<float> spread = SpreadKernel(g, kernel);
  const std::vector<LaneMap> maps = LaneMaps(g);
  const int64_t blocks = g.c / kLanes, k = OutPerGroup(g), s = g.stride_w, d = g.dil_w;
  // Along width, dx pixel iw takes the taps j with (iw + pad_l - j d) divisible by s, from dy
  // pixel ow = (iw + pad_l - j d) / s. For the pixels iw0, iw0 + s, ... those are the taps
  // j = jc, jc + s / e, ... (e = gcd(s, d)) at ow = o0 + p - t d / e, a correlation along ow.
  const int64_t e = std::gcd(s, d), tap_step = s / e, ow_step = d / e;
  // Spread rows cover every ow that a dx pixel's taps reach, [-left, width - left).
  const int64_t left = std::max<int64_t>(0, -FloorDiv(g.pad_l - (g.kw - 1) * d, s));
  const int64_t width = left + std::max(g.out_w, FloorDiv(g.w - 1 + g.pad_l, s) + 1);
  const int64_t rows = g.n * g.h;
#pragma omp parallel
  {
    const int64_t t = omp_get_thread_num(), count = omp_get_num_threads();
    SpreadRows spread_rows(g, maps, left, width);
    for (int64_t r = rows * t / count; r < rows * (t + 1) / count; ++r) {
      const int64_t n = r / g.h, ih = r % g.h;
      float* dx_row = dx + r * g.w * g.c;
      std::fill(dx_row, dx_row + g.w * g.c, 0.0f);
      for (int64_t i = 0; i < g.kh; ++i) {
        const int64_t num = ih + g.pad_t - i * g.dil_h;
        if (num < 0 || num % g.stride_h != 0 || num / g.stride_h >= g.out_h) continue;
        const int64_t q = n * g.out_h + num / g.stride_h;
        for (int64_t m = 0; m < k; ++m) {
          for (int64_t b = 0; b < blocks; ++b) {
            const float* sd = spread_rows.Get(dy, q, m, b);
            const float* w = spread.data() + (m * g.kh + i) * g.kw * g.c + b * kLanes;
            for (int64_t iw0 = 0; iw0 < std::min(s, g.w); ++iw0) {
              int64_t jc = 0;
              while (jc < std::min(tap_step, g.kw) && (iw0 + g.pad_l - jc * d) % s != 0) ++jc;
              if (jc >= std::min(tap_step, g.kw) || (iw0 + g.pad_l - jc * d) % s != 0) continue;
              const int64_t taps = (g.kw - jc + tap_step - 1) / tap_step;
              const int64_t o0 = FloorDiv(iw0 + g.pad_l - jc * d, s);
              PYCONV_BY_TAPS(CorrelateClass, taps, sd + o0 * kLanes, ow_step * kLanes,
                             (g.w - iw0 + s - 1) / s, dx_row + iw0 * g.c + b * kLanes, s * g.c,
                             w + jc * g.c, tap_step * g.c)
            }
          }
        }
      }
    }
  }
}

// y_row + bias, then max(., 0) with `relu`, over one output row.
void BiasRow(const NarrowConv& g, const float* bias, bool relu, float* y_row) {
  for (int64_t ow = 0; ow < g.out_w; ++ow) {
    float* p = y_row + ow * g.out_c;
    for (int64_t o = 0; o < g.out_c; ++o) {
      const float v = p[o] + bias[o];
      p[o] = relu && v < 0.0f ? 0.0f : v;
    }
  }
}

template <int KW>
void Forward(const NarrowConv& g, const float* x, const float* kernel, float* y,
             const float* bias, bool relu) {
  const std::vector<float> spread = SpreadKernel(g, kernel);
  const int64_t rows = g.n * g.out_h;
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    ForwardRow<KW>(g, x, spread.data(), r, y);
    if (bias != nullptr) BiasRow(g, bias, relu, y + r * g.out_w * g.out_c);
  }
}

#define PYCONV_BY_KERNEL_WIDTH(fn, kw, ...) \
  switch (kw) {                             \
    case 1: fn<1>(__VA_ARGS__); break;      \
    case 2: fn<2>(__VA_ARGS__); break;      \
    case 3: fn<3>(__VA_ARGS__); break;      \
    case 4: fn<4>(__VA_ARGS__); break;      \
    case 5: fn<5>(__VA_ARGS__); break;      \
    case 6: fn<6>(__VA_ARGS__); break;      \
    case 7: fn<7>(__VA_ARGS__); break;      \
    case 8: fn<8>(__VA_ARGS__); break;      \
    case 9: fn<9>(__VA_ARGS__); break;      \
    case 10: fn<10>(__VA_ARGS__); break;    \
    case 11: fn<11>(__VA_ARGS__); break;    \
  }

}  // namespace

void NarrowForward(const NarrowConv& g, const float* x, const float* kernel, float* y,
                   const float* bias, bool relu) {
  if (PairedForwardSupported(g)) return PairedForward(g, x, kernel, y, bias, relu);
  PYCONV_BY_KERNEL_WIDTH(Forward, g.kw, g, x, kernel, y, bias, relu)
}

void NarrowWeightGrad(const NarrowConv& g, const float* x, const float* dy, float* dkernel) {
  if (PairedWeightGradSupported(g)) return PairedWeightGrad(g, x, dy, dkernel);
  PYCONV_BY_KERNEL_WIDTH(WeightGrad, g.kw, g, x, dy, dkernel)
}

void NarrowInputGrad(const NarrowConv& g, const float* dy, const float* kernel, float* dx) {
  InputGrad(g, dy, kernel, dx);
}

#pragma GCC pop_options

}  // namespace pyconv

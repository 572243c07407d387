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
// Output rows a weight-gradient pass walks before moving to the next channel block: their input
// rows (about a hundred kilobytes) stay in cache across the block's kernel rows.
constexpr int64_t kRowBlock = 4;

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

// One kernel row's taps into output pixel `ow` of the depthwise conv `z`.
template <int KW, bool kCheck>
__attribute__((always_inline)) inline void ForwardPixel(const NarrowConv& g, const float* x_row,
                                                        int64_t ow, const __m512 (&wv)[KW],
                                                        float* z) {
  __m512 acc = _mm512_loadu_ps(z + ow * kLanes);
  const int64_t iw0 = ow * g.stride_w - g.pad_l;
#pragma GCC unroll 16
  for (int j = 0; j < KW; ++j) {
    const int64_t iw = iw0 + j * g.dil_w;
    if (kCheck && (iw < 0 || iw >= g.w)) continue;
    acc = _mm512_fmadd_ps(_mm512_loadu_ps(x_row + iw * g.c), wv[j], acc);
  }
  _mm512_storeu_ps(z + ow * kLanes, acc);
}

template <int KW>
void WeightGradRows(const NarrowConv& g, const float* x, const float* dy, int64_t row_begin,
                    int64_t row_end, const std::vector<LaneMap>& maps, float* acc) {
  const int64_t blocks = g.c / kLanes, k = OutPerGroup(g);
  const Interior interior = InteriorColumns(g);
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
            for (int64_t ow = interior.lo; ow < interior.hi; ++ow) {
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

// One output row: for each output m of a group and each channel block, the depthwise conv into
// `z` (one 16-lane vector per output pixel), then each group's lanes summed into y.
template <int KW>
void ForwardRow(const NarrowConv& g, const float* x, const float* spread_kernel, int64_t r,
                float* z, float* y) {
  const int64_t blocks = g.c / kLanes, k = OutPerGroup(g), cin = InPerGroup(g);
  const Interior interior = InteriorColumns(g);
  const int64_t n = r / g.out_h, oh = r % g.out_h;
  float* y_row = y + r * g.out_w * g.out_c;
  std::fill(y_row, y_row + g.out_w * g.out_c, 0.0f);
  for (int64_t m = 0; m < k; ++m) {
    for (int64_t b = 0; b < blocks; ++b) {
      std::fill(z, z + g.out_w * kLanes, 0.0f);
      for (int64_t i = 0; i < g.kh; ++i) {
        const int64_t ih = oh * g.stride_h - g.pad_t + i * g.dil_h;
        if (ih < 0 || ih >= g.h) continue;
        const float* x_row = x + ((n * g.h + ih) * g.w) * g.c + b * kLanes;
        __m512 wv[KW];
#pragma GCC unroll 16
        for (int j = 0; j < KW; ++j) {
          wv[j] = _mm512_loadu_ps(spread_kernel + ((m * g.kh + i) * KW + j) * g.c + b * kLanes);
        }
        for (int64_t ow = 0; ow < interior.lo; ++ow) {
          ForwardPixel<KW, true>(g, x_row, ow, wv, z);
        }
        for (int64_t ow = interior.lo; ow < interior.hi; ++ow) {
          ForwardPixel<KW, false>(g, x_row, ow, wv, z);
        }
        for (int64_t ow = interior.hi; ow < g.out_w; ++ow) {
          ForwardPixel<KW, true>(g, x_row, ow, wv, z);
        }
      }
      if (cin >= kLanes) {
        const int64_t out = (b * kLanes / cin) * k + m;
        for (int64_t ow = 0; ow < g.out_w; ++ow) {
          y_row[ow * g.out_c + out] += _mm512_reduce_add_ps(_mm512_loadu_ps(z + ow * kLanes));
        }
      } else {
        const int64_t groups_here = kLanes / cin, g0 = b * groups_here;
        for (int64_t ow = 0; ow < g.out_w; ++ow) {
          const float* zp = z + ow * kLanes;
          float* yp = y_row + ow * g.out_c + g0 * k + m;
          for (int64_t q = 0; q < groups_here; ++q) {
            float s = 0.0f;
            for (int64_t l = 0; l < cin; ++l) s += zp[q * cin + l];
            yp[q * k] = s;
          }
        }
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
// Pixels are taken kBlock at a time, their accumulators held in registers: kBlock independent FMA
// chains hide the FMA latency that a single pixel's chain of taps would expose.
constexpr int64_t kBlock = 8;

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
#pragma omp parallel
  {
    std::vector<float> z(g.out_w * kLanes);
#pragma omp for schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
      ForwardRow<KW>(g, x, spread.data(), r, z.data(), y);
      if (bias != nullptr) BiasRow(g, bias, relu, y + r * g.out_w * g.out_c);
    }
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
  PYCONV_BY_KERNEL_WIDTH(Forward, g.kw, g, x, kernel, y, bias, relu)
}

void NarrowWeightGrad(const NarrowConv& g, const float* x, const float* dy, float* dkernel) {
  PYCONV_BY_KERNEL_WIDTH(WeightGrad, g.kw, g, x, dy, dkernel)
}

void NarrowInputGrad(const NarrowConv& g, const float* dy, const float* kernel, float* dx) {
  InputGrad(g, dy, kernel, dx);
}

#pragma GCC pop_options

}  // namespace pyconv

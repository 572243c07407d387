// Forward pass and kernel gradient of grouped convs with eight outputs per group, two groups to a
// vector (and the forward pass with four, four groups to a vector).
//
// PyConvResNet's stage-2 levels (7x7 with 8 groups and 5x5 with 4 groups over 128 channels) have
// eight outputs per group. oneDNN's grouped kernels fill 16-lane vectors with one group's outputs,
// so half of each vector idles there (about 200 GFLOP/s on two cores, against 420 for a dense
// 3x3). Here lanes 0-7 hold group 2j's eight outputs and lanes 8-15 group 2j+1's: the kernel's
// output axis already has them side by side, so a weight vector is a plain load, and an input
// vector broadcasts one input channel of each group into its half (two broadcast loads, no
// shuffles). With four outputs per group (stage 1's 5x5/4) four groups share a vector, which
// beats the narrow kernels' forward pass (3.81 -> 3.01 ms at 56x56).
//
// Each thread copies the input rows it needs once into a ring of rows with zero margins, so no
// tap needs a border check. Kernels up to 7 wide take two output rows of kPairPixels pixels
// at a time (each broadcast input feeds both rows' accumulators, all in registers); wider ones one
// row of kPixels. Alone, batch 16, 28x28: 7x7/8 128->64 at 312 GFLOP/s, oneDNN's 202.

#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "narrow_conv.h"

namespace pyconv {
namespace {

constexpr int64_t kLanes = 16;
// Output pixels per register block: 14 divides the widths of a 224x224 network (112, 56, 28, 14)
// and leaves room for a kernel row of up to 11 weight vectors in the 32 registers.
constexpr int kPixels = 14;
constexpr int64_t kMaxKernelWidth = 11;

int64_t InPerGroup(const NarrowConv& g) { return g.c / g.groups; }

// The input rows a thread reads, each copied once with zero margins: pixel iw of input row q sits
// at (iw + pad_l) * c of slot q % slots.
class PaddedRows {
 public:
  PaddedRows(const NarrowConv& g, int64_t width)
      : g_(g), width_(width), slots_((g.kh - 1) * g.dil_h + 1),
        data_(slots_ * width * g.c, 0.0f), tags_(slots_, -1) {}

  const float* Get(const float* x, int64_t q) {
    const int64_t slot = q % slots_;
    float* row = data_.data() + slot * width_ * g_.c;
    if (tags_[slot] != q) {
      std::memcpy(row + g_.pad_l * g_.c, x + q * g_.w * g_.c, g_.w * g_.c * sizeof(float));
      tags_[slot] = q;
    }
    return row;
  }

 private:
  const NarrowConv& g_;
  int64_t width_, slots_;
  std::vector<float> data_;  // the margins stay zero: only the image pixels are ever written
  std::vector<int64_t> tags_;
};

#pragma GCC push_options
#pragma GCC target("avx512f")

// One input channel of each of V groups, broadcast over that group's 16 / V lanes: px[0] (the
// first group's) and px[u * cin] for the u-th.
template <int V>
__attribute__((always_inline)) inline __m512 GroupBroadcast(const float* px, int64_t cin) {
  __m512 v = _mm512_set1_ps(px[0]);
#pragma GCC unroll 8
  for (int u = 1; u < V; ++u) {
    const __mmask16 lanes = static_cast<__mmask16>(((1u << (kLanes / V)) - 1) << (u * kLanes / V));
    v = _mm512_mask_broadcastss_ps(v, lanes, _mm_load_ss(px + u * cin));
  }
  return v;
}

// P output pixels of one group pair in one or two output rows: a0[p] (row oh) += the taps of
// kernel row w0 over the padded input row x_row (pixel p's taps from input pixel p * S on), and
// with kSecond a1[p] (row oh + 1) += those of kernel row w1 over the same input row, so that
// each broadcast input feeds up to 2 KW accumulators. kFirst or kSecond alone where only one of
// the two kernel rows meets this input row.
constexpr int kPairPixels = 7;

template <int V, int KW, int S, int P, bool kFirst, bool kSecond>
__attribute__((always_inline)) inline void PairRows(const NarrowConv& g, const float* x_row,
                                                    const float* w0, const float* w1,
                                                    int64_t cin, __m512 (&a0)[P],
                                                    __m512 (&a1)[P]) {
  constexpr int kInputs = (P - 1) * S + KW;
  const int64_t tap_step = cin * g.out_c;
  for (int64_t i = 0; i < cin; ++i) {
    __m512 v0[KW], v1[KW];
#pragma GCC unroll 16
    for (int j = 0; j < KW; ++j) {
      if (kFirst) v0[j] = _mm512_loadu_ps(w0 + j * tap_step + i * g.out_c);
      if (kSecond) v1[j] = _mm512_loadu_ps(w1 + j * tap_step + i * g.out_c);
    }
    const float* xi = x_row + i;
#pragma GCC unroll 64
    for (int q = 0; q < kInputs; ++q) {
      const float* px = xi + q * g.c;
      const __m512 xv = GroupBroadcast<V>(px, cin);
#pragma GCC unroll 16
      for (int p = 0; p < P; ++p) {
        const int j = q - p * S;
        if (j >= 0 && j < KW) {
          if (kFirst) a0[p] = _mm512_fmadd_ps(xv, v0[j], a0[p]);
          if (kSecond) a1[p] = _mm512_fmadd_ps(xv, v1[j], a1[p]);
        }
      }
    }
  }
}

// Stores P accumulators (the bias is in their initial value), after a ReLU with `relu`, to output
// pixels [ow0, ow0 + P) of `out` (a row's group-pair slice), dropping those past the row's end.
template <int P>
__attribute__((always_inline)) inline void StorePixels(const NarrowConv& g, __m512 (&a)[P],
                                                       bool relu, int64_t ow0, float* out) {
  if (relu) {
#pragma GCC unroll 16
    for (int p = 0; p < P; ++p) a[p] = _mm512_max_ps(a[p], _mm512_setzero_ps());
  }
  const int64_t valid = std::min<int64_t>(P, g.out_w - ow0);
#pragma GCC unroll 16
  for (int p = 0; p < P; ++p) {
    if (p < valid) _mm512_storeu_ps(out + p * g.out_c, a[p]);
  }
}

template <int V, int KW, int S>
void PairedForwardImpl(const NarrowConv& g, const float* x, const float* kernel, float* y,
                       const float* bias, bool relu) {
  const int64_t cin = InPerGroup(g), pairs = g.groups / V;
  const int64_t blocks = (g.out_w + kPixels - 1) / kPixels;
  const int64_t width = std::max(g.pad_l + g.w, (blocks * kPixels - 1) * S + KW);
  const int64_t rows = g.n * g.out_h;
#pragma omp parallel
  {
    const int64_t t = omp_get_thread_num(), count = omp_get_num_threads();
    PaddedRows padded(g, width);
    for (int64_t r = rows * t / count; r < rows * (t + 1) / count; ++r) {
      const int64_t n = r / g.out_h, oh = r % g.out_h;
      float* y_row = y + r * g.out_w * g.out_c;
      for (int64_t b = 0; b < blocks; ++b) {
        const int64_t ow0 = b * kPixels;
        for (int64_t j = 0; j < pairs; ++j) {
          __m512 a[kPixels];
          const __m512 init = bias ? _mm512_loadu_ps(bias + j * kLanes) : _mm512_setzero_ps();
#pragma GCC unroll 16
          for (int p = 0; p < kPixels; ++p) a[p] = init;
          for (int64_t i = 0; i < g.kh; ++i) {
            const int64_t ih = oh * g.stride_h - g.pad_t + i * g.dil_h;
            if (ih < 0 || ih >= g.h) continue;
            const float* x_row = padded.Get(x, n * g.h + ih) + (ow0 * S) * g.c + V * j * cin;
            const float* w = kernel + i * KW * cin * g.out_c + j * kLanes;
            PairRows<V, KW, S, kPixels, true, false>(g, x_row, w, w, cin, a, a);
          }
          StorePixels<kPixels>(g, a, relu, ow0, y_row + ow0 * g.out_c + j * kLanes);
        }
      }
    }
  }
}

template <int V, int KW, int S>
void PairedForwardTwoRows(const NarrowConv& g, const float* x, const float* kernel, float* y,
                          const float* bias, bool relu) {
  const int64_t cin = InPerGroup(g), pairs = g.groups / V;
  const int64_t blocks = (g.out_w + kPairPixels - 1) / kPairPixels;
  const int64_t width = std::max(g.pad_l + g.w, (blocks * kPairPixels - 1) * S + KW);
  const int64_t row_pairs = (g.out_h + 1) / 2, units = g.n * row_pairs;
  const int64_t kernel_row = KW * cin * g.out_c;
#pragma omp parallel
  {
    const int64_t t = omp_get_thread_num(), count = omp_get_num_threads();
    NarrowConv wide = g;
    wide.kh = g.kh + g.stride_h;  // the input rows of two output rows
    PaddedRows padded(wide, width);
    for (int64_t u = units * t / count; u < units * (t + 1) / count; ++u) {
      const int64_t n = u / row_pairs, oh = (u % row_pairs) * 2;
      const bool second = oh + 1 < g.out_h;
      float* y0 = y + (n * g.out_h + oh) * g.out_w * g.out_c;
      float* y1 = y0 + g.out_w * g.out_c;
      const int64_t ih0 = oh * g.stride_h - g.pad_t;
      for (int64_t b = 0; b < blocks; ++b) {
        const int64_t ow0 = b * kPairPixels;
        for (int64_t j = 0; j < pairs; ++j) {
          __m512 a0[kPairPixels], a1[kPairPixels];
          const __m512 init = bias ? _mm512_loadu_ps(bias + j * kLanes) : _mm512_setzero_ps();
#pragma GCC unroll 16
          for (int p = 0; p < kPairPixels; ++p) a0[p] = a1[p] = init;
          const float* w = kernel + j * kLanes;
          for (int64_t d = 0; d < g.kh + g.stride_h; ++d) {
            const int64_t ih = ih0 + d, i0 = d, i1 = d - g.stride_h;
            if (ih < 0 || ih >= g.h) continue;
            const bool first_row = i0 < g.kh, second_row = second && i1 >= 0 && i1 < g.kh;
            const float* x_row = padded.Get(x, n * g.h + ih) + (ow0 * S) * g.c + V * j * cin;
            const float* w0 = w + i0 * kernel_row;
            const float* w1 = w + i1 * kernel_row;
            if (first_row && second_row) {
              PairRows<V, KW, S, kPairPixels, true, true>(g, x_row, w0, w1, cin, a0, a1);
            } else if (first_row) {
              PairRows<V, KW, S, kPairPixels, true, false>(g, x_row, w0, w1, cin, a0, a1);
            } else if (second_row) {
              PairRows<V, KW, S, kPairPixels, false, true>(g, x_row, w0, w1, cin, a0, a1);
            }
          }
          StorePixels<kPairPixels>(g, a0, relu, ow0, y0 + ow0 * g.out_c + j * kLanes);
          if (second) StorePixels<kPairPixels>(g, a1, relu, ow0, y1 + ow0 * g.out_c + j * kLanes);
        }
      }
    }
  }
}

template <int V, int KW>
void PairedForwardByStride(const NarrowConv& g, const float* x, const float* kernel, float* y,
                           const float* bias, bool relu) {
  if constexpr (KW <= 7) {
    if (g.dil_h == 1) {
      if (g.stride_w == 1) {
        PairedForwardTwoRows<V, KW, 1>(g, x, kernel, y, bias, relu);
      } else {
        PairedForwardTwoRows<V, KW, 2>(g, x, kernel, y, bias, relu);
      }
      return;
    }
  }
  if (g.stride_w == 1) {
    PairedForwardImpl<V, KW, 1>(g, x, kernel, y, bias, relu);
  } else {
    PairedForwardImpl<V, KW, 2>(g, x, kernel, y, bias, relu);
  }
}

// The weight gradient, two groups to a vector the same way: acc[j][t] (kernel tap j of inputs
// i0 + t, the pair's 16 outputs) += x broadcast as in the forward pass * dy of the pixel the tap
// feeds. For one kernel row and kIn inputs, the KW * kIn accumulators stay in registers over a
// whole output row, taken kPixels dy vectors at a time; each input pixel is broadcast once for
// every tap it feeds.
template <int V, int KW, int S, int kIn>
__attribute__((always_inline)) inline void PairGradRow(const NarrowConv& g, const float* x_row,
                                                       const float* dy_row, int64_t blocks,
                                                       int64_t cin, float* acc) {
  constexpr int kInputs = (kPixels - 1) * S + KW;
  const int64_t tap_step = cin * g.out_c;
  __m512 a[KW][kIn];
#pragma GCC unroll 16
  for (int j = 0; j < KW; ++j) {
#pragma GCC unroll 4
    for (int t = 0; t < kIn; ++t) a[j][t] = _mm512_loadu_ps(acc + j * tap_step + t * g.out_c);
  }
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t ow0 = b * kPixels, valid = std::min<int64_t>(kPixels, g.out_w - ow0);
    __m512 d[kPixels];
#pragma GCC unroll 16
    for (int p = 0; p < kPixels; ++p) {
      d[p] = _mm512_maskz_loadu_ps(p < valid ? 0xFFFF : 0, dy_row + (ow0 + p) * g.out_c);
    }
    const float* xb = x_row + ow0 * S * g.c;
#pragma GCC unroll 64
    for (int q = 0; q < kInputs; ++q) {
      __m512 xv[kIn];
#pragma GCC unroll 4
      for (int t = 0; t < kIn; ++t) {
        const float* px = xb + q * g.c + t;
        xv[t] = GroupBroadcast<V>(px, cin);
      }
#pragma GCC unroll 16
      for (int p = 0; p < kPixels; ++p) {
        const int j = q - p * S;
        if (j >= 0 && j < KW) {
#pragma GCC unroll 4
          for (int t = 0; t < kIn; ++t) a[j][t] = _mm512_fmadd_ps(xv[t], d[p], a[j][t]);
        }
      }
    }
  }
#pragma GCC unroll 16
  for (int j = 0; j < KW; ++j) {
#pragma GCC unroll 4
    for (int t = 0; t < kIn; ++t) _mm512_storeu_ps(acc + j * tap_step + t * g.out_c, a[j][t]);
  }
}

template <int V, int KW, int S>
void PairedWeightGradImpl(const NarrowConv& g, const float* x, const float* dy, float* dkernel) {
  const int64_t cin = InPerGroup(g), pairs = g.groups / V;
  const int64_t blocks = (g.out_w + kPixels - 1) / kPixels;
  const int64_t width = std::max(g.pad_l + g.w, (blocks * kPixels - 1) * S + KW);
  const int64_t rows = g.n * g.out_h, size = g.kh * KW * cin * g.out_c;
  const int64_t kernel_row = KW * cin * g.out_c;
  const int threads = std::max<int64_t>(1, std::min<int64_t>(omp_get_max_threads(), rows));
  std::vector<float> partial(static_cast<size_t>(threads) * size, 0.0f);
#pragma omp parallel num_threads(threads)
  {
    const int64_t t = omp_get_thread_num(), count = omp_get_num_threads();
    PaddedRows padded(g, width);
    float* acc = partial.data() + t * size;
    for (int64_t r = rows * t / count; r < rows * (t + 1) / count; ++r) {
      const int64_t n = r / g.out_h, oh = r % g.out_h;
      const float* dy_row = dy + r * g.out_w * g.out_c;
      for (int64_t i = 0; i < g.kh; ++i) {
        const int64_t ih = oh * g.stride_h - g.pad_t + i * g.dil_h;
        if (ih < 0 || ih >= g.h) continue;
        const float* x_row = padded.Get(x, n * g.h + ih);
        for (int64_t j = 0; j < pairs; ++j) {
          float* acc_row = acc + i * kernel_row + j * kLanes;
          const float* x_pair = x_row + V * j * cin;
          const float* dy_pair = dy_row + j * kLanes;
          // Two inputs at a time while the 2 KW accumulators, kPixels dy vectors and two inputs
          // fit in the 32 registers.
          constexpr int kIn = KW <= 7 ? 2 : 1;
          int64_t c = 0;
          for (; c + kIn <= cin; c += kIn) {
            PairGradRow<V, KW, S, kIn>(g, x_pair + c, dy_pair, blocks, cin, acc_row + c * g.out_c);
          }
          if (c < cin) {
            PairGradRow<V, KW, S, 1>(g, x_pair + c, dy_pair, blocks, cin, acc_row + c * g.out_c);
          }
        }
      }
    }
  }
  for (int64_t e = 0; e < size; ++e) {
    float sum = 0.0f;
    for (int t = 0; t < threads; ++t) sum += partial[t * size + e];
    dkernel[e] = sum;
  }
}

template <int V, int KW>
void PairedWeightGradByStride(const NarrowConv& g, const float* x, const float* dy,
                              float* dkernel) {
  if (g.stride_w == 1) {
    PairedWeightGradImpl<V, KW, 1>(g, x, dy, dkernel);
  } else {
    PairedWeightGradImpl<V, KW, 2>(g, x, dy, dkernel);
  }
}

#pragma GCC pop_options

// Eight or four outputs per group (two or four groups to a vector): the shapes both kernels
// handle. With two outputs per group (eight groups to a vector) the broadcasts cost more than
// the narrow kernels' lane sums: 7x7/8 64->16 at 56x56 forward 3.59 -> 3.96 ms. Kernels narrower
// than 5 leave too few taps per broadcast input: PyConvHGResNet's 3x3/32 512->256 at 28x28 with
// stride 2, forward 1.94 (oneDNN) -> 2.50 ms, kernel gradient 2.29 -> 2.59.
constexpr int64_t kMinKernelWidth = 5;

bool PairedShape(const NarrowConv& g, int64_t outputs_per_group) {
  return __builtin_cpu_supports("avx512f") && g.groups >= 1 && g.c % g.groups == 0 &&
         g.out_c == g.groups * outputs_per_group &&
         g.groups % (kLanes / outputs_per_group) == 0 && g.kh >= 1 &&
         g.kw >= kMinKernelWidth && g.kw <= kMaxKernelWidth && g.kw % 2 == 1 && g.dil_w == 1 &&
         g.dil_h >= 1 &&
         (g.stride_w == 1 || g.stride_w == 2) && g.stride_h >= 1 && g.pad_t >= 0 && g.pad_l >= 0;
}

}  // namespace

bool PairedForwardSupported(const NarrowConv& g) {
  return PairedShape(g, 8) || PairedShape(g, 4);
}

// With four outputs per group the narrow kernels' weight gradient is as fast (5x5/4 64->16 at
// 56x56: 3.52 against 3.63 ms), so it keeps those.
bool PairedWeightGradSupported(const NarrowConv& g) { return PairedShape(g, 8); }

#define PYCONV_PAIRED_BY_WIDTH(fn, V, ...)            \
  switch (g.kw) {                                     \
    case 5: fn<V, 5>(__VA_ARGS__); break;             \
    case 7: fn<V, 7>(__VA_ARGS__); break;             \
    case 9: fn<V, 9>(__VA_ARGS__); break;             \
    case 11: fn<V, 11>(__VA_ARGS__); break;           \
  }

#define PYCONV_PAIRED_DISPATCH(fn, ...)                                  \
  switch (g.out_c / g.groups) {                                          \
    case 8: PYCONV_PAIRED_BY_WIDTH(fn, 2, __VA_ARGS__) break;            \
    case 4: PYCONV_PAIRED_BY_WIDTH(fn, 4, __VA_ARGS__) break;            \
  }

void PairedForward(const NarrowConv& g, const float* x, const float* kernel, float* y,
                   const float* bias, bool relu) {
  PYCONV_PAIRED_DISPATCH(PairedForwardByStride, g, x, kernel, y, bias, relu)
}

void PairedWeightGrad(const NarrowConv& g, const float* x, const float* dy, float* dkernel) {
  PYCONV_PAIRED_BY_WIDTH(PairedWeightGradByStride, 2, g, x, dy, dkernel)
}

}  // namespace pyconv

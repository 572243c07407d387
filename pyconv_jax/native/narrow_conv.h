// Grouped convs with few outputs per group, vectorised over input channels (AVX-512).
//
// PyConvResNet's widest pyramid levels have one to four outputs per group (9x9 with 16 groups
// over 64 channels: four inputs, one output each). oneDNN's grouped kernels vectorise over a
// group's outputs, so they leave most of each 16-lane vector idle there (its 9x9/16 weight
// gradient runs at a tenth of the machine's speed). These kernels put the 16 lanes on 16 input
// channels instead: each lane multiplies its channel by the gradient (or weight) of the output its
// group feeds, which makes the conv depthwise-shaped, and the group's inputs are summed at the
// end. Same MACs, full vectors.

#ifndef PYCONV_JAX_NATIVE_NARROW_CONV_H_
#define PYCONV_JAX_NATIVE_NARROW_CONV_H_

#include <cstdint>

namespace pyconv {

// One conv in JAX's layouts: images NHWC, kernel HWIO [kh, kw, C/groups, O] with outputs ordered
// group-major. Padding is explicit (top, left); the bottom and right follow from the output size.
struct NarrowConv {
  int64_t n, h, w, c;          // input
  int64_t out_h, out_w, out_c;  // output
  int64_t kh, kw;
  int64_t stride_h, stride_w, pad_t, pad_l, dil_h, dil_w, groups;
};

// Whether these kernels compute `conv` on this CPU (AVX-512, channels a multiple of 16, groups
// that tile a 16-lane vector, at most four outputs per group, kernel width at most 11); callers
// fall back to oneDNN otherwise.
bool NarrowSupported(const NarrowConv& conv);

// y[n, oh, ow, O] from x and the kernel; then, when `bias` is given, y + bias[O], and with `relu`
// max(y + bias, 0), each output row while it is in cache. Runs for any conv that NarrowSupported
// or PairedForwardSupported accepts (the paired kernel where it applies).
void NarrowForward(const NarrowConv& conv, const float* x, const float* kernel, float* y,
                   const float* bias = nullptr, bool relu = false);

// The kernel's gradient [kh, kw, C/groups, O] from x and dy.
void NarrowWeightGrad(const NarrowConv& conv, const float* x, const float* dy, float* dkernel);

// The input's gradient [n, h, w, c] from dy and the kernel.
void NarrowInputGrad(const NarrowConv& conv, const float* dy, const float* kernel, float* dx);

// Whether the paired kernels (paired_conv.cc) compute `conv`'s forward pass (eight or four
// outputs per group) or kernel gradient (eight): a group count that fills whole vectors, an odd
// kernel width from 5 to 11, undilated along width, stride 1 or 2 along width (AVX-512).
// NarrowForward and NarrowWeightGrad run them where they apply.
bool PairedForwardSupported(const NarrowConv& conv);
bool PairedWeightGradSupported(const NarrowConv& conv);

// NarrowForward's contract, by the paired kernel.
void PairedForward(const NarrowConv& conv, const float* x, const float* kernel, float* y,
                   const float* bias = nullptr, bool relu = false);

// NarrowWeightGrad's contract, by the paired kernel.
void PairedWeightGrad(const NarrowConv& conv, const float* x, const float* dy, float* dkernel);

}  // namespace pyconv

#endif  // PYCONV_JAX_NATIVE_NARROW_CONV_H_

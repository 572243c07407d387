// oneDNN convolutions for XLA:CPU, as XLA FFI handlers: forward, input gradient, weight gradient.
//
// XLA:CPU's own convolution kernels run PyConvResNet's narrow and grouped convs at a fraction of
// the hardware's speed (docs/benchmarks.md). oneDNN, the library PyTorch uses on CPU, computes
// them with real groups (no block-diagonal waste) and spreads every conv over all cores.
//
// Layouts are JAX's: images NHWC, kernels HWIO with the grouped kernel's output features ordered
// group-major ([kh, kw, C/G, G * O/G]). Activations are handed to oneDNN as they are; the small
// kernel is reordered to oneDNN's preferred layout when that differs. Every handler takes the same
// attributes: strides, explicit padding (top, left, bottom, right), dilation (1 = none) and the
// group count. Float32 only.
//
// Primitive descriptors are built once per shape and kept (building one costs far more than a
// small conv). Scratch memory is allocated per call, so one primitive may run on several XLA
// threads at once.

#include <array>
#include <cstdint>
#include <cstring>
#include <cstdlib>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include "dnnl.hpp"
#include "narrow_conv.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using dnnl::memory;
using Tag = memory::format_tag;
constexpr auto kF32 = memory::data_type::f32;

dnnl::engine& Engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

struct Attrs {
  int64_t stride_h, stride_w, pad_t, pad_l, pad_b, pad_r, dil_h, dil_w, groups;
};

enum class Kind : int64_t { kForward = 0, kInputGrad = 1, kWeightGrad = 2 };

// What an inference forward pass adds to the conv before writing it: y = conv + bias (one per
// output channel), + residual (y's shape), then max(y, 0). Folded BatchNorm + shortcut + ReLU.
struct Epilogue {
  bool bias = false, residual = false, relu = false;
  bool any() const { return bias || residual || relu; }
};

// The conv's geometry in oneDNN's terms: logical dims (N, C, H, W), (G, O/G, C/G, KH, KW).
struct Geometry {
  memory::dims src, weights, dst, strides, dilates, pad_l, pad_r;
  Tag weights_tag;

  Geometry(ffi::Span<const int64_t> x, ffi::Span<const int64_t> w, ffi::Span<const int64_t> y,
           const Attrs& a)
      : src{x[0], x[3], x[1], x[2]},
        dst{y[0], y[3], y[1], y[2]},
        strides{a.stride_h, a.stride_w},
        dilates{a.dil_h - 1, a.dil_w - 1},
        pad_l{a.pad_t, a.pad_l},
        pad_r{a.pad_b, a.pad_r} {
    if (a.groups == 1) {
      weights = {w[3], w[2], w[0], w[1]};
      weights_tag = Tag::hwio;
    } else {
      weights = {a.groups, w[3] / a.groups, w[2], w[0], w[1]};
      weights_tag = Tag::hwigo;
    }
  }

  memory::desc Src() const { return memory::desc(src, kF32, Tag::nhwc); }
  memory::desc Dst() const { return memory::desc(dst, kF32, Tag::nhwc); }
  memory::desc UserWeights() const { return memory::desc(weights, kF32, weights_tag); }
  memory::desc AnyWeights() const { return memory::desc(weights, kF32, Tag::any); }
};

dnnl::primitive_attr UserScratchpad() {
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  return attr;
}

dnnl::convolution_forward::primitive_desc ForwardDesc(const Geometry& g) {
  return dnnl::convolution_forward::primitive_desc(
      Engine(), dnnl::prop_kind::forward_training, dnnl::algorithm::convolution_direct, g.Src(),
      g.AnyWeights(), g.Dst(), g.strides, g.dilates, g.pad_l, g.pad_r, UserScratchpad());
}

// The forward pass with `e` applied inside oneDNN's kernel (bias, binary-add and ReLU post-ops).
dnnl::convolution_forward::primitive_desc FusedForwardDesc(const Geometry& g, const Epilogue& e) {
  dnnl::primitive_attr attr = UserScratchpad();
  dnnl::post_ops ops;
  if (e.residual) ops.append_binary(dnnl::algorithm::binary_add, g.Dst());
  if (e.relu) ops.append_eltwise(dnnl::algorithm::eltwise_relu, 0.0f, 0.0f);
  attr.set_post_ops(ops);
  const memory::desc bias({g.dst[1]}, kF32, Tag::x);
  return e.bias ? dnnl::convolution_forward::primitive_desc(
                      Engine(), dnnl::prop_kind::forward_inference,
                      dnnl::algorithm::convolution_direct, g.Src(), g.AnyWeights(), bias, g.Dst(),
                      g.strides, g.dilates, g.pad_l, g.pad_r, attr)
                : dnnl::convolution_forward::primitive_desc(
                      Engine(), dnnl::prop_kind::forward_inference,
                      dnnl::algorithm::convolution_direct, g.Src(), g.AnyWeights(), g.Dst(),
                      g.strides, g.dilates, g.pad_l, g.pad_r, attr);
}

// One conv, ready to run: the primitive, the layout oneDNN wants the kernel in, and the reorder
// between that layout and JAX's (absent when they agree).
struct Plan {
  dnnl::primitive conv;
  memory::desc weights;
  size_t scratchpad_bytes = 0;
  bool reorder_weights = false;
  dnnl::reorder weights_reorder;
};

std::shared_ptr<Plan> MakePlan(Kind kind, const Geometry& g, const Epilogue& e) {
  auto plan = std::make_shared<Plan>();
  const memory::desc user = g.UserWeights();
  auto finish = [&](const auto& pd, const memory::desc& weights) {
    plan->conv = dnnl::primitive(pd);
    plan->weights = weights;
    plan->scratchpad_bytes = pd.scratchpad_desc().get_size();
    plan->reorder_weights = weights != user;
    if (plan->reorder_weights) {
      const bool to_user = kind == Kind::kWeightGrad;
      plan->weights_reorder = dnnl::reorder(dnnl::reorder::primitive_desc(
          Engine(), to_user ? weights : user, Engine(), to_user ? user : weights));
    }
  };
  if (e.any()) {  // an inference forward pass
    const auto pd = FusedForwardDesc(g, e);
    finish(pd, pd.weights_desc());
    return plan;
  }
  const auto hint = ForwardDesc(g);
  switch (kind) {
    case Kind::kForward:
      finish(hint, hint.weights_desc());
      break;
    case Kind::kInputGrad: {
      dnnl::convolution_backward_data::primitive_desc pd(
          Engine(), dnnl::algorithm::convolution_direct, g.Src(), g.AnyWeights(), g.Dst(),
          g.strides, g.dilates, g.pad_l, g.pad_r, hint, UserScratchpad());
      finish(pd, pd.weights_desc());
      break;
    }
    case Kind::kWeightGrad: {
      dnnl::convolution_backward_weights::primitive_desc pd(
          Engine(), dnnl::algorithm::convolution_direct, g.Src(), g.AnyWeights(), g.Dst(),
          g.strides, g.dilates, g.pad_l, g.pad_r, hint, UserScratchpad());
      finish(pd, pd.diff_weights_desc());
      break;
    }
  }
  return plan;
}

// Plans by conv kind, shapes and attributes. Built under a lock; run without one.
std::shared_ptr<Plan> GetPlan(Kind kind, ffi::Span<const int64_t> x, ffi::Span<const int64_t> w,
                              ffi::Span<const int64_t> y, const Attrs& a, const Epilogue& e) {
  static std::mutex mutex;
  static std::map<std::vector<int64_t>, std::shared_ptr<Plan>> plans;
  std::vector<int64_t> key{static_cast<int64_t>(kind), a.stride_h, a.stride_w, a.pad_t, a.pad_l,
                           a.pad_b, a.pad_r, a.dil_h, a.dil_w, a.groups, e.bias, e.residual,
                           e.relu};
  for (auto dims : {x, w, y}) key.insert(key.end(), dims.begin(), dims.end());
  std::lock_guard<std::mutex> lock(mutex);
  auto& plan = plans[key];
  if (!plan) plan = MakePlan(kind, Geometry(x, w, y, a), e);
  return plan;
}

// Memory that oneDNN's buffers may live in: 64-byte aligned, freed at the end of the call.
struct Scratch {
  explicit Scratch(size_t bytes)
      : data(bytes ? std::aligned_alloc(64, (bytes + 63) / 64 * 64) : nullptr) {}
  ~Scratch() { std::free(data); }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
  void* data;
};

// One conv's three arrays, named by their role in the conv whatever the handler's kind.
struct Operands {
  ffi::Span<const int64_t> x, w, y;
  void *x_data, *w_data, *y_data;
};

// Sorts the handler's operands (`a`, `b`, then `out`) into the conv's roles and checks them.
ffi::Error Resolve(Kind kind, ffi::AnyBuffer a, ffi::AnyBuffer b, ffi::Result<ffi::AnyBuffer> out,
                   const Attrs& attrs, Operands& o) {
  switch (kind) {
    case Kind::kForward:  // (x, w) -> y
      o = {a.dimensions(), b.dimensions(), out->dimensions(),
           a.untyped_data(), b.untyped_data(), out->untyped_data()};
      break;
    case Kind::kInputGrad:  // (dy, w) -> dx
      o = {out->dimensions(), b.dimensions(), a.dimensions(),
           out->untyped_data(), b.untyped_data(), a.untyped_data()};
      break;
    case Kind::kWeightGrad:  // (x, dy) -> dw
      o = {a.dimensions(), out->dimensions(), b.dimensions(),
           a.untyped_data(), out->untyped_data(), b.untyped_data()};
      break;
  }
  for (auto* buffer : {&a, &b}) {
    if (buffer->element_type() != ffi::DataType::F32) {
      return ffi::Error::InvalidArgument("pyconv oneDNN conv: only float32 is supported");
    }
  }
  if (o.x.size() != 4 || o.w.size() != 4 || o.y.size() != 4 || attrs.groups < 1 ||
      o.x[3] != o.w[2] * attrs.groups || o.w[3] % attrs.groups != 0) {
    return ffi::Error::InvalidArgument(
        "pyconv oneDNN conv: expected NHWC images and an HWIO kernel [kh, kw, C/groups, O]");
  }
  return ffi::Error::Success();
}

// Runs one conv with oneDNN's primitives; a forward pass applies `e` with `bias` and `residual`.
ffi::Error Run(Kind kind, ffi::AnyBuffer a, ffi::AnyBuffer b, ffi::Result<ffi::AnyBuffer> out,
               const Attrs& attrs, const Epilogue& e = {}, void* bias = nullptr,
               void* residual = nullptr) {
  Operands operands;
  if (ffi::Error error = Resolve(kind, a, b, out, attrs, operands); error.failure()) return error;
  const auto [x, w, y, x_data, w_data, y_data] = operands;
  try {
    const auto plan = GetPlan(kind, x, w, y, attrs, e);
    const Geometry g(x, w, y, attrs);
    dnnl::engine& engine = Engine();
    dnnl::stream stream(engine);
    memory src(g.Src(), engine, x_data), dst(g.Dst(), engine, y_data);
    memory user_weights(g.UserWeights(), engine, w_data);
    Scratch weights_buffer(plan->reorder_weights ? plan->weights.get_size() : 0);
    memory weights = plan->reorder_weights ? memory(plan->weights, engine, weights_buffer.data)
                                           : user_weights;
    Scratch scratchpad_buffer(plan->scratchpad_bytes);
    memory scratchpad(memory::desc({static_cast<int64_t>(plan->scratchpad_bytes)},
                                   memory::data_type::u8, Tag::x),
                      engine, scratchpad_buffer.data);
    std::unordered_map<int, memory> args{{DNNL_ARG_SCRATCHPAD, scratchpad}};
    switch (kind) {
      case Kind::kForward:
        args.insert({{DNNL_ARG_SRC, src}, {DNNL_ARG_WEIGHTS, weights}, {DNNL_ARG_DST, dst}});
        if (e.bias) {
          args.insert({DNNL_ARG_BIAS, memory(memory::desc({g.dst[1]}, kF32, Tag::x), engine,
                                             bias)});
        }
        if (e.residual) {
          args.insert({DNNL_ARG_ATTR_MULTIPLE_POST_OP(0) | DNNL_ARG_SRC_1,
                       memory(g.Dst(), engine, residual)});
        }
        break;
      case Kind::kInputGrad:
        args.insert(
            {{DNNL_ARG_DIFF_DST, dst}, {DNNL_ARG_WEIGHTS, weights}, {DNNL_ARG_DIFF_SRC, src}});
        break;
      case Kind::kWeightGrad:
        args.insert(
            {{DNNL_ARG_SRC, src}, {DNNL_ARG_DIFF_DST, dst}, {DNNL_ARG_DIFF_WEIGHTS, weights}});
        break;
    }
    if (plan->reorder_weights && kind != Kind::kWeightGrad) {
      plan->weights_reorder.execute(stream, user_weights, weights);
    }
    plan->conv.execute(stream, args);
    if (plan->reorder_weights && kind == Kind::kWeightGrad) {
      plan->weights_reorder.execute(stream, weights, user_weights);
    }
    stream.wait();
  } catch (const dnnl::error& e) {
    return ffi::Error::Internal(std::string("pyconv oneDNN conv: ") + e.what());
  }
  return ffi::Error::Success();
}

template <Kind kind>
ffi::Error Handler(ffi::AnyBuffer a, ffi::AnyBuffer b, ffi::Result<ffi::AnyBuffer> out,
                   int64_t stride_h, int64_t stride_w, int64_t pad_t, int64_t pad_l,
                   int64_t pad_b, int64_t pad_r, int64_t dil_h, int64_t dil_w, int64_t groups) {
  return Run(kind, a, b, out,
             Attrs{stride_h, stride_w, pad_t, pad_l, pad_b, pad_r, dil_h, dil_w, groups});
}

// The same conv by the channel-vectorised kernels of narrow_conv.h where they apply (this CPU
// and these shapes), else by oneDNN.
template <Kind kind>
ffi::Error NarrowHandler(ffi::AnyBuffer a, ffi::AnyBuffer b, ffi::Result<ffi::AnyBuffer> out,
                         int64_t stride_h, int64_t stride_w, int64_t pad_t, int64_t pad_l,
                         int64_t pad_b, int64_t pad_r, int64_t dil_h, int64_t dil_w,
                         int64_t groups) {
  const Attrs attrs{stride_h, stride_w, pad_t, pad_l, pad_b, pad_r, dil_h, dil_w, groups};
  Operands o;
  if (ffi::Error error = Resolve(kind, a, b, out, attrs, o); error.failure()) return error;
  const pyconv::NarrowConv conv{o.x[0], o.x[1], o.x[2], o.x[3], o.y[1], o.y[2], o.y[3],
                                o.w[0], o.w[1], stride_h, stride_w, pad_t, pad_l,
                                dil_h, dil_w, groups};
  const bool paired = (kind == Kind::kForward && pyconv::PairedForwardSupported(conv)) ||
                      (kind == Kind::kWeightGrad && pyconv::PairedWeightGradSupported(conv));
  if (!paired && !pyconv::NarrowSupported(conv)) return Run(kind, a, b, out, attrs);
  auto* x = static_cast<float*>(o.x_data);
  auto* w = static_cast<float*>(o.w_data);
  auto* y = static_cast<float*>(o.y_data);
  if (kind == Kind::kForward) {
    pyconv::NarrowForward(conv, x, w, y);
  } else if (kind == Kind::kWeightGrad) {
    pyconv::NarrowWeightGrad(conv, x, y, w);
  } else {
    pyconv::NarrowInputGrad(conv, y, w, x);
  }
  return ffi::Error::Success();
}

// The inference forward pass: y = act(conv(x, w) + bias [+ residual]). With `narrow` (the caller's
// choice, as for the other targets) the narrow kernels run it where they apply, bias and ReLU in
// their row loop; oneDNN runs the rest, the epilogue as post-ops.
ffi::Error FusedForward(ffi::AnyBuffer x, ffi::AnyBuffer w, ffi::AnyBuffer bias,
                        ffi::RemainingArgs rest, ffi::Result<ffi::AnyBuffer> y, int64_t stride_h,
                        int64_t stride_w, int64_t pad_t, int64_t pad_l, int64_t pad_b,
                        int64_t pad_r, int64_t dil_h, int64_t dil_w, int64_t groups,
                        int64_t relu, int64_t narrow) {
  const Attrs attrs{stride_h, stride_w, pad_t, pad_l, pad_b, pad_r, dil_h, dil_w, groups};
  if (rest.size() > 1) return ffi::Error::InvalidArgument("pyconv conv: at most one residual");
  void* residual = nullptr;
  if (rest.size() == 1) {
    auto r = rest.get<ffi::AnyBuffer>(0);
    if (r.has_error()) return r.error();
    if (r->element_type() != ffi::DataType::F32 || r->element_count() != y->element_count()) {
      return ffi::Error::InvalidArgument("pyconv conv: the residual must be float32, y's shape");
    }
    residual = r->untyped_data();
  }
  if (bias.element_type() != ffi::DataType::F32 || bias.dimensions().size() != 1 ||
      bias.dimensions()[0] != y->dimensions().back()) {
    return ffi::Error::InvalidArgument("pyconv conv: the bias must be float32 [out_channels]");
  }
  const Epilogue e{true, residual != nullptr, relu != 0};
  Operands o;
  if (ffi::Error error = Resolve(Kind::kForward, x, w, y, attrs, o); error.failure()) return error;
  const pyconv::NarrowConv conv{o.x[0], o.x[1], o.x[2], o.x[3], o.y[1], o.y[2], o.y[3],
                                o.w[0], o.w[1], stride_h, stride_w, pad_t, pad_l,
                                dil_h, dil_w, groups};
  const bool native = pyconv::PairedForwardSupported(conv) || pyconv::NarrowSupported(conv);
  if (narrow && !e.residual && native) {
    pyconv::NarrowForward(conv, static_cast<float*>(o.x_data), static_cast<float*>(o.w_data),
                          static_cast<float*>(o.y_data), static_cast<float*>(bias.untyped_data()),
                          e.relu);
    return ffi::Error::Success();
  }
  return Run(Kind::kForward, x, w, y, attrs, e, bias.untyped_data(), residual);
}

// The attributes every handler takes (Attrs), after its buffers.
template <typename Binding>
auto WithConvAttrs(Binding binding) {
  return std::move(binding)
      .template Attr<int64_t>("stride_h")
      .template Attr<int64_t>("stride_w")
      .template Attr<int64_t>("pad_t")
      .template Attr<int64_t>("pad_l")
      .template Attr<int64_t>("pad_b")
      .template Attr<int64_t>("pad_r")
      .template Attr<int64_t>("dil_h")
      .template Attr<int64_t>("dil_w")
      .template Attr<int64_t>("groups");
}

// Two arrays in, one out: the plain forward pass and the gradients.
auto Binding() {
  return WithConvAttrs(
      ffi::Ffi::Bind().Arg<ffi::AnyBuffer>().Arg<ffi::AnyBuffer>().Ret<ffi::AnyBuffer>());
}

// x, kernel, bias and an optional residual in, y out, with the epilogue's ReLU and the choice
// of kernels.
auto FusedBinding() {
  return WithConvAttrs(ffi::Ffi::Bind()
                           .Arg<ffi::AnyBuffer>()
                           .Arg<ffi::AnyBuffer>()
                           .Arg<ffi::AnyBuffer>()
                           .RemainingArgs()
                           .Ret<ffi::AnyBuffer>())
      .Attr<int64_t>("relu")
      .Attr<int64_t>("narrow");
}

// The identity, its output aliased to its input: XLA writes the input out and cannot fuse its
// computation into the output's users (see pyconv_jax/layers/materialize.py).
ffi::Error Materialize(ffi::AnyBuffer x, ffi::Result<ffi::AnyBuffer> y) {
  if (x.untyped_data() != y->untyped_data()) {
    std::memcpy(y->untyped_data(), x.untyped_data(), x.size_bytes());
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(PyconvMaterialize, Materialize,
                              ffi::Ffi::Bind().Arg<ffi::AnyBuffer>().Ret<ffi::AnyBuffer>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(PyconvOnednnConvForward, Handler<Kind::kForward>, Binding());
XLA_FFI_DEFINE_HANDLER_SYMBOL(PyconvOnednnConvInputGrad, Handler<Kind::kInputGrad>, Binding());
XLA_FFI_DEFINE_HANDLER_SYMBOL(PyconvOnednnConvWeightGrad, Handler<Kind::kWeightGrad>, Binding());
XLA_FFI_DEFINE_HANDLER_SYMBOL(PyconvNarrowConvForward, NarrowHandler<Kind::kForward>, Binding());
XLA_FFI_DEFINE_HANDLER_SYMBOL(PyconvNarrowConvInputGrad, NarrowHandler<Kind::kInputGrad>,
                              Binding());
XLA_FFI_DEFINE_HANDLER_SYMBOL(PyconvNarrowConvWeightGrad, NarrowHandler<Kind::kWeightGrad>,
                              Binding());
XLA_FFI_DEFINE_HANDLER_SYMBOL(PyconvOnednnConvForwardFused, FusedForward, FusedBinding());

// For the tests: whether the narrow kernels, not oneDNN, run a conv of this geometry here, and
// whether the paired kernel runs its forward pass. `geometry` holds the 16 fields of
// pyconv::NarrowConv in order.
namespace {
pyconv::NarrowConv Geometry(const int64_t* v) {
  return pyconv::NarrowConv{v[0], v[1], v[2],  v[3],  v[4],  v[5],  v[6],  v[7],
                            v[8], v[9], v[10], v[11], v[12], v[13], v[14], v[15]};
}
}  // namespace

extern "C" int PyconvNarrowSupported(const int64_t* geometry) {
  return pyconv::NarrowSupported(Geometry(geometry)) ? 1 : 0;
}

extern "C" int PyconvPairedForwardSupported(const int64_t* geometry) {
  return pyconv::PairedForwardSupported(Geometry(geometry)) ? 1 : 0;
}

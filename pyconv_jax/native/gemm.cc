// The weight gradient of a 1x1 convolution, X^T dY, by oneDNN's sgemm, as an XLA FFI handler.
//
// XLA:CPU computes a product that contracts the long (pixel) axis of both operands 1.5-2.7x
// slower than a BLAS does when that axis is much longer than the channel axes: [200704, 64]^T
// [200704, 64] takes 23.5 ms in XLA and 8.6 ms here (docs/benchmarks.md). Float32 only.

#include <cstdint>
#include <string>

#include "dnnl.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// dw [K, N] = x[M, K]^T dy[M, N], where M is the product of every axis of x but the last.
ffi::Error MatmulTN(ffi::AnyBuffer x, ffi::AnyBuffer dy, ffi::Result<ffi::AnyBuffer> dw) {
  if (x.element_type() != ffi::F32 || dy.element_type() != ffi::F32 ||
      dw->element_type() != ffi::F32) {
    return ffi::Error::InvalidArgument("pyconv matmul: float32 only");
  }
  const auto xd = x.dimensions(), dyd = dy.dimensions(), wd = dw->dimensions();
  if (xd.size() < 1 || dyd.size() != xd.size() || wd.size() != 2) {
    return ffi::Error::InvalidArgument("pyconv matmul: x [..., K], dy [..., N], dw [K, N]");
  }
  const int64_t k = xd.back(), n = dyd.back();
  const int64_t m = k == 0 ? 0 : static_cast<int64_t>(x.element_count()) / k;
  if (wd[0] != k || wd[1] != n || static_cast<int64_t>(dy.element_count()) != m * n) {
    return ffi::Error::InvalidArgument("pyconv matmul: shapes do not agree");
  }
  // Row-major C = op(A) op(B): A = x (m x k, transposed), B = dy (m x n), C = dw (k x n).
  const dnnl_status_t status =
      dnnl_sgemm('T', 'N', k, n, m, 1.0f, static_cast<const float*>(x.untyped_data()), k,
                 static_cast<const float*>(dy.untyped_data()), n, 0.0f,
                 static_cast<float*>(dw->untyped_data()), n);
  if (status != dnnl_success) {
    return ffi::Error::Internal("pyconv matmul: dnnl_sgemm failed with status " +
                                std::to_string(static_cast<int>(status)));
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(PyconvOnednnMatmulTN, MatmulTN,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>());

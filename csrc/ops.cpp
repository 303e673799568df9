// Every op schema of the weightshare library, in one place. The CPU and CUDA kernels register their
// implementations under the same names (cpu/*.cpp, cuda/*.cu); python/weightshare/ops.py adds the fake (meta)
// kernels, autograd and documented wrappers. See csrc/README.md for how to add an op.
#include <Python.h>
#include <torch/library.h>

// `import weightshare._C` loads this library, whose static initialisers register the ops below. No Python
// functions live here: everything is reached through torch.ops.weightshare.*.
PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "weightshare native ops (see torch.ops.weightshare)",
                               -1, nullptr, nullptr, nullptr, nullptr, nullptr};
  return PyModule_Create(&module);
}

TORCH_LIBRARY(weightshare, m) {
  // Packs uint8 indices [..., n], each < 2**bits, into uint8 [..., packed_row_bytes(n, bits)] (layout:
  // include/weightshare/packing.h). Raises ValueError if an index does not fit in `bits`.
  m.def("pack(Tensor idx, int bits) -> Tensor");

  // Inverse of pack: uint8 [..., packed_row_bytes(n, bits)] -> uint8 indices [..., n], bit-exact.
  m.def("unpack(Tensor packed, int bits, int n) -> Tensor");

  // Nearest codebook entry of each weight: w float [R, ...], codebook [G, K] (G divides R; group g serves rows
  // g*R/G .. (g+1)*R/G-1), returns uint8 indices shaped like w. Ties go to the lowest index (search_table.h).
  m.def("assign(Tensor w, Tensor codebook) -> Tensor");

  // Lloyd statistics of an assignment: per group g and entry j, the float64 sums
  //   sums[g,j] = sum h*w,  weights[g,j] = sum h,  sqsums[g,j] = sum h*w^2   over weights with idx == j
  // (h = importance, or 1). New centroid = sums/weights; distortion of codebook c = sum(sqsums - 2c*sums + c^2*weights).
  m.def("kmeans_step(Tensor w, Tensor idx, int k, Tensor? importance=None, int groups=1) -> (Tensor, Tensor, Tensor)");

  // Loss-aware assignment, the second-order model of the loss change of moving w to entry c:
  //   argmin_j  grad*(c_j - w) + 0.5*hdiag*(c_j - w)^2 + penalty[g, j]
  // (grad None = 0; penalty [G, K] carries a size/entropy cost per entry). Ties go to the lowest index.
  m.def("loss_aware_assign(Tensor w, Tensor? grad, Tensor hdiag, Tensor codebook, Tensor? penalty=None) -> Tensor");

  // Exact weighted 1-D k-means (dynamic programme) over sorted distinct float64 values with float64 weights:
  // returns (centroids float64 [min(k, n)], ascending; the optimal weighted squared error, float64 scalar). CPU only.
  m.def("kmeans1d_optimal(Tensor values, Tensor weights, int k) -> (Tensor, Tensor)");

  // Decodes packed indices [R, packed_row_bytes(n, bits)] through codebook [G, K] (G divides R, K <= 2**bits) into
  // a dense tensor of `shape` (shape[0] == R, numel == R * n) with the codebook's dtype. The reference path and
  // an autograd helper; the shared-weight kernels never call it.
  m.def("dequantize(Tensor packed, Tensor codebook, int bits, int[] shape) -> Tensor");

  // y = x @ W^T + bias with W [out_features, in_features] given only as packed indices [out_features,
  // packed_row_bytes(in_features, bits)] and codebook [G, K]; x [..., in_features] fp32/fp16/bf16, y has x's
  // dtype. activation "float": exact (fp32 accumulation); "int8": activations quantized per row to int8 on the
  // fly and the codebook looked up as int8 values (per-group scale). The dense W is never materialised.
  m.def(
      "shared_linear(Tensor x, Tensor packed, Tensor codebook, int bits, int out_features, int in_features, "
      "Tensor? bias=None, str activation=\"float\") -> Tensor");

  // 2-D convolution with a shared weight of weight_shape [out, in/groups, kh, kw] given as packed indices
  // [out, packed_row_bytes(in/groups*kh*kw, bits)] and codebook [G, K] (G divides out); same semantics and
  // arguments as F.conv2d (grouped, depthwise, dilated, any padding/stride; channels-last input accepted).
  m.def(
      "shared_conv2d(Tensor x, Tensor packed, Tensor codebook, int bits, int[] weight_shape, Tensor? bias=None, "
      "int[] stride=[1, 1], int[] padding=[0, 0], int[] dilation=[1, 1], int groups=1) -> Tensor");

  // Fisher diagonal of a Linear layer without per-sample gradients in memory: for x [N, I] or [N, T, I] and
  // grad_out [N, O] or [N, T, O] (the per-sample loss gradients w.r.t. the layer output), returns float32 [O, I]
  //   sum_n ( sum_t grad_out[n, t, :]^T x[n, t, :] )^2      (elementwise square of each sample's weight gradient)
  m.def("sq_grad_accum(Tensor x, Tensor grad_out) -> Tensor");

  // Lossless context-adaptive arithmetic coding of an index matrix [rows, cols] (uint8, each < k) into a uint8
  // stream, and back (cpu/context_coder.cpp has the model and the stream layout). CPU only: it is the file
  // format's coder, sequential by nature. Decoding validates the stream and raises ValueError on corruption.
  m.def("context_encode(Tensor indices, int k) -> Tensor");
  m.def("context_decode(Tensor stream, int rows, int cols, int k) -> Tensor");

  // Gradients of shared_linear's float path: (grad_x [..., in_features] in x's dtype, or empty when not needed;
  // grad_codebook [G, K] float32: per entry, the sum of dL/dW over the weights that use it, or empty).
  m.def(
      "shared_linear_backward(Tensor grad_out, Tensor x, Tensor packed, Tensor codebook, int bits, "
      "int out_features, int in_features, bool need_x_grad, bool need_codebook_grad) -> (Tensor, Tensor)");
}

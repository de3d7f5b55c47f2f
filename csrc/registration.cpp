// Schemas of all fastflow ops, and the tiny Python module `fastflow._C`.
//
// `_C` has no functions: importing it loads this shared library, which runs the static TORCH_LIBRARY
// registrations; the ops are then called through the dispatcher as torch.ops.fastflow.<op>. Using only
// the dispatcher keeps the library free of libtorch_python, so it builds with py_limited_api (one wheel
// per torch version, not per Python version). Kernels live in one file per op family (cache_forecast.cpp).
#include <Python.h>
#include <torch/library.h>
#include <torch/version.h>

// fastflow/_extension.py reads this string from the file *before* loading it: a library built against
// another torch fails at load time with an unreadable undefined-symbol error, or loads and misbehaves.
extern "C" __attribute__((used)) const char fastflow_built_with_torch[] =
    "fastflow-built-with-torch=" TORCH_VERSION;

extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}

TORCH_LIBRARY(fastflow, m) {
  // Each op's fake (meta) kernel is registered in its Python module, named before its def so that tracing
  // a loaded-but-not-imported op tells the user which module to import.

  // forecast = sum_k coeffs[k] * history[k]
  m.set_python_module("fastflow.ops.cache_forecast");
  m.def("cache_forecast(Tensor[] history, float[] coeffs) -> Tensor");

  // One Semla layer's pair messages + node attention + coordinate attention (see the Python module)
  m.set_python_module("fastflow.ops.semla_attention");
  m.def(
      "semla_attention(Tensor node_terms_i, Tensor node_terms_j, Tensor gram_coords, Tensor gram_weight, "
      "Tensor out_weight, Tensor out_bias, Tensor values, Tensor attn_coords, Tensor adjacency, "
      "Tensor? edge_feats, Tensor? edge_norm_weight, Tensor? edge_norm_bias, Tensor? edge_weight, "
      "Tensor? embed_weight1, Tensor? embed_bias1, Tensor? embed_weight2, Tensor? embed_bias2, "
      "float edge_norm_eps, float coord_eps, str precision=\"fp32\") -> (Tensor, Tensor, Tensor)");

  // A Semla generator's pair tail: BondRefine, bond LayerNorm, symmetrisation, edge head (see the Python module)
  m.set_python_module("fastflow.ops.bond_head");
  m.def(
      "bond_head(Tensor edge_feats, Tensor bond_norm_weight, Tensor bond_norm_bias, Tensor head_weight1, "
      "Tensor head_bias1, Tensor head_weight2, Tensor head_bias2, Tensor? node_terms_i, Tensor? node_terms_j, "
      "Tensor? coords, Tensor? edge_norm_weight, Tensor? edge_norm_bias, Tensor? edge_weight, Tensor? dist_weight, "
      "Tensor? dot_weight, Tensor? refine_weight, Tensor? refine_bias, float edge_norm_eps, float bond_norm_eps) "
      "-> Tensor");

  // One step of the uniform-noise discrete flow for atom types or bonds (see the Python module)
  m.set_python_module("fastflow.ops.discrete_flow_step");
  m.def(
      "discrete_flow_step(Tensor logits, Tensor current, Tensor mask, Tensor t, Tensor keys, int step, int stream, "
      "float dt, float noise_level) -> (Tensor, Tensor)");

  // e3nn-compatible tensor products: a sum of Clebsch-Gordan paths (see the Python module)
  m.set_python_module("fastflow.ops.tensor_product");
  m.def(
      "tensor_product(Tensor x1, Tensor x2, Tensor weights, Tensor paths, Tensor cg_index, Tensor cg_value, "
      "Tensor cg_offsets, int dim_out) -> Tensor");
  m.def(
      "tensor_product_backward(Tensor grad_out, Tensor x1, Tensor x2, Tensor weights, Tensor paths, "
      "Tensor cg_index, Tensor cg_value, Tensor cg_offsets) -> (Tensor, Tensor, Tensor)");
  // out[n] = sum over edges e with edge_dst[e] == n of tensor_product(node_feats[edge_src[e]], edge_attrs[e], w[e])
  m.def(
      "tp_conv(Tensor node_feats, Tensor edge_attrs, Tensor weights, Tensor edge_src, Tensor edge_dst, "
      "int n_nodes, Tensor paths, Tensor cg_index, Tensor cg_value, Tensor cg_offsets, int dim_out) -> Tensor");
  m.def(
      "tp_conv_backward(Tensor grad_out, Tensor node_feats, Tensor edge_attrs, Tensor weights, Tensor edge_src, "
      "Tensor edge_dst, Tensor paths, Tensor cg_index, Tensor cg_value, Tensor cg_offsets) "
      "-> (Tensor, Tensor, Tensor)");

  // MACE's symmetric contraction: a sparse polynomial of each node's features per channel (see the Python module)
  m.set_python_module("fastflow.ops.symmetric_contraction");
  m.def(
      "symmetric_contraction(Tensor x, Tensor elements, Tensor coeffs, Tensor monomials, Tensor terms, "
      "int[] out_dims) -> Tensor");
  m.def(
      "symmetric_contraction_backward(Tensor grad_out, Tensor x, Tensor elements, Tensor coeffs, Tensor monomials, "
      "Tensor terms, int[] out_dims, bool need_x, bool need_coeffs) -> (Tensor, Tensor)");
}

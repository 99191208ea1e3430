// Schemas of the native PVM ops (one per op; CPU impls in cpu/, CUDA impls in cuda/).
// They must equal pvm_kernels/ops/registration.py:SCHEMAS, whose fake implementations
// and autograd formulas Python attaches to these ops (checked by tests/test_native.py).
#ifdef PVM_PYTHON_MODULE
#include <Python.h>
#endif
#include <torch/library.h>

#ifdef PVM_PYTHON_MODULE  // set by setup.py; CMake builds a plain library
extern "C" {
// Importing pvm_kernels._C loads this library, which runs the registrations below.
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}
}
#endif

TORCH_LIBRARY_FRAGMENT(pvm_kernels, m) {
  m.def("native_retrieval_fwd(Tensor q, Tensor k, Tensor v, Tensor? key_mask, Tensor? kv_len, "
        "float scale) -> (Tensor, Tensor)");
  m.def("native_retrieval_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, "
        "Tensor lse, Tensor? key_mask, Tensor? kv_len, float scale) -> (Tensor, Tensor, Tensor)");
  m.def("native_retrieval_varlen_fwd(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens_q, "
        "Tensor cu_seqlens_k, int max_seqlen_q, int max_seqlen_k, float scale) -> (Tensor, Tensor)");
  m.def("native_retrieval_varlen_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, "
        "Tensor lse, Tensor cu_seqlens_q, Tensor cu_seqlens_k, int max_seqlen_q, int max_seqlen_k, "
        "float scale) -> (Tensor, Tensor, Tensor)");
  m.def("native_merge_fwd(Tensor expanded, Tensor gate, Tensor? keep, Tensor? ffn_output, "
        "float eps) -> (Tensor, Tensor)");
  m.def("native_merge_bwd(Tensor grad_out, Tensor expanded, Tensor gate, Tensor? keep, "
        "Tensor rstd) -> (Tensor, Tensor)");
}

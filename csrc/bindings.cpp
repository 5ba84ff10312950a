// dbprop._C: the one pybind11 binding unit, kept thin: the chain program (descriptors and live parameter tensors),
// the four pass drivers and Algorithm 4 over it, the host workspace, build facts. Loading it registers the element
// kernels' operators (csrc/ops.h, ops.cpp, cpu/, cuda/). Import torch before this module.
#include <torch/extension.h>

#include "algorithm4.h"
#include "ops.h"
#include "program.h"
#include "workspace.h"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace py = pybind11;
using dbprop::ForwardState;
using dbprop::Program;
using dbprop::absent_if_undefined;  // csrc/ops.h: an undefined tensor is None in Python
using dbprop::undefined_if_absent;
using OptTensor = c10::optional<at::Tensor>;

namespace {

py::dict build_info() {
  py::dict info;
#ifdef _OPENMP
  info["openmp"] = true;
  info["openmp_max_threads"] = omp_get_max_threads();
#else
  info["openmp"] = false;
#endif
#ifdef WITH_CUDA
  info["cuda"] = true;
#define DBPROP_STR2(x) #x
#define DBPROP_STR(x) DBPROP_STR2(x)
  info["cuda_archs"] = DBPROP_STR(DBPROP_CUDA_ARCHS);  // e.g. "80_90" for TORCH_CUDA_ARCH_LIST="8.0;9.0"
#else
  info["cuda"] = false;
#endif
  info["dtypes"] = py::make_tuple("float32", "float64", "float16", "bfloat16");
  return info;
}

// What every pass driver runs under: the GIL released, and the dispatcher below autograd (the passes are derivative
// computations: nothing in them is recorded, and the element operators skip their Autograd kernel). So outputs carry
// no graph and in-place updates inside bump no version counters: callers pass no tensor that autograd tracks as an
// accumulator (the Python engine calls the drivers under no_grad with fresh accumulators).
struct PassGuard {
  py::gil_scoped_release release;
  at::AutoDispatchBelowADInplaceOrView below_autograd;
};

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "dbprop native extension: fused double-backpropagation passes";
  m.def("build_info", &build_info, "What this extension was compiled with.");

  py::class_<Program, std::shared_ptr<Program>>(m, "Program")
      .def(py::init<const std::vector<dbprop::OpDescriptor>&, std::vector<at::Tensor>,
                    const std::vector<OptTensor>&>(),
           py::arg("descriptors"), py::arg("weights"), py::arg("biases"));
  py::class_<ForwardState, std::shared_ptr<ForwardState>>(m, "ForwardState")
      .def_readonly("output", &ForwardState::output)
      .def_readonly("numel_per_sample", &ForwardState::numel_per_sample);

  m.def("forward", &dbprop::forward, py::arg("program"), py::arg("x"), py::arg("keep_inputs"),
        py::call_guard<PassGuard>());
  m.def("backward", [](const Program& p, const ForwardState& s, const at::Tensor& zeta_L, bool keep) {
    auto [xi, zetas] = dbprop::backward(p, s, zeta_L, keep);
    return std::make_tuple(xi, absent_if_undefined(zetas));
  }, py::call_guard<PassGuard>());
  m.def("backward_backward", [](const Program& p, const ForwardState& s, const at::Tensor& q0,
                                const std::vector<OptTensor>& zetas, const std::vector<OptTensor>& theta_hat,
                                const std::vector<bool>& want_weight, bool need_h) {
    auto z = undefined_if_absent(zetas);
    auto th = undefined_if_absent(theta_hat);
    at::Tensor h = dbprop::backward_backward(p, s, q0, z, th, want_weight, need_h);
    return std::make_tuple(absent_if_undefined(h), absent_if_undefined(th));
  }, py::call_guard<PassGuard>());
  m.def("forward_backward", [](const Program& p, const ForwardState& s, const at::Tensor& eta_L,
                               const std::vector<OptTensor>& grad_w, const std::vector<OptTensor>& grad_b,
                               const std::vector<bool>& want_weight, const std::vector<bool>& want_bias,
                               bool need_input_grad) {
    auto gw = undefined_if_absent(grad_w);
    auto gb = undefined_if_absent(grad_b);
    at::Tensor gamma0 = dbprop::forward_backward(p, s, eta_L, gw, gb, want_weight, want_bias, need_input_grad);
    return std::make_tuple(absent_if_undefined(gamma0), absent_if_undefined(gw), absent_if_undefined(gb));
  }, py::call_guard<PassGuard>());
  m.def("jacobian_penalty", [](const Program& p, const ForwardState& s, const at::Tensor& x, bool softmax,
                               const std::vector<int64_t>& chunks, int64_t cap, bool time_chunks,
                               const OptTensor& directions, double scale,
                               const at::Tensor& sample_weight, const std::vector<bool>& want_weight,
                               const std::vector<bool>& want_bias, bool need_input_grad) {
    auto r = dbprop::jacobian_penalty(p, s, x, softmax, chunks, cap, time_chunks,
                                      directions.value_or(at::Tensor()), scale,
                                      sample_weight, want_weight, want_bias, need_input_grad);
    return std::make_tuple(r.value, absent_if_undefined(r.grad_w), absent_if_undefined(r.grad_b),
                           absent_if_undefined(r.grad_x), r.chunk_sizes, r.chunk_seconds);
  }, "Algorithm 4: (values, weight grads, bias grads, input grad, chunk sizes, chunk seconds) of the "
     "Jacobian penalty.", py::call_guard<PassGuard>());

  // the passes' host workspace (csrc/workspace.h; dbprop/memory.py)
  m.def("workspace_enter", &dbprop::workspace::enter);
  m.def("workspace_exit", &dbprop::workspace::exit);
  m.def("workspace_release_cached", &dbprop::workspace::release_cached);
  m.def("workspace_set_enabled", &dbprop::workspace::set_enabled);
  m.def("workspace_stats", [] {
    const auto s = dbprop::workspace::stats();
    py::dict d;
    d["cached_bytes"] = s.cached_bytes;
    d["in_use_bytes"] = s.in_use_bytes;
    d["hits"] = s.hits;
    d["misses"] = s.misses;
    d["depth"] = s.depth;
    d["enabled"] = s.enabled;
    return d;
  });

  // the element kernels are dispatcher operators (csrc/ops.h, torch.ops.dbprop.*); what remains here is the
  // chain program with its pass drivers, the workspace, and the tables' names
  m.def("element_operators", &dbprop::element_operators,
        "The element operators' table (csrc/ops.h): (name, schema, doc) per operator.");
  m.def("activation_names", &dbprop::activation_names, "Names of the smooth activations, in table order.");
  m.def("penalty_head_names", &dbprop::penalty_head_names, "Names of the penalty heads, in table order.");
  m.def("penalty_heads", &dbprop::penalty_heads, "The penalty head table: (name, reads x) per head.");
  m.def("chain_kinds", &dbprop::chain_kinds, "Names of the native chain driver's node kinds, in table order.");
}

// dbprop._C: the one pybind11 binding unit. Exposes the stage program, the four pass drivers, Algorithm 4
// and (for tests) the element kernels. Import torch before this module.
#include <torch/extension.h>

#include "algorithm4.h"
#include "elementwise.h"
#include "program.h"
#include "workspace.h"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace py = pybind11;
using dbprop::ForwardState;
using dbprop::Program;
using OptTensor = c10::optional<at::Tensor>;

namespace {

std::vector<at::Tensor> from_optional(const std::vector<OptTensor>& v) {
  std::vector<at::Tensor> out;
  for (const auto& t : v) out.push_back(t.has_value() ? *t : at::Tensor());
  return out;
}

OptTensor opt(const at::Tensor& t) { return t.defined() ? OptTensor(t) : c10::nullopt; }

std::vector<OptTensor> to_optional(const std::vector<at::Tensor>& v) {
  std::vector<OptTensor> out;
  for (const auto& t : v) out.push_back(opt(t));
  return out;
}

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
        py::call_guard<py::gil_scoped_release>());
  m.def("backward", [](const Program& p, const ForwardState& s, const at::Tensor& zeta_L, bool keep) {
    py::gil_scoped_release release;
    auto [xi, zetas] = dbprop::backward(p, s, zeta_L, keep);
    return std::make_tuple(xi, to_optional(zetas));
  });
  m.def("backward_backward", [](const Program& p, const ForwardState& s, const at::Tensor& q0,
                                const std::vector<OptTensor>& zetas, const std::vector<OptTensor>& theta_hat,
                                const std::vector<bool>& want_weight, bool need_h) {
    py::gil_scoped_release release;
    auto z = from_optional(zetas);
    auto th = from_optional(theta_hat);
    at::Tensor h = dbprop::backward_backward(p, s, q0, z, th, want_weight, need_h);
    return std::make_tuple(opt(h), to_optional(th));
  });
  m.def("forward_backward", [](const Program& p, const ForwardState& s, const at::Tensor& eta_L,
                               const std::vector<OptTensor>& grad_w, const std::vector<OptTensor>& grad_b,
                               const std::vector<bool>& want_weight, const std::vector<bool>& want_bias,
                               bool need_input_grad) {
    py::gil_scoped_release release;
    auto gw = from_optional(grad_w);
    auto gb = from_optional(grad_b);
    at::Tensor gamma0 = dbprop::forward_backward(p, s, eta_L, gw, gb, want_weight, want_bias, need_input_grad);
    return std::make_tuple(opt(gamma0), to_optional(gw), to_optional(gb));
  });
  m.def("jacobian_penalty", [](const Program& p, const at::Tensor& x, bool softmax, const std::vector<int64_t>& chunks,
                               int64_t budget_max, int64_t budget_base, bool time_chunks,
                               const OptTensor& directions, double scale,
                               const at::Tensor& sample_weight, const std::vector<bool>& want_weight,
                               const std::vector<bool>& want_bias, bool need_input_grad) {
    py::gil_scoped_release release;
    auto r = dbprop::jacobian_penalty(p, x, softmax, chunks, budget_max, budget_base, time_chunks,
                                      directions.value_or(at::Tensor()), scale,
                                      sample_weight, want_weight, want_bias, need_input_grad);
    return std::make_tuple(r.value, to_optional(r.grad_w), to_optional(r.grad_b), opt(r.grad_x), r.chunk_sizes,
                           r.chunk_seconds);
  }, "Algorithm 4: (values, weight grads, bias grads, input grad, chunk sizes, chunk seconds) of the "
     "Jacobian penalty.");

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

  // element kernels (tests and the Python engine)
  m.def("forward_epilogue", [](const at::Tensor& z, const OptTensor& bias, int64_t channels, int64_t inner,
                               double slope) {
    return dbprop::forward_epilogue(z, bias.value_or(at::Tensor()), channels, inner, slope);
  });
  m.def("mask_multiply", &dbprop::mask_multiply);
  m.def("pack_positive", &dbprop::pack_positive);
  m.def("mask_multiply_bias_grad", &dbprop::mask_multiply_bias_grad);
  m.def("softmax_cotangent", &dbprop::softmax_cotangent);
  m.def("softmax_eta_accumulate", [](const at::Tensor& x, const at::Tensor& v, const at::Tensor& h, at::Tensor eta) {
    dbprop::softmax_eta_accumulate(x, v, h, eta);
    return eta;
  });
  m.def("penalty_head", [](const at::Tensor& xi, const OptTensor& x, const std::string& head, double p1, double p2,
                           const at::Tensor& weight, at::Tensor value, bool want_q0, bool want_input_grad) {
    auto [q0, gx] = dbprop::penalty_head(xi, x.value_or(at::Tensor()), dbprop::head_kind(head), p1, p2, weight, value, want_q0,
                                         want_input_grad);
    return std::make_tuple(value, opt(q0), opt(gx));
  }, "value (B,) += Σ_k p(ξ_k); returns (value, q_0, Σ_k ∂p/∂x) for the penalty head named `head`.");

  // smooth activations (csrc/kernels/activations.h), selected by name; only C++ knows the kind numbers
  m.def("activation_names", &dbprop::activation_names, "Names of the smooth activations, in table order.");
  m.def("activation_derivative_multiply", [](const at::Tensor& c, const at::Tensor& z, const std::string& name,
                                             double p1, double p2) {
    return dbprop::activation_derivative_multiply(c, z, dbprop::activation_kind(name), p1, p2);
  }, "g'(z) ⊙ c, c holding k stacked copies of z; shape and dtype of c.", py::arg("c"), py::arg("z"),
        py::arg("name"), py::arg("p1"), py::arg("p2"));
  m.def("activation_source", [](const at::Tensor& xi, const at::Tensor& q, const at::Tensor& z,
                                const std::string& name, double p1, double p2) {
    return dbprop::activation_source(xi, q, z, dbprop::activation_kind(name), p1, p2);
  }, "Σ over the k stacked copies of g''(z) ⊙ ξ ⊙ q; shape and dtype of z.", py::arg("xi"), py::arg("q"),
        py::arg("z"), py::arg("name"), py::arg("p1"), py::arg("p2"));

  // train-mode BatchNorm (csrc/kernels/batchnorm.h, docs/maths.md §4.9)
  m.def("batchnorm_train_linear", &dbprop::batchnorm_train_linear,
        "A q = scale (q − m(q) − x̂ m(x̂ q)) (4.3) for q of shape (k·B, C, ...) holding k stacked copies of the "
        "batch of xhat (B, C, ...), means per copy and channel; A is self-adjoint, so this is also Aᵀ q.",
        py::arg("q"), py::arg("xhat"), py::arg("scale"));
  m.def("batchnorm_train_bbp", [](const OptTensor& xi, const at::Tensor& q, const at::Tensor& xhat,
                                  const at::Tensor& invstd, const OptTensor& gamma, bool need_tangent,
                                  bool want_source, bool want_mixed) {
    auto [tangent, source, dgamma] =
        dbprop::batchnorm_train_bbp(xi.value_or(at::Tensor()), q, xhat, invstd, gamma.value_or(at::Tensor()),
                                    need_tangent, want_source, want_mixed);
    return std::make_tuple(opt(tangent), opt(source), opt(dgamma));
  }, "(A q (4.3), ŝ (4.6) summed over the copies, θ̂_γ (4.5) summed over the copies) of a train-mode BatchNorm "
     "from one reduction pass; each None unless asked (need_tangent, want_source, want_mixed). gamma None means "
     "γ = 1; xi is needed for the source and the mixed term.",
        py::arg("xi"), py::arg("q"), py::arg("xhat"), py::arg("invstd"), py::arg("gamma"), py::arg("need_tangent"),
        py::arg("want_source"), py::arg("want_mixed"));
}

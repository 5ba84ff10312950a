// dbprop's element kernels as dispatcher operators torch.ops.dbprop.*: one schema table (TORCH_LIBRARY), the
// argument checks (TORCH_CHECK, naming the argument) that every device's kernel runs before its launcher, the
// CPU and CUDA registrations (TORCH_LIBRARY_IMPL), and the C++ entry points of csrc/ops.h, which call the
// operators through the dispatcher. Fake kernels and the typed Python wrappers: dbprop/native_ops.py.
#include "ops.h"

#include "kernels/activations.h"
#include "kernels/elementwise.h"

#include <ATen/Context.h>
#include <ATen/OpMathType.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/Exception.h>
#include <torch/csrc/autograd/variable.h>
#include <torch/library.h>

namespace dbprop {
namespace {

void check_float(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.defined(), name, " is undefined");
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), name, " must be floating point, got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

void check_bits(const at::Tensor& bits, const at::Tensor& c, int64_t mask_numel) {
  TORCH_CHECK(bits.scalar_type() == at::kByte && bits.is_contiguous(), "bits must be a contiguous uint8 tensor");
  TORCH_CHECK(bits.device() == c.device(), "bits is on ", bits.device(), " but the cotangent is on ", c.device());
  TORCH_CHECK(mask_numel > 0, "mask_numel must be positive (empty batches are rejected), got ", mask_numel);
  TORCH_CHECK(bits.numel() == (mask_numel + 7) / 8, "bits holds ", bits.numel(), " bytes but mask_numel=",
              mask_numel, " needs ", (mask_numel + 7) / 8);
  TORCH_CHECK(c.numel() % mask_numel == 0, "cotangent of ", c.numel(),
              " elements is not a whole number of copies of the mask (", mask_numel, " elements)");
}

void check_same(const at::Tensor& a, const at::Tensor& b, const char* na, const char* nb) {
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), na, " is ", a.scalar_type(), " but ", nb, " is ", b.scalar_type());
  TORCH_CHECK(a.device() == b.device(), na, " is on ", a.device(), " but ", nb, " is on ", b.device());
}

// z and a tensor t of k >= 1 stacked copies of z (the activation kernels).
void check_copies(const at::Tensor& t, const at::Tensor& z, const char* name) {
  check_float(t, name);
  check_same(t, z, name, "z");
  TORCH_CHECK(t.numel() > 0 && t.numel() % z.numel() == 0, name, " of ", t.numel(),
              " elements is not a whole positive number of copies of z (", z.numel(), " elements)");
}

void check_activation(const at::Tensor& z, int64_t kind) {
  check_float(z, "z");
  TORCH_CHECK(z.numel() > 0, "z is empty (empty batches are rejected)");
  TORCH_CHECK(kind >= 0 && kind < kernels::kNumActivations, "unknown activation kind ", kind, " (0 to ",
              kernels::kNumActivations - 1, ")");
}

// x̂ (B, C, ...) and t (k·B, C, ...): k >= 1 stacked copies of x̂'s batch (the train-mode BatchNorm kernels).
void check_bn_copies(const at::Tensor& t, const at::Tensor& xhat, const char* name) {
  check_float(t, name);
  check_same(t, xhat, name, "xhat");
  bool ok = t.dim() == xhat.dim() && t.size(0) > 0 && t.size(0) % xhat.size(0) == 0;
  for (int64_t d = 1; ok && d < t.dim(); ++d) ok = t.size(d) == xhat.size(d);
  TORCH_CHECK(ok, name, " must have shape (k·B, C, ...): k >= 1 stacked copies of xhat's shape ", xhat.sizes(),
              "; got ", t.sizes());
}

void check_bn_xhat(const at::Tensor& xhat) {
  check_float(xhat, "xhat");
  TORCH_CHECK(xhat.dim() >= 2 && xhat.numel() > 0, "xhat must be a non-empty (B, C, ...) tensor, got shape ",
              xhat.sizes());
}

// A per-channel (C,) vector of x̂'s dtype and device.
void check_bn_channel(const at::Tensor& v, const at::Tensor& xhat, const char* name) {
  check_float(v, name);
  check_same(v, xhat, name, "xhat");
  TORCH_CHECK(v.dim() == 1 && v.size(0) == xhat.size(1), name, " must have shape (", xhat.size(1),
              ",) (one value per channel), got ", v.sizes());
}

using OptTensor = std::optional<at::Tensor>;

at::Tensor undefined_if_absent(const OptTensor& t) { return t.has_value() ? *t : at::Tensor(); }
OptTensor absent_if_undefined(const at::Tensor& t) { return t.defined() ? OptTensor(t) : std::nullopt; }

// Every schema output is a tensor: an output not asked for is empty (0 elements).
at::Tensor empty_if_undefined(const at::Tensor& t, const at::Tensor& like) {
  return t.defined() ? t : at::empty({0}, like.options());
}

// The element kernels' operators, one entry per operator (schema in TORCH_LIBRARY below, kernel in Kernels,
// launchers in csrc/cpu and csrc/cuda, fake kernel in dbprop/native_ops.py).
#define DBPROP_ELEMENT_OPS(X)           \
  X(forward_epilogue)                   \
  X(pack_positive)                      \
  X(mask_multiply)                      \
  X(mask_multiply_bias_grad)            \
  X(softmax_cotangent)                  \
  X(softmax_eta_accumulate)             \
  X(penalty_head)                       \
  X(activation_derivative_multiply)     \
  X(activation_source)                  \
  X(batchnorm_train_linear)             \
  X(batchnorm_train_bbp)

// The launchers of one device as a type, so that one template (Kernels) serves every device.
#define DBPROP_CPU_LAUNCHER(op) static constexpr auto op = &cpu::op;
struct CpuLaunchers {
  DBPROP_ELEMENT_OPS(DBPROP_CPU_LAUNCHER)
};
#undef DBPROP_CPU_LAUNCHER
#ifdef WITH_CUDA
#define DBPROP_CUDA_LAUNCHER(op) static constexpr auto op = &cuda::op;
struct CudaLaunchers {
  DBPROP_ELEMENT_OPS(DBPROP_CUDA_LAUNCHER)
};
#undef DBPROP_CUDA_LAUNCHER
#endif

// The operators' kernels on the device of `Launch`, in the schemas' argument types: the checks, then the launcher.
template <class Launch>
struct Kernels {
  static std::tuple<at::Tensor, at::Tensor> forward_epilogue(const at::Tensor& z, const OptTensor& bias_opt,
                                                             int64_t channels, int64_t inner, double slope) {
    const at::Tensor bias = undefined_if_absent(bias_opt);
    check_float(z, "z");
    TORCH_CHECK(z.numel() > 0, "z is empty (empty batches are rejected)");
    if (bias.defined()) {
      check_float(bias, "bias");
      check_same(z, bias, "z", "bias");
      TORCH_CHECK(bias.numel() == channels, "bias has ", bias.numel(), " elements, expected ", channels);
    }
    TORCH_CHECK(channels > 0 && inner > 0 && z.numel() % (channels * inner) == 0,
                "z of ", z.numel(), " elements does not split into channels=", channels, " x inner=", inner);
    auto result = Launch::forward_epilogue(z, bias, channels, inner, slope);
    if (slope < 0) {  // x > 0 does not identify z > 0 for a negative slope: pack the sign of z + b itself
      at::Tensor v = bias.defined() ? z.view({-1, channels, inner}) + bias.view({1, channels, 1}) : z;
      std::get<1>(result) = Launch::pack_positive(v.gt(0).to(at::kByte).contiguous().view({-1}));
    }
    return result;
  }

  static at::Tensor pack_positive(const at::Tensor& t) {
    TORCH_CHECK(t.scalar_type() == at::kByte && t.is_contiguous() && t.numel() > 0,
                "pack_positive needs a non-empty contiguous uint8 tensor");
    return Launch::pack_positive(t);
  }

  static at::Tensor mask_multiply(const at::Tensor& c, const at::Tensor& bits, int64_t mask_numel, double slope) {
    check_float(c, "cotangent");
    check_bits(bits, c, mask_numel);
    return Launch::mask_multiply(c, bits, mask_numel, slope);
  }

  static std::tuple<at::Tensor, at::Tensor> mask_multiply_bias_grad(const at::Tensor& c, const at::Tensor& bits,
                                                                    int64_t mask_numel, double slope,
                                                                    int64_t channels, int64_t inner) {
    check_float(c, "cotangent");
    check_bits(bits, c, mask_numel);
    TORCH_CHECK(channels > 0 && inner > 0 && c.numel() % (channels * inner) == 0,
                "cotangent does not split into channels=", channels, " x inner=", inner);
    return Launch::mask_multiply_bias_grad(c, bits, mask_numel, slope, channels, inner);
  }

  static at::Tensor softmax_cotangent(const at::Tensor& x, const at::Tensor& v) {
    check_float(x, "probs");
    check_float(v, "directions");
    check_same(x, v, "probs", "directions");
    TORCH_CHECK(x.dim() == 2 && v.dim() == 3 && v.size(1) == x.size(0) && v.size(2) == x.size(1),
                "directions must have shape (k, B, C) matching probs (B, C); got ", v.sizes(), " and ", x.sizes());
    return Launch::softmax_cotangent(x, v);
  }

  static void softmax_eta_accumulate(const at::Tensor& x, const at::Tensor& v, const at::Tensor& h, at::Tensor& eta) {
    check_float(x, "probs");
    check_float(v, "directions");
    check_float(h, "h_L");
    check_float(eta, "eta");
    check_same(x, v, "probs", "directions");
    check_same(x, h, "probs", "h_L");
    TORCH_CHECK(eta.device() == x.device(), "eta is on ", eta.device(), " but probs is on ", x.device());
    TORCH_CHECK(v.sizes() == h.sizes(), "directions ", v.sizes(), " and h_L ", h.sizes(), " differ in shape");
    TORCH_CHECK(eta.sizes() == x.sizes(), "eta must have the shape of probs ", x.sizes(), ", got ", eta.sizes());
    TORCH_CHECK(eta.scalar_type() == at::toOpMathType(x.scalar_type()), "eta must be ",
                at::toOpMathType(x.scalar_type()), ", got ", eta.scalar_type());
    Launch::softmax_eta_accumulate(x, v, h, eta);
  }

  static std::tuple<at::Tensor, at::Tensor> penalty_head(const at::Tensor& xi, const OptTensor& x_opt,
                                                         c10::string_view head, double p1, double p2,
                                                         const at::Tensor& weight, at::Tensor& value, bool want_q0,
                                                         bool want_input_grad) {
    const at::Tensor x = undefined_if_absent(x_opt);
    const int64_t kind = head_kind(std::string(head));
    check_float(xi, "xi");
    TORCH_CHECK(xi.dim() == 3 && xi.size(0) > 0 && xi.size(1) > 0, "xi must have shape (k, B, N), got ",
                xi.sizes());
    TORCH_CHECK(x.defined() || !(kernels::head_reads_x(kind) || want_input_grad),
                "x is required by the '", head, "' head and for the input gradient (want_input_grad)");
    if (x.defined()) {  // read whenever given
      check_float(x, "x");
      check_same(xi, x, "xi", "x");
      TORCH_CHECK(x.dim() == 2 && x.size(0) == xi.size(1) && x.size(1) == xi.size(2), "x must have shape (",
                  xi.size(1), ", ", xi.size(2), "), got ", x.sizes());
    }
    check_float(weight, "sample_weight");
    TORCH_CHECK(weight.dim() == 1 && weight.size(0) == xi.size(1) && weight.device() == xi.device(),
                "sample_weight must have shape (", xi.size(1), ",) on ", xi.device(), ", got ", weight.sizes());
    TORCH_CHECK(value.scalar_type() == at::toOpMathType(xi.scalar_type()) && value.dim() == 1 &&
                    value.size(0) == xi.size(1) && value.is_contiguous() && value.device() == xi.device(),
                "value must be a contiguous (", xi.size(1), ",) tensor of ", at::toOpMathType(xi.scalar_type()),
                " on ", xi.device());
    auto [q0, gx] = Launch::penalty_head(xi, x, kind, p1, p2, weight, value, want_q0, want_input_grad);
    return {empty_if_undefined(q0, xi), empty_if_undefined(gx, xi)};
  }

  static at::Tensor activation_derivative_multiply(const at::Tensor& c, const at::Tensor& z,
                                                   c10::string_view activation, double p1, double p2) {
    const int64_t kind = activation_kind(std::string(activation));
    check_activation(z, kind);
    check_copies(c, z, "cotangent");
    return Launch::activation_derivative_multiply(c, z, kind, p1, p2);
  }

  static at::Tensor activation_source(const at::Tensor& xi, const at::Tensor& q, const at::Tensor& z,
                                      c10::string_view activation, double p1, double p2) {
    const int64_t kind = activation_kind(std::string(activation));
    check_activation(z, kind);
    check_copies(xi, z, "xi");
    check_copies(q, z, "q");
    TORCH_CHECK(xi.numel() == q.numel(), "xi has ", xi.numel(), " elements but q has ", q.numel());
    return Launch::activation_source(xi, q, z, kind, p1, p2);
  }

  static at::Tensor batchnorm_train_linear(const at::Tensor& q, const at::Tensor& xhat, const at::Tensor& scale) {
    check_bn_xhat(xhat);
    check_bn_copies(q, xhat, "q");
    check_bn_channel(scale, xhat, "scale");
    return Launch::batchnorm_train_linear(q, xhat, scale);
  }

  static std::tuple<at::Tensor, at::Tensor, at::Tensor> batchnorm_train_bbp(
      const OptTensor& xi_opt, const at::Tensor& q, const at::Tensor& xhat, const at::Tensor& invstd,
      const OptTensor& gamma_opt, bool need_tangent, bool want_source, bool want_mixed) {
    const at::Tensor xi = undefined_if_absent(xi_opt), gamma = undefined_if_absent(gamma_opt);
    check_bn_xhat(xhat);
    check_bn_copies(q, xhat, "q");
    TORCH_CHECK(xi.defined() || !(want_source || want_mixed),
                "xi is required for the source (want_source) and the mixed term (want_mixed)");
    if (xi.defined()) {
      check_bn_copies(xi, xhat, "xi");
      TORCH_CHECK(xi.sizes() == q.sizes(), "xi ", xi.sizes(), " and q ", q.sizes(), " differ in shape");
    }
    check_bn_channel(invstd, xhat, "invstd");
    if (gamma.defined()) check_bn_channel(gamma, xhat, "gamma");
    at::Tensor tangent, source, dgamma;
    if (need_tangent || want_source || want_mixed)
      std::tie(tangent, source, dgamma) =
          Launch::batchnorm_train_bbp(xi, q, xhat, invstd, gamma, need_tangent, want_source, want_mixed);
    return {empty_if_undefined(tangent, q), empty_if_undefined(source, q), empty_if_undefined(dgamma, q)};
  }
};

template <class Launch>
void register_kernels(torch::Library& m) {
#define DBPROP_REGISTER_KERNEL(op) m.impl(#op, TORCH_FN(Kernels<Launch>::op));
  DBPROP_ELEMENT_OPS(DBPROP_REGISTER_KERNEL)
#undef DBPROP_REGISTER_KERNEL
}

// The Autograd kernel of every operator. The kernels are the passes' derivative computations, not differentiable
// themselves: an argument that requires grad (grad mode on) is refused; then the operator runs below autograd and
// the arguments it writes (Tensor(a!)) get their version counters bumped, like ATen's in-place operators.
void not_differentiable(const c10::OperatorHandle& op, c10::DispatchKeySet keys, torch::jit::Stack* stack) {
  const auto& schema = op.schema();
  const size_t n = schema.arguments().size(), first = stack->size() - n;
  std::vector<at::Tensor> written;
  for (size_t i = 0; i < n; ++i) {
    const c10::IValue& v = (*stack)[first + i];
    if (!v.isTensor()) continue;
    const at::Tensor& t = v.toTensor();
    TORCH_CHECK(!(at::GradMode::is_enabled() && t.defined() && t.requires_grad()), schema.name(),
                " is one of dbprop's derivative kernels and is not differentiable, but its argument '",
                schema.arguments()[i].name(), "' requires grad (detach it, or call it under torch.no_grad())");
    if (schema.is_mutable({c10::SchemaArgType::input, i})) written.push_back(t);
  }
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    op.redispatchBoxed(keys & c10::after_ADInplaceOrView_keyset, stack);
  }
  for (const auto& t : written) torch::autograd::impl::bump_version(t);
}

// The typed handle of operator dbprop::<name> with the kernels' signature `Signature`.
template <class Signature>
c10::TypedOperatorHandle<Signature> typed_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

}  // namespace

// The schemas: docs in csrc/ops.h (C++ entry points of the same names). Outputs not asked for are empty. The two
// operators that write an argument (Tensor(a!)) do not return it: torch.compile functionalizes custom operators
// only without aliased outputs.
TORCH_LIBRARY(dbprop, m) {
  m.def("forward_epilogue(Tensor z, Tensor? bias, int channels, int inner, float slope) -> (Tensor, Tensor)");
  m.def("pack_positive(Tensor t) -> Tensor");
  m.def("mask_multiply(Tensor c, Tensor bits, int mask_numel, float slope) -> Tensor");
  m.def("mask_multiply_bias_grad(Tensor c, Tensor bits, int mask_numel, float slope, int channels, int inner)"
        " -> (Tensor, Tensor)");
  m.def("softmax_cotangent(Tensor probs, Tensor directions) -> Tensor");
  m.def("softmax_eta_accumulate(Tensor probs, Tensor directions, Tensor h, Tensor(a!) eta) -> ()");
  m.def("penalty_head(Tensor xi, Tensor? x, str head, float p1, float p2, Tensor weight, Tensor(a!) value,"
        " bool want_q0, bool want_input_grad) -> (Tensor, Tensor)");
  m.def("activation_derivative_multiply(Tensor c, Tensor z, str activation, float p1, float p2) -> Tensor");
  m.def("activation_source(Tensor xi, Tensor q, Tensor z, str activation, float p1, float p2) -> Tensor");
  m.def("batchnorm_train_linear(Tensor q, Tensor xhat, Tensor scale) -> Tensor");
  m.def("batchnorm_train_bbp(Tensor? xi, Tensor q, Tensor xhat, Tensor invstd, Tensor? gamma, bool need_tangent,"
        " bool want_source, bool want_mixed) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(dbprop, CPU, m) { register_kernels<CpuLaunchers>(m); }

TORCH_LIBRARY_IMPL(dbprop, Autograd, m) {
#define DBPROP_NOT_DIFFERENTIABLE(op) m.impl(#op, torch::CppFunction::makeFromBoxedFunction<&not_differentiable>());
  DBPROP_ELEMENT_OPS(DBPROP_NOT_DIFFERENTIABLE)
#undef DBPROP_NOT_DIFFERENTIABLE
}

#ifdef WITH_CUDA
TORCH_LIBRARY_IMPL(dbprop, CUDA, m) { register_kernels<CudaLaunchers>(m); }
#else
namespace {
void built_without_cuda(const c10::OperatorHandle& op, torch::jit::Stack*) {
  TORCH_CHECK(false, op.schema().name(), ": dbprop._C was built without CUDA, but an argument is a CUDA tensor "
              "(reinstall with a CUDA torch and toolkit: README, Install)");
}
}  // namespace
TORCH_LIBRARY_IMPL(dbprop, CUDA, m) {
#define DBPROP_NO_CUDA(op) m.impl(#op, torch::CppFunction::makeFromBoxedFunction<&built_without_cuda>());
  DBPROP_ELEMENT_OPS(DBPROP_NO_CUDA)
#undef DBPROP_NO_CUDA
}
#endif

// The C++ entry points: through the dispatcher, which picks the device's kernel.
using CpuKernels = Kernels<CpuLaunchers>;  // for the signatures only
#define DBPROP_TYPED_OP(name) \
  static const auto op = typed_op<decltype(CpuKernels::name)>("dbprop::" #name)

std::tuple<at::Tensor, at::Tensor> forward_epilogue(const at::Tensor& z, const at::Tensor& bias, int64_t channels,
                                                    int64_t inner, double slope) {
  DBPROP_TYPED_OP(forward_epilogue);
  return op.call(z, absent_if_undefined(bias), channels, inner, slope);
}

at::Tensor pack_positive(const at::Tensor& t) {
  DBPROP_TYPED_OP(pack_positive);
  return op.call(t);
}

at::Tensor mask_multiply(const at::Tensor& c, const at::Tensor& bits, int64_t mask_numel, double slope) {
  DBPROP_TYPED_OP(mask_multiply);
  return op.call(c, bits, mask_numel, slope);
}

std::tuple<at::Tensor, at::Tensor> mask_multiply_bias_grad(const at::Tensor& c, const at::Tensor& bits,
                                                           int64_t mask_numel, double slope, int64_t channels,
                                                           int64_t inner) {
  DBPROP_TYPED_OP(mask_multiply_bias_grad);
  return op.call(c, bits, mask_numel, slope, channels, inner);
}

at::Tensor softmax_cotangent(const at::Tensor& x, const at::Tensor& v) {
  DBPROP_TYPED_OP(softmax_cotangent);
  return op.call(x, v);
}

void softmax_eta_accumulate(const at::Tensor& x, const at::Tensor& v, const at::Tensor& h, at::Tensor& eta) {
  DBPROP_TYPED_OP(softmax_eta_accumulate);
  op.call(x, v, h, eta);
}

std::tuple<at::Tensor, at::Tensor> penalty_head(const at::Tensor& xi, const at::Tensor& x, const std::string& head,
                                                double p1, double p2, const at::Tensor& weight, at::Tensor& value,
                                                bool want_q0, bool want_input_grad) {
  DBPROP_TYPED_OP(penalty_head);
  return op.call(xi, absent_if_undefined(x), head, p1, p2, weight, value, want_q0, want_input_grad);
}

at::Tensor activation_derivative_multiply(const at::Tensor& c, const at::Tensor& z, const std::string& activation,
                                          double p1, double p2) {
  DBPROP_TYPED_OP(activation_derivative_multiply);
  return op.call(c, z, activation, p1, p2);
}

at::Tensor activation_source(const at::Tensor& xi, const at::Tensor& q, const at::Tensor& z,
                             const std::string& activation, double p1, double p2) {
  DBPROP_TYPED_OP(activation_source);
  return op.call(xi, q, z, activation, p1, p2);
}

at::Tensor batchnorm_train_linear(const at::Tensor& q, const at::Tensor& xhat, const at::Tensor& scale) {
  DBPROP_TYPED_OP(batchnorm_train_linear);
  return op.call(q, xhat, scale);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batchnorm_train_bbp(const at::Tensor& xi, const at::Tensor& q,
                                                                   const at::Tensor& xhat, const at::Tensor& invstd,
                                                                   const at::Tensor& gamma, bool need_tangent,
                                                                   bool want_source, bool want_mixed) {
  DBPROP_TYPED_OP(batchnorm_train_bbp);
  return op.call(absent_if_undefined(xi), q, xhat, invstd, absent_if_undefined(gamma), need_tangent, want_source,
                 want_mixed);
}
#undef DBPROP_TYPED_OP

int64_t head_kind(const std::string& name) {
#define DBPROP_HEAD_CASE(id, str, reads_x) \
  if (name == str) return kernels::id;
  DBPROP_PENALTY_HEADS(DBPROP_HEAD_CASE)
#undef DBPROP_HEAD_CASE
#define DBPROP_HEAD_NAME(id, str, reads_x) str " "
  TORCH_CHECK(false, "unknown penalty head '", name, "'; known: " DBPROP_PENALTY_HEADS(DBPROP_HEAD_NAME));
#undef DBPROP_HEAD_NAME
  return -1;
}

std::vector<std::string> penalty_head_names() {
#define DBPROP_HEAD_NAME(id, str, reads_x) str,
  return {DBPROP_PENALTY_HEADS(DBPROP_HEAD_NAME)};
#undef DBPROP_HEAD_NAME
}

std::vector<std::tuple<std::string, bool>> penalty_heads() {
#define DBPROP_HEAD_ROW(id, str, reads_x) {str, reads_x},
  return {DBPROP_PENALTY_HEADS(DBPROP_HEAD_ROW)};
#undef DBPROP_HEAD_ROW
}

int64_t activation_kind(const std::string& name) {
  const std::vector<std::string> names = activation_names();
  std::string known;
  for (size_t i = 0; i < names.size(); ++i) {
    if (names[i] == name) return static_cast<int64_t>(i);
    known += (i ? ", " : "") + names[i];
  }
  TORCH_CHECK(false, "unknown activation '", name, "'; known smooth activations: ", known);
  return -1;
}

std::vector<std::string> activation_names() {
#define DBPROP_ACTIVATION_NAME(id, name, Act) name,
  return {DBPROP_SMOOTH_ACTIVATIONS(DBPROP_ACTIVATION_NAME)};
#undef DBPROP_ACTIVATION_NAME
}

}  // namespace dbprop

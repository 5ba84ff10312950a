// dbprop's element operators (csrc/ops.h tables): TORCH_LIBRARY's schemas, the Autograd kernel of every operator,
// the answer of a CPU-only build to CUDA tensors, the argument checks the kernels run, and the name tables. The CPU
// and CUDA kernels are registered by the device files (csrc/cpu, csrc/cuda); fake kernels and Python wrappers:
// dbprop/native_ops.py.
#include "ops.h"

#include <ATen/Context.h>
#include <c10/util/Exception.h>
#include <torch/csrc/autograd/variable.h>
#include <torch/library.h>

namespace dbprop {
namespace checks {

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

}  // namespace checks

namespace {

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

}  // namespace

TORCH_LIBRARY(dbprop, m) {
#define DBPROP_DEFINE_OP(name, schema, doc) m.def(#name schema);
  DBPROP_ELEMENT_OPS(DBPROP_DEFINE_OP)
#undef DBPROP_DEFINE_OP
}

TORCH_LIBRARY_IMPL(dbprop, Autograd, m) {
#define DBPROP_NOT_DIFFERENTIABLE(name, schema, doc) \
  m.impl(#name, torch::CppFunction::makeFromBoxedFunction<&not_differentiable>());
  DBPROP_ELEMENT_OPS(DBPROP_NOT_DIFFERENTIABLE)
#undef DBPROP_NOT_DIFFERENTIABLE
}

#ifndef WITH_CUDA
namespace {
void built_without_cuda(const c10::OperatorHandle& op, torch::jit::Stack*) {
  TORCH_CHECK(false, op.schema().name(), ": dbprop._C was built without CUDA, but an argument is a CUDA tensor "
              "(reinstall with a CUDA torch and toolkit: README, Install)");
}
}  // namespace
TORCH_LIBRARY_IMPL(dbprop, CUDA, m) {
#define DBPROP_NO_CUDA(name, schema, doc) \
  m.impl(#name, torch::CppFunction::makeFromBoxedFunction<&built_without_cuda>());
  DBPROP_ELEMENT_OPS(DBPROP_NO_CUDA)
#undef DBPROP_NO_CUDA
}
#endif

std::vector<std::tuple<std::string, std::string, std::string>> element_operators() {
#define DBPROP_OP_ROW(name, schema, doc) {#name, schema, doc},
  return {DBPROP_ELEMENT_OPS(DBPROP_OP_ROW)};
#undef DBPROP_OP_ROW
}

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

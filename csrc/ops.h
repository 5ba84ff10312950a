// dbprop's element kernels as dispatcher operators torch.ops.dbprop.* (schemas, checks and the CPU / CUDA
// registrations in csrc/ops.cpp; fake kernels in dbprop/native_ops.py), the C++ entry points that call them
// through the dispatcher, and the per-device launchers behind them. The element math lives once, in
// csrc/kernels/elementwise.h, activations.h and batchnorm.h.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <string>
#include <tuple>
#include <vector>

namespace dbprop {

// Train-mode BatchNorm shapes (csrc/kernels/batchnorm.h): k copies of a (B, C, S) batch.
struct BnDims {
  int64_t k, B, C, S;
};

inline BnDims bn_dims(const at::Tensor& q, const at::Tensor& xhat) {
  const int64_t B = xhat.size(0), C = xhat.size(1);
  return {q.numel() / xhat.numel(), B, C, xhat.numel() / (B * C)};
}

// The C++ entry points (through the dispatcher; an undefined tensor stands for an absent optional one):

// x = g(z + b) and the packed bits of a = [z + b > 0]; `bias` (per channel, may be undefined),
// element e takes bias channel (e / inner) % channels. z must be contiguous.
std::tuple<at::Tensor, at::Tensor> forward_epilogue(const at::Tensor& z, const at::Tensor& bias, int64_t channels,
                                                    int64_t inner, double slope);

// Packed bits of [t > 0] for a contiguous uint8 tensor t.
at::Tensor pack_positive(const at::Tensor& t);

// a ⊙ c, c holding k stacked copies of the mask's batch (mask_numel elements each).
at::Tensor mask_multiply(const at::Tensor& c, const at::Tensor& bits, int64_t mask_numel, double slope);

// (a ⊙ c, Σ_{rows, inner} a ⊙ c per channel): η_j and ∇b_j in one pass.
std::tuple<at::Tensor, at::Tensor> mask_multiply_bias_grad(const at::Tensor& c, const at::Tensor& bits,
                                                           int64_t mask_numel, double slope, int64_t channels,
                                                           int64_t inner);

// ζ_L = S v for k directions: x (B, C) probabilities, v (k, B, C) -> (k, B, C).
at::Tensor softmax_cotangent(const at::Tensor& x, const at::Tensor& v);

// eta (B, C, accumulation dtype) += Σ_k (3.15)(x, v_k, h_k).
void softmax_eta_accumulate(const at::Tensor& x, const at::Tensor& v, const at::Tensor& h, at::Tensor& eta);

// Penalty head `head` (a name of the csrc/kernels/elementwise.h table, parameters p1, p2) for xi (k, B, N), x (B, N;
// may be undefined for heads that do not read it), weights w (B,): value (B,, accumulation dtype) += Σ_k p(ξ_k);
// returns q_0 = w ∇p (k, B, N; if want_q0) and Σ_k w ∂p/∂x (B, N; if want_input_grad); outputs not asked for are
// empty (0 elements).
std::tuple<at::Tensor, at::Tensor> penalty_head(const at::Tensor& xi, const at::Tensor& x, const std::string& head,
                                                double p1, double p2, const at::Tensor& weight, at::Tensor& value,
                                                bool want_q0, bool want_input_grad);

// The kernels::HeadKind of a penalty head's name (csrc/kernels/elementwise.h table; TORCH_CHECK on unknown names)
// and all names in table order.
int64_t head_kind(const std::string& name);
std::vector<std::string> penalty_head_names();
// The head table's rows: (name, reads x).
std::vector<std::tuple<std::string, bool>> penalty_heads();

// Smooth activations (csrc/kernels/activations.h): the kind number of a name (TORCH_CHECK on unknown names)
// and all names in table order (kind i is activation_names()[i]).
int64_t activation_kind(const std::string& name);
std::vector<std::string> activation_names();

// g'(z) ⊙ c for the activation named `activation` (parameters p1, p2), c holding k stacked copies of z (element e
// of c uses z[e % z.numel()]); shape and dtype of c.
at::Tensor activation_derivative_multiply(const at::Tensor& c, const at::Tensor& z, const std::string& activation,
                                          double p1, double p2);

// Σ over the k stacked copies of g''(z) ⊙ ξ ⊙ q (ξ and q each hold k copies of z), summed in the op-math type
// without atomics (one writer per element of z); shape and dtype of z.
at::Tensor activation_source(const at::Tensor& xi, const at::Tensor& q, const at::Tensor& z,
                             const std::string& activation, double p1, double p2);

// Train-mode BatchNorm (csrc/kernels/batchnorm.h, docs/maths.md §4.9). xhat is the saved x̂ (B, C, ...) and
// q, xi hold k >= 1 stacked copies of its batch (k·B, C, ...); scale, invstd, gamma are (C,). All contiguous,
// of one floating dtype and device.
// A q = scale (q − m(q) − x̂ m(x̂ q)) per copy and channel (4.3; A is self-adjoint, so this is also Aᵀ q).
at::Tensor batchnorm_train_linear(const at::Tensor& q, const at::Tensor& xhat, const at::Tensor& scale);

// One reduction pass for the moments of every (copy, channel), then what is asked for: (A q with scale γ/σ if
// need_tangent, ŝ (4.6) summed over the copies (B, C, ...) if want_source, θ̂_γ (4.5) summed over the copies (C,)
// if want_mixed); the rest empty (0 elements). gamma may be undefined (γ = 1); xi is needed for the source and
// mixed terms.
std::tuple<at::Tensor, at::Tensor, at::Tensor> batchnorm_train_bbp(const at::Tensor& xi, const at::Tensor& q,
                                                                   const at::Tensor& xhat, const at::Tensor& invstd,
                                                                   const at::Tensor& gamma, bool need_tangent,
                                                                   bool want_source, bool want_mixed);

// The per-device launchers behind the operators (csrc/cpu, csrc/cuda): arguments already checked by the operator;
// penalty heads and activations by kind number; optional tensors undefined when absent; outputs not asked for
// undefined.
#define DBPROP_DECLARE_LAUNCHERS                                                                                  \
  std::tuple<at::Tensor, at::Tensor> forward_epilogue(const at::Tensor&, const at::Tensor&, int64_t, int64_t, double); \
  at::Tensor pack_positive(const at::Tensor&);                                                                     \
  at::Tensor mask_multiply(const at::Tensor&, const at::Tensor&, int64_t, double);                                 \
  std::tuple<at::Tensor, at::Tensor> mask_multiply_bias_grad(const at::Tensor&, const at::Tensor&, int64_t, double, \
                                                             int64_t, int64_t);                                    \
  at::Tensor softmax_cotangent(const at::Tensor&, const at::Tensor&);                                              \
  void softmax_eta_accumulate(const at::Tensor&, const at::Tensor&, const at::Tensor&, at::Tensor&);               \
  std::tuple<at::Tensor, at::Tensor> penalty_head(const at::Tensor&, const at::Tensor&, int64_t, double, double,   \
                                                  const at::Tensor&, at::Tensor&, bool, bool);                     \
  at::Tensor activation_derivative_multiply(const at::Tensor&, const at::Tensor&, int64_t, double, double);        \
  at::Tensor activation_source(const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t, double, double); \
  at::Tensor batchnorm_train_linear(const at::Tensor&, const at::Tensor&, const at::Tensor&);                     \
  std::tuple<at::Tensor, at::Tensor, at::Tensor> batchnorm_train_bbp(const at::Tensor&, const at::Tensor&,        \
                                                                     const at::Tensor&, const at::Tensor&,        \
                                                                     const at::Tensor&, bool, bool, bool);

namespace cpu {
DBPROP_DECLARE_LAUNCHERS
}  // namespace cpu

#ifdef WITH_CUDA
namespace cuda {
DBPROP_DECLARE_LAUNCHERS
}  // namespace cuda
#endif

}  // namespace dbprop

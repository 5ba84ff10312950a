// The chain program on the native side (docs/maths.md §1, §2): op descriptors handed over once per call, the
// forward state, and the four passes. Convolutions and products go through ATen (oneDNN / cuDNN, cuBLAS).
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Optional.h>

#include <memory>
#include <string>
#include <tuple>
#include <vector>

namespace dbprop {

// The node kinds the native chain driver runs, and the names Python uses for them (dbprop/nodes.py
// `descriptor()`): the one place where a kind name meets its enum value.
#define DBPROP_CHAIN_KINDS(X) \
  X(Linear, "linear")         \
  X(Conv, "conv")             \
  X(Activation, "activation") \
  X(MaxPool, "maxpool")       \
  X(AvgPool, "avgpool")       \
  X(Flatten, "flatten")       \
  X(Dropout, "dropout")       \
  X(Identity, "identity")

#define DBPROP_ENUM_ENTRY(name, str) name,
enum class OpKind : int64_t { DBPROP_CHAIN_KINDS(DBPROP_ENUM_ENTRY) };
#undef DBPROP_ENUM_ENTRY

// The kind named `name` (TORCH_CHECK on unknown names).
OpKind op_kind(const std::string& name);

// Python encodes each op as (kind name, ints, floats).
using OpDescriptor = std::tuple<std::string, std::vector<int64_t>, std::vector<double>>;

struct Op {
  OpKind kind;
  std::vector<int64_t> ints;
  std::vector<double> floats;
  int64_t affine = -1;  // index into weights / biases
};

struct Program {
  std::vector<Op> ops;
  std::vector<at::Tensor> weights;
  std::vector<at::Tensor> biases;  // undefined where the layer has no bias
  int64_t first_affine = -1, last_affine = -1;

  Program(const std::vector<OpDescriptor>& descriptors, std::vector<at::Tensor> weights,
          const std::vector<c10::optional<at::Tensor>>& biases);
  bool is_affine(size_t i) const { return ops[i].kind == OpKind::Linear || ops[i].kind == OpKind::Conv; }
};

// What the forward pass keeps: inputs of K_j (when asked), packed derivative bits a_j, max-pool indices,
// dropout masks and shapes; never z_j or float masks.
struct ForwardState {
  std::vector<at::Tensor> inputs;              // affine ops: x_{j-1}, if kept
  std::vector<std::vector<int64_t>> in_shapes;  // every op: its input shape
  std::vector<std::vector<int64_t>> out_shapes;
  std::vector<at::Tensor> bits;                // activations: packed a_j
  std::vector<int64_t> mask_numel;             // activations: elements covered by the bits (B · N)
  std::vector<at::Tensor> aux;                 // max-pool: flattened indices; dropout: its mask
  at::Tensor output;
  int64_t numel_per_sample = 0;
};

std::shared_ptr<ForwardState> forward(const Program& p, const at::Tensor& x, bool keep_inputs);

// BP: returns ξ_0 and ζ_j at the output of every affine op (undefined unless keep_zetas).
std::tuple<at::Tensor, std::vector<at::Tensor>> backward(const Program& p, const ForwardState& s,
                                                         const at::Tensor& zeta_L, bool keep_zetas);

// BBP: θ̂¹_j += K□_j(q_{j-1}, ζ_j) for want_weight[j]; returns h_L (undefined unless need_h).
at::Tensor backward_backward(const Program& p, const ForwardState& s, const at::Tensor& q0,
                             std::vector<at::Tensor>& zetas, std::vector<at::Tensor>& theta_hat,
                             const std::vector<bool>& want_weight, bool need_h);

// FBP: ∇θ_j += K□_j(x_{j-1}, η_j), ∇b_j += Σ η_j; returns γ_0 (undefined unless need_input_grad).
at::Tensor forward_backward(const Program& p, const ForwardState& s, const at::Tensor& eta_L,
                            std::vector<at::Tensor>& grad_w, std::vector<at::Tensor>& grad_b,
                            const std::vector<bool>& want_weight, const std::vector<bool>& want_bias,
                            bool need_input_grad);

}  // namespace dbprop

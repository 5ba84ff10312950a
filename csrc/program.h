// The chain program on the native side (docs/maths.md §1, §2): op descriptors handed over once per call, the
// forward state, and the four passes. Convolutions and products go through ATen (oneDNN / cuDNN, cuBLAS).
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Optional.h>

#include <map>
#include <memory>
#include <string>
#include <tuple>
#include <variant>
#include <vector>

namespace dbprop {

// A descriptor's named fields: Python passes each op as (kind name, {field: [numbers]}) (dbprop/nodes.py
// `descriptor()`); each kind reads its fields into its own struct below, checking names, lengths and values.
using Fields = std::map<std::string, std::vector<double>>;
using OpDescriptor = std::tuple<std::string, Fields>;

// Reads the fields of op `index` of kind `kind`; `done()` refuses fields that no struct member read.
class FieldReader {
 public:
  FieldReader(const Fields& fields, size_t index, const std::string& kind)
      : fields_(fields), index_(index), kind_(kind) {}
  std::vector<int64_t> ints(const std::string& name, int64_t length = -1);  // length -1: any
  int64_t integer(const std::string& name) { return ints(name, 1)[0]; }
  bool flag(const std::string& name);
  double real(const std::string& name);
  void done() const;

 private:
  const std::vector<double>& get(const std::string& name);
  const Fields& fields_;
  size_t index_;
  std::string kind_;
  std::vector<std::string> read_;
};

struct LinearArgs {
  explicit LinearArgs(FieldReader&) {}
};
struct ConvArgs {  // spatial dims (1 or 2), stride / padding / dilation per dim, groups; pad: F.pad order, or empty
  int64_t dim, groups;
  std::vector<int64_t> stride, padding, dilation, pad;
  explicit ConvArgs(FieldReader& f);
  std::vector<int64_t> zeros() const { return std::vector<int64_t>(dim, 0); }
  at::Tensor padded(const at::Tensor& x) const { return pad.empty() ? x : at::constant_pad_nd(x, pad, 0); }
};
struct ActivationArgs {  // (leaky) ReLU: slope below 0
  double slope;
  explicit ActivationArgs(FieldReader& f) : slope(f.real("slope")) {}
};
struct MaxPoolArgs {  // 1-d pools run as 2-d with height 1; kernel, stride, padding, dilation as (height, width)
  bool one_d, ceil_mode;
  std::vector<int64_t> kernel, stride, padding, dilation;
  explicit MaxPoolArgs(FieldReader& f);
};
struct AvgPoolArgs {
  bool one_d, ceil_mode, count_include_pad;
  std::vector<int64_t> kernel, stride, padding;
  c10::optional<int64_t> divisor;
  explicit AvgPoolArgs(FieldReader& f);
};
struct FlattenArgs {
  int64_t start_dim, end_dim;
  explicit FlattenArgs(FieldReader& f) : start_dim(f.integer("start_dim")), end_dim(f.integer("end_dim")) {}
};
struct DropoutArgs {  // p in [0, 1]; the mask is drawn in the forward pass
  double p;
  explicit DropoutArgs(FieldReader& f);
};
struct IdentityArgs {
  explicit IdentityArgs(FieldReader&) {}
};

// The node kinds the native chain driver runs: enum value, the name Python uses, the struct of its fields. The
// one place where a kind name meets its enum value and its fields; exported as `_C.chain_kinds()` and checked
// against dbprop/nodes.py on import.
#define DBPROP_CHAIN_KINDS(X)                 \
  X(Linear, "linear", LinearArgs)             \
  X(Conv, "conv", ConvArgs)                   \
  X(Activation, "activation", ActivationArgs) \
  X(MaxPool, "maxpool", MaxPoolArgs)          \
  X(AvgPool, "avgpool", AvgPoolArgs)          \
  X(Flatten, "flatten", FlattenArgs)          \
  X(Dropout, "dropout", DropoutArgs)          \
  X(Identity, "identity", IdentityArgs)

#define DBPROP_ENUM_ENTRY(name, str, Args) name,
enum class OpKind : int64_t { DBPROP_CHAIN_KINDS(DBPROP_ENUM_ENTRY) };
#undef DBPROP_ENUM_ENTRY
#define DBPROP_ARGS_ENTRY(name, str, Args) Args,
using OpArgs = std::variant<DBPROP_CHAIN_KINDS(DBPROP_ARGS_ENTRY) std::monostate>;  // (monostate: never held)
#undef DBPROP_ARGS_ENTRY

// The names of the chain kinds, in table order.
std::vector<std::string> chain_kinds();

struct Op {
  OpKind kind;
  OpArgs args;
  int64_t affine = -1;  // index into weights / biases
  template <typename Args>
  const Args& get() const { return std::get<Args>(args); }
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

// The four passes over a chain program (docs/maths.md §2.2), each one native call over all ops.
// Mirrors dbprop/passes.py and dbprop/nodes.py (the readable reference) node for node on chains.
#include "program.h"

#include "ops.h"

#include <c10/util/Exception.h>

#include <algorithm>
#include <numeric>

namespace dbprop {
namespace {

int64_t prod(at::IntArrayRef v, size_t from) {
  int64_t p = 1;
  for (size_t i = from; i < v.size(); ++i) p *= v[i];
  return p;
}

at::Tensor conv(const Op& op, const at::Tensor& w, const at::Tensor& x) {
  const auto& a = op.get<ConvArgs>();
  return at::convolution(a.padded(x), w, {}, a.stride, a.padding, a.dilation, false, a.zeros(), a.groups);
}

at::Tensor conv_transpose(const Op& op, const at::Tensor& w, const at::Tensor& c, std::vector<int64_t> in_shape) {
  const auto& a = op.get<ConvArgs>();
  in_shape[0] = c.size(0);
  if (!a.pad.empty())
    for (int64_t i = 0; i < a.dim; ++i) in_shape[2 + i] += a.pad[2 * (a.dim - 1 - i)] + a.pad[2 * (a.dim - 1 - i) + 1];
  at::Tensor shape_only = at::empty({1}, c.options()).expand(in_shape);
  at::Tensor g = std::get<0>(at::convolution_backward(c, shape_only, w, c10::nullopt, a.stride, a.padding, a.dilation,
                                                      false, a.zeros(), a.groups, {true, false, false}));
  if (!a.pad.empty())
    for (int64_t i = 0; i < a.dim; ++i) {
      const int64_t lo = a.pad[2 * (a.dim - 1 - i)];
      g = g.narrow(2 + i, lo, g.size(2 + i) - lo - a.pad[2 * (a.dim - 1 - i) + 1]);
    }
  return g;
}

// ∇b = Σ c over all but the channel (or feature) dimension.
at::Tensor bias_gradient(const Op& op, const at::Tensor& c) {
  if (op.kind == OpKind::Linear) return c.reshape({-1, c.size(-1)}).sum(0);
  std::vector<int64_t> dims{0};
  for (int64_t d = 2; d < c.dim(); ++d) dims.push_back(d);
  return c.sum(dims);
}

// K□(x, c) for the weight (and Σ c for the bias when asked).
std::tuple<at::Tensor, at::Tensor> weight_adjoint(const Op& op, const at::Tensor& w, const at::Tensor& x,
                                                  const at::Tensor& c, bool need_bias) {
  if (op.kind == OpKind::Linear) {
    at::Tensor dw = c.reshape({-1, c.size(-1)}).t().mm(x.reshape({-1, x.size(-1)}));
    return {dw, need_bias ? bias_gradient(op, c) : at::Tensor()};
  }
  const auto& a = op.get<ConvArgs>();
  c10::optional<at::IntArrayRef> bias_sizes;
  std::vector<int64_t> bs{w.size(0)};
  if (need_bias) bias_sizes = bs;
  auto r = at::convolution_backward(c, a.padded(x), w, bias_sizes, a.stride, a.padding, a.dilation, false, a.zeros(),
                                    a.groups, {false, true, need_bias});
  return {std::get<1>(r), need_bias ? std::get<2>(r) : at::Tensor()};
}

// channels / inner of an affine op's output (bias broadcast layout).
std::pair<int64_t, int64_t> channel_layout(const Op& op, const at::Tensor& z) {
  if (op.kind == OpKind::Linear) return {z.size(-1), 1};
  return {z.size(1), prod(z.sizes(), 2)};
}

// ---- pools as 2-d (1-d pools get a height of 1)
at::Tensor as2d(bool one_d, const at::Tensor& t) { return one_d ? t.unsqueeze(2) : t; }
at::Tensor from2d(bool one_d, const at::Tensor& t) { return one_d ? t.squeeze(2) : t; }

at::Tensor avg_pool(const Op& op, const at::Tensor& q) {
  const auto& a = op.get<AvgPoolArgs>();
  return from2d(a.one_d, at::avg_pool2d(as2d(a.one_d, q), a.kernel, a.stride, a.padding, a.ceil_mode,
                                        a.count_include_pad, a.divisor));
}

at::Tensor avg_pool_transpose(const Op& op, const at::Tensor& c, std::vector<int64_t> in_shape) {
  const auto& a = op.get<AvgPoolArgs>();
  in_shape[0] = c.size(0);
  at::Tensor shape_only = as2d(a.one_d, at::empty({1}, c.options()).expand(in_shape));
  return from2d(a.one_d, at::avg_pool2d_backward(as2d(a.one_d, c), shape_only, a.kernel, a.stride, a.padding,
                                                 a.ceil_mode, a.count_include_pad, a.divisor));
}

// rows of c (k·B) viewed as (k, B, ...) against per-sample state t (B, ...).
at::Tensor per_sample(const at::Tensor& c, const at::Tensor& t) {
  std::vector<int64_t> shape{-1};
  shape.insert(shape.end(), t.sizes().begin(), t.sizes().end());
  return c.reshape(shape);
}

// Routing gather (R q) / scatter-add (Rᵀ c) through flattened max-pool indices idx (B, C, out).
at::Tensor maxpool_gather(const at::Tensor& q, const at::Tensor& idx, const std::vector<int64_t>& out_shape) {
  at::Tensor qs = per_sample(q.flatten(2), idx.new_empty({idx.size(0), idx.size(1), q.flatten(2).size(2)}));
  at::Tensor out = qs.gather(3, idx.unsqueeze(0).expand({qs.size(0), -1, -1, -1}));
  std::vector<int64_t> shape{q.size(0)};
  shape.insert(shape.end(), out_shape.begin() + 1, out_shape.end());
  return out.reshape(shape);
}

at::Tensor maxpool_scatter(const at::Tensor& c, const at::Tensor& idx, const std::vector<int64_t>& in_shape) {
  at::Tensor cs = per_sample(c.flatten(2), idx);
  at::Tensor out = at::zeros({cs.size(0), cs.size(1), cs.size(2), prod(in_shape, 2)}, c.options());
  out.scatter_add_(3, idx.unsqueeze(0).expand({cs.size(0), -1, -1, -1}), cs);
  std::vector<int64_t> shape{c.size(0)};
  shape.insert(shape.end(), in_shape.begin() + 1, in_shape.end());
  return out.reshape(shape);
}

at::Tensor dropout_multiply(const at::Tensor& c, const at::Tensor& mask) {
  return (per_sample(c, mask) * mask).reshape(c.sizes());
}

double slope_of(const Op& op) { return op.get<ActivationArgs>().slope; }

// The linear part of op i applied to a tangent (K q, R q, a ⊙ q).
at::Tensor apply_linear(const Program& p, const ForwardState& s, size_t i, const at::Tensor& q) {
  const Op& op = p.ops[i];
  switch (op.kind) {
    case OpKind::Linear: return at::linear(q, p.weights[op.affine]);
    case OpKind::Conv: return conv(op, p.weights[op.affine], q);
    case OpKind::Activation: return mask_multiply(q.contiguous(), s.bits[i], s.mask_numel[i], slope_of(op));
    case OpKind::MaxPool: return maxpool_gather(q, s.aux[i], s.out_shapes[i]);
    case OpKind::AvgPool: return avg_pool(op, q);
    case OpKind::Flatten: return q.flatten(op.get<FlattenArgs>().start_dim, op.get<FlattenArgs>().end_dim);
    case OpKind::Dropout: return dropout_multiply(q, s.aux[i]);
    case OpKind::Identity: return q;
  }
  TORCH_CHECK(false, "unknown op kind");
}

// The transpose of op i applied to a cotangent (Kᵀ c, Rᵀ c, a ⊙ c).
at::Tensor apply_transpose(const Program& p, const ForwardState& s, size_t i, const at::Tensor& c) {
  const Op& op = p.ops[i];
  switch (op.kind) {
    case OpKind::Linear: return c.matmul(p.weights[op.affine]);
    case OpKind::Conv: return conv_transpose(op, p.weights[op.affine], c, s.in_shapes[i]);
    case OpKind::Activation: return mask_multiply(c.contiguous(), s.bits[i], s.mask_numel[i], slope_of(op));
    case OpKind::MaxPool: return maxpool_scatter(c, s.aux[i], s.in_shapes[i]);
    case OpKind::AvgPool: return avg_pool_transpose(op, c, s.in_shapes[i]);
    case OpKind::Flatten: {
      std::vector<int64_t> shape{c.size(0)};
      shape.insert(shape.end(), s.in_shapes[i].begin() + 1, s.in_shapes[i].end());
      return c.reshape(shape);
    }
    case OpKind::Dropout: return dropout_multiply(c, s.aux[i]);
    case OpKind::Identity: return c;
  }
  TORCH_CHECK(false, "unknown op kind");
}

}  // namespace

// ---- descriptors: named fields read into each kind's struct (program.h)
const std::vector<double>& FieldReader::get(const std::string& name) {
  auto it = fields_.find(name);
  TORCH_CHECK(it != fields_.end(), "op ", index_, " (", kind_, "): descriptor lacks the field '", name, "'");
  read_.push_back(name);
  return it->second;
}

std::vector<int64_t> FieldReader::ints(const std::string& name, int64_t length) {
  const auto& v = get(name);
  TORCH_CHECK(length < 0 || static_cast<int64_t>(v.size()) == length, "op ", index_, " (", kind_, "): field '", name,
              "' needs ", length, " values, got ", v.size());
  std::vector<int64_t> out;
  for (double d : v) {
    TORCH_CHECK(d == static_cast<double>(static_cast<int64_t>(d)), "op ", index_, " (", kind_, "): field '", name,
                "' must hold integers, got ", d);
    out.push_back(static_cast<int64_t>(d));
  }
  return out;
}

bool FieldReader::flag(const std::string& name) {
  const int64_t v = integer(name);
  TORCH_CHECK(v == 0 || v == 1, "op ", index_, " (", kind_, "): field '", name, "' must be 0 or 1, got ", v);
  return v == 1;
}

double FieldReader::real(const std::string& name) {
  const auto& v = get(name);
  TORCH_CHECK(v.size() == 1, "op ", index_, " (", kind_, "): field '", name, "' needs 1 value, got ", v.size());
  return v[0];
}

void FieldReader::done() const {
  for (const auto& [name, value] : fields_)
    TORCH_CHECK(std::find(read_.begin(), read_.end(), name) != read_.end(), "op ", index_, " (", kind_,
                "): unknown descriptor field '", name, "'");
}

namespace {
void check_positive(const std::vector<int64_t>& v, const char* what) {
  for (int64_t e : v) TORCH_CHECK(e >= 1, what, " values must be >= 1, got ", e);
}
void check_nonnegative(const std::vector<int64_t>& v, const char* what) {
  for (int64_t e : v) TORCH_CHECK(e >= 0, what, " values must be >= 0, got ", e);
}
}  // namespace

ConvArgs::ConvArgs(FieldReader& f) : stride(f.ints("stride")) {
  dim = static_cast<int64_t>(stride.size());
  TORCH_CHECK(dim == 1 || dim == 2, "conv: 1 or 2 spatial dims, got ", dim);
  padding = f.ints("padding", dim);
  dilation = f.ints("dilation", dim);
  groups = f.integer("groups");
  pad = f.ints("pad");
  TORCH_CHECK(pad.empty() || static_cast<int64_t>(pad.size()) == 2 * dim, "conv: 'pad' needs 0 or ", 2 * dim,
              " values, got ", pad.size());
  check_positive(stride, "conv stride");
  check_positive(dilation, "conv dilation");
  check_nonnegative(padding, "conv padding");
  check_nonnegative(pad, "conv pad");
  TORCH_CHECK(groups >= 1, "conv: groups must be >= 1, got ", groups);
}

MaxPoolArgs::MaxPoolArgs(FieldReader& f)
    : one_d(f.flag("one_d")), ceil_mode(f.flag("ceil_mode")), kernel(f.ints("kernel", 2)), stride(f.ints("stride", 2)),
      padding(f.ints("padding", 2)), dilation(f.ints("dilation", 2)) {
  check_positive(kernel, "maxpool kernel");
  check_positive(stride, "maxpool stride");
  check_positive(dilation, "maxpool dilation");
  check_nonnegative(padding, "maxpool padding");
}

AvgPoolArgs::AvgPoolArgs(FieldReader& f)
    : one_d(f.flag("one_d")), ceil_mode(f.flag("ceil_mode")), count_include_pad(f.flag("count_include_pad")),
      kernel(f.ints("kernel", 2)), stride(f.ints("stride", 2)), padding(f.ints("padding", 2)) {
  const auto d = f.ints("divisor");
  TORCH_CHECK(d.size() <= 1, "avgpool: 'divisor' needs 0 or 1 values, got ", d.size());
  if (!d.empty()) {
    TORCH_CHECK(d[0] != 0, "avgpool: divisor must be non-zero");
    divisor = d[0];
  }
  check_positive(kernel, "avgpool kernel");
  check_positive(stride, "avgpool stride");
  check_nonnegative(padding, "avgpool padding");
}

DropoutArgs::DropoutArgs(FieldReader& f) : p(f.real("p")) {
  TORCH_CHECK(p >= 0.0 && p <= 1.0, "dropout: p must be in [0, 1], got ", p);
}

std::vector<std::string> chain_kinds() {
#define DBPROP_NAME(e, str, Args) str,
  return {DBPROP_CHAIN_KINDS(DBPROP_NAME)};
#undef DBPROP_NAME
}

namespace {
Op make_op(const std::string& kind, const Fields& fields, size_t index) {
  FieldReader f(fields, index, kind);
#define DBPROP_MATCH(e, str, Args)              \
  if (kind == str) {                            \
    Op op{OpKind::e, OpArgs(std::in_place_type<Args>, f)}; \
    f.done();                                   \
    return op;                                  \
  }
  DBPROP_CHAIN_KINDS(DBPROP_MATCH)
#undef DBPROP_MATCH
#define DBPROP_LIST(e, str, Args) " " str
  TORCH_CHECK(false, "op ", index, ": unknown op kind '", kind,
              "'; the native chain driver knows:" DBPROP_CHAIN_KINDS(DBPROP_LIST));
#undef DBPROP_LIST
}
}  // namespace

Program::Program(const std::vector<OpDescriptor>& descriptors, std::vector<at::Tensor> w,
                 const std::vector<c10::optional<at::Tensor>>& b)
    : weights(std::move(w)) {
  TORCH_CHECK(weights.size() == b.size(), "got ", weights.size(), " weights but ", b.size(), " biases");
  int64_t affine = 0;
  for (size_t i = 0; i < descriptors.size(); ++i) {
    const auto& [kind, fields] = descriptors[i];
    Op op = make_op(kind, fields, i);
    if (op.kind == OpKind::Linear || op.kind == OpKind::Conv) {
      TORCH_CHECK(affine < static_cast<int64_t>(weights.size()), "op ", i, ": more affine ops than weights");
      op.affine = affine++;
      if (first_affine < 0) first_affine = static_cast<int64_t>(i);
      last_affine = static_cast<int64_t>(i);
    }
    ops.push_back(std::move(op));
  }
  TORCH_CHECK(affine == static_cast<int64_t>(weights.size()), "got ", weights.size(), " weights for ", affine,
              " affine ops");
  TORCH_CHECK(first_affine >= 0, "the program has no affine op");
  biases = undefined_if_absent(b);
  for (size_t j = 0; j < weights.size(); ++j) {
    TORCH_CHECK(weights[j].device() == weights[0].device() && weights[j].scalar_type() == weights[0].scalar_type(),
                "weight ", j, " is ", weights[j].scalar_type(), " on ", weights[j].device(), ", weight 0 is ",
                weights[0].scalar_type(), " on ", weights[0].device());
    if (biases[j].defined())
      TORCH_CHECK(biases[j].device() == weights[j].device() && biases[j].scalar_type() == weights[j].scalar_type(),
                  "bias ", j, " does not match its weight's dtype and device");
  }
}

std::shared_ptr<ForwardState> forward(const Program& p, const at::Tensor& input, bool keep_inputs) {
  const at::Tensor& w0 = p.weights[0];
  TORCH_CHECK(input.scalar_type() == w0.scalar_type(), "x is ", input.scalar_type(), " but the weights are ",
              w0.scalar_type());
  TORCH_CHECK(input.device() == w0.device(), "x is on ", input.device(), " but the weights are on ", w0.device());
  TORCH_CHECK(input.dim() >= 2 && input.size(0) > 0, "x must be a non-empty batch, got shape ", input.sizes());
  auto s = std::make_shared<ForwardState>();
  const size_t n = p.ops.size();
  s->inputs.resize(n);
  s->in_shapes.resize(n);
  s->out_shapes.resize(n);
  s->bits.resize(n);
  s->mask_numel.assign(n, 0);
  s->aux.resize(n);
  at::Tensor x = input;
  for (size_t i = 0; i < n; ++i) {
    const Op& op = p.ops[i];
    s->in_shapes[i] = x.sizes().vec();
    at::Tensor y;
    if (p.is_affine(i)) {
      if (keep_inputs) s->inputs[i] = x;
      // z = K x + b with the bias inside the ATen call, rounded once: exactly what the module computes
      const at::Tensor& w = p.weights[op.affine];
      const at::Tensor& b = p.biases[op.affine];
      at::Tensor z;
      if (op.kind == OpKind::Linear) {
        z = at::linear(x, w, b);
      } else {
        const auto& a = op.get<ConvArgs>();
        z = at::convolution(a.padded(x), w, b, a.stride, a.padding, a.dilation, false, a.zeros(), a.groups);
      }
      if (i + 1 < n && p.ops[i + 1].kind == OpKind::Activation) {  // fused epilogue: g + bits
        s->out_shapes[i] = z.sizes().vec();
        s->in_shapes[i + 1] = z.sizes().vec();
        std::tie(y, s->bits[i + 1]) = forward_epilogue(z.contiguous(), std::nullopt, 1, 1, slope_of(p.ops[i + 1]));
        s->mask_numel[i + 1] = z.numel();
        s->numel_per_sample += z[0].numel();
        ++i;
      } else {
        y = z;
      }
    } else if (op.kind == OpKind::Activation) {
      std::tie(y, s->bits[i]) = forward_epilogue(x.contiguous(), std::nullopt, 1, 1, slope_of(op));
      s->mask_numel[i] = x.numel();
    } else if (op.kind == OpKind::MaxPool) {
      const auto& a = op.get<MaxPoolArgs>();
      auto [out, idx] = at::max_pool2d_with_indices(as2d(a.one_d, x), a.kernel, a.stride, a.padding, a.dilation,
                                                    a.ceil_mode);
      y = from2d(a.one_d, out);
      s->aux[i] = idx.flatten(2);
    } else if (op.kind == OpKind::Dropout) {
      const double keep = 1.0 - op.get<DropoutArgs>().p;
      at::Tensor mask = keep > 0 ? at::empty(x.sizes(), x.options()).bernoulli_(keep).div_(keep) : at::zeros_like(x);
      y = x * mask;
      s->aux[i] = mask;
    } else {
      y = apply_linear(p, *s, i, x);
    }
    s->out_shapes[i] = y.sizes().vec();
    s->numel_per_sample += y[0].numel();
    x = y;
  }
  s->output = x;
  return s;
}

std::tuple<at::Tensor, std::vector<at::Tensor>> backward(const Program& p, const ForwardState& s,
                                                         const at::Tensor& zeta_L, bool keep_zetas) {
  TORCH_CHECK(zeta_L.dim() == 2 && zeta_L.size(1) == s.output.size(1) && zeta_L.size(0) % s.output.size(0) == 0,
              "zeta_L must have shape (k·B, C) with B=", s.output.size(0), ", C=", s.output.size(1), "; got ",
              zeta_L.sizes());
  std::vector<at::Tensor> zetas(p.ops.size());
  at::Tensor c = zeta_L;
  for (size_t i = p.ops.size(); i-- > 0;) {
    if (keep_zetas && p.is_affine(i)) zetas[i] = c;
    c = apply_transpose(p, s, i, c);
  }
  return {c, zetas};
}

at::Tensor backward_backward(const Program& p, const ForwardState& s, const at::Tensor& q0,
                             std::vector<at::Tensor>& zetas, std::vector<at::Tensor>& theta_hat,
                             const std::vector<bool>& want_weight, bool need_h) {
  TORCH_CHECK(want_weight.size() == p.weights.size() && theta_hat.size() == p.weights.size(),
              "theta_hat and want_weight need one entry per affine op (", p.weights.size(), ")");
  at::Tensor q = q0;
  for (size_t i = 0; i < p.ops.size(); ++i) {
    if (p.is_affine(i)) {
      const int64_t j = p.ops[i].affine;
      if (want_weight[j]) {  // θ̂¹_j += K□_j(q_{j-1}, ζ_j); ζ_j freed right after
        TORCH_CHECK(i < zetas.size() && zetas[i].defined(), "op ", i, ": zeta was not kept by the backward pass");
        at::Tensor dw = std::get<0>(weight_adjoint(p.ops[i], p.weights[j], q, zetas[i], false));
        theta_hat[j] = theta_hat[j].defined() ? theta_hat[j].add_(dw) : dw;
      }
      if (i < zetas.size()) zetas[i] = at::Tensor();
      if (static_cast<int64_t>(i) == p.last_affine && !need_h) return at::Tensor();
    }
    q = apply_linear(p, s, i, q);
  }
  return q;
}

at::Tensor forward_backward(const Program& p, const ForwardState& s, const at::Tensor& eta_L,
                            std::vector<at::Tensor>& grad_w, std::vector<at::Tensor>& grad_b,
                            const std::vector<bool>& want_weight, const std::vector<bool>& want_bias,
                            bool need_input_grad) {
  const size_t L = p.weights.size();
  TORCH_CHECK(grad_w.size() == L && grad_b.size() == L && want_weight.size() == L && want_bias.size() == L,
              "gradient lists need one entry per affine op (", L, ")");
  at::Tensor eta = eta_L;
  at::Tensor pending_db;  // ∇b_j fused into the mask multiply of activation j
  for (size_t i = p.ops.size(); i-- > 0;) {
    const Op& op = p.ops[i];
    if (op.kind == OpKind::Activation && i > 0 && p.is_affine(i - 1) && want_bias[p.ops[i - 1].affine] &&
        p.biases[p.ops[i - 1].affine].defined()) {
      // η_j = a_j ⊙ γ_j and ∇b_j = Σ η_j in one pass
      auto [channels, inner] = channel_layout(p.ops[i - 1], eta);
      std::tie(eta, pending_db) =
          mask_multiply_bias_grad(eta.contiguous(), s.bits[i], s.mask_numel[i], slope_of(op), channels, inner);
      continue;
    }
    if (p.is_affine(i)) {
      const int64_t j = op.affine;
      const bool need_b = want_bias[j] && p.biases[j].defined();
      if (want_weight[j]) {
        TORCH_CHECK(s.inputs[i].defined(), "op ", i, ": the forward pass did not keep its input");
        auto [dw, db] = weight_adjoint(op, p.weights[j], s.inputs[i], eta, need_b && !pending_db.defined());
        grad_w[j] = grad_w[j].defined() ? grad_w[j].add_(dw) : dw;
        if (db.defined()) pending_db = db;
      }
      if (need_b) {
        at::Tensor db = pending_db.defined() ? pending_db : bias_gradient(op, eta);
        grad_b[j] = grad_b[j].defined() ? grad_b[j].add_(db) : db;
      }
      pending_db = at::Tensor();
    }
    if (static_cast<int64_t>(i) <= p.first_affine && !need_input_grad) return at::Tensor();
    eta = apply_transpose(p, s, i, eta);
  }
  return eta;
}

}  // namespace dbprop

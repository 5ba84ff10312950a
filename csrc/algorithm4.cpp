// Algorithm 4 (docs/maths.md §6) as one native call: exact Jacobian penalty (directions e_i) or its random
// projection estimate (given directions), logits or softmax output, classes in chunks (sizes `chunks`).
#include "algorithm4.h"

#include "ops.h"
#include "kernels/elementwise.h"

#include <ATen/OpMathType.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <c10/util/Exception.h>

#include <chrono>

namespace dbprop {
namespace {

// Wall seconds since `t0` once the device has finished the work queued so far (chunk-size tuning).
double elapsed(std::chrono::steady_clock::time_point t0, const at::Device& device) {
  if (!device.is_cpu()) c10::impl::getDeviceGuardImpl(device.type())->synchronizeDevice(device.index());
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

}  // namespace

JacobianResult jacobian_penalty(const Program& p, const ForwardState& s, const at::Tensor& x, bool softmax,
                                const std::vector<int64_t>& chunks, int64_t cap, bool time_chunks,
                                const at::Tensor& directions, double scale, const at::Tensor& sample_weight,
                                const std::vector<bool>& want_weight, const std::vector<bool>& want_bias,
                                bool need_input_grad) {
  TORCH_CHECK(!chunks.empty(), "jacobian_penalty: the chunk schedule is empty");
  for (int64_t c : chunks) TORCH_CHECK(c >= 1, "chunk sizes must be >= 1, got ", c);
  const size_t L = p.weights.size();
  TORCH_CHECK(want_weight.size() == L && want_bias.size() == L, "want_weight/want_bias need ", L, " entries");
  bool want_params = false;
  for (size_t j = 0; j < L; ++j) want_params = want_params || want_weight[j] || want_bias[j];
  const bool need_any = want_params || need_input_grad;
  const bool fbp = need_any && softmax;  // η ≡ 0 for logits: no forward-backward pass at all

  TORCH_CHECK(cap >= 1, "jacobian_penalty: the chunk cap must be >= 1, got ", cap);
  TORCH_CHECK(!(fbp && want_params) || s.inputs[p.first_affine].defined(),
              "jacobian_penalty: the forward state must keep the inputs of the affine ops (softmax output with "
              "parameter gradients)");
  const at::Tensor& o = s.output;
  TORCH_CHECK(x.size(0) == o.size(0), "jacobian_penalty: x has ", x.size(0), " samples, the forward state ",
              o.size(0));
  TORCH_CHECK(o.dim() == 2, "the model output must have shape (batch, classes), got ", o.sizes());
  const int64_t B = o.size(0), C = o.size(1);
  const auto acc = at::toOpMathType(o.scalar_type());
  TORCH_CHECK(sample_weight.dim() == 1 && sample_weight.size(0) == B && sample_weight.device() == o.device(),
              "sample_weight must have shape (", B, ",) on ", o.device(), ", got ", sample_weight.sizes(), " on ",
              sample_weight.device());
  if (directions.defined())
    TORCH_CHECK(directions.dim() == 3 && directions.size(1) == B && directions.size(2) == C &&
                    directions.scalar_type() == o.scalar_type() && directions.device() == o.device(),
                "directions must be (n, ", B, ", ", C, ") ", o.scalar_type(), " on ", o.device(), "; got ",
                directions.sizes(), " ", directions.scalar_type());
  const at::Tensor probs = softmax ? at::softmax(o, 1).contiguous() : at::Tensor();
  const at::Tensor eye = directions.defined() ? at::Tensor() : at::eye(C, o.options());
  const int64_t n = directions.defined() ? directions.size(0) : C;


  JacobianResult r;
  r.value = at::zeros({B}, o.options().dtype(acc));
  at::Tensor eta = fbp ? at::zeros({B, C}, o.options().dtype(acc)) : at::Tensor();
  r.grad_w.resize(L);
  r.grad_b.resize(L);
  for (int64_t start = 0, i = 0; start < n; start += r.chunk_sizes.back(), ++i) {
    const int64_t k = std::min({chunks[std::min<size_t>(i, chunks.size() - 1)], cap, n - start});
    r.chunk_sizes.push_back(k);
    const auto t0 = std::chrono::steady_clock::now();
    at::Tensor v = directions.defined() ? directions.narrow(0, start, k).contiguous()
                                        : eye.narrow(0, start, k).unsqueeze(1).expand({k, B, C}).contiguous();
    at::Tensor zeta_L = softmax ? softmax_cotangent(probs, v) : v;             // ζ_L (k, B, C)
    auto [xi, zetas] = backward(p, s, zeta_L.reshape({k * B, C}), want_params);
    at::Tensor xi3 = xi.contiguous().view({k, B, -1});                          // ξ_0 (k, B, N)
    at::Tensor q0 = std::get<0>(penalty_head(xi3, std::nullopt, "squared_norm", scale, 0.0, sample_weight,
                                             r.value, need_any, false));
    if (want_params || fbp) {  // else nothing downstream of q_0 is wanted
      at::Tensor h = backward_backward(p, s, q0.view(xi.sizes()), zetas, r.grad_w, want_weight, softmax);
      if (softmax) softmax_eta_accumulate(probs, v, h.contiguous().view({k, B, C}), eta);  // η̂_L += Σ_i η_L^(i)
    }
    if (time_chunks) r.chunk_seconds.push_back(elapsed(t0, o.device()));
  }
  if (fbp) r.grad_x = forward_backward(p, s, eta.to(o.scalar_type()), r.grad_w, r.grad_b, want_weight, want_bias,
                                       need_input_grad);
  for (size_t j = 0; j < L; ++j) {  // wanted but never reached: exactly zero (bias gradients of logits)
    if (want_weight[j] && !r.grad_w[j].defined()) r.grad_w[j] = at::zeros_like(p.weights[j]);
    if (want_bias[j] && p.biases[j].defined() && !r.grad_b[j].defined()) r.grad_b[j] = at::zeros_like(p.biases[j]);
  }
  if (need_input_grad && !r.grad_x.defined()) r.grad_x = at::zeros_like(x);
  r.value = r.value.to(o.scalar_type());
  return r;
}

}  // namespace dbprop

// Algorithm 4 (accumulated eta) for the Jacobian penalty, one native call.
#pragma once

#include "program.h"

namespace dbprop {

struct JacobianResult {
  at::Tensor value;                 // per-sample R_b (B,)
  std::vector<at::Tensor> grad_w;   // per affine op (undefined where not wanted)
  std::vector<at::Tensor> grad_b;
  at::Tensor grad_x;                // per-sample ∇x R_b · w_b (undefined unless asked)
};

// chunk = 0: as many directions per batched pass as fit chunk_budget_bytes.
JacobianResult jacobian_penalty(const Program& p, const at::Tensor& x, bool softmax, int64_t chunk,
                                int64_t chunk_budget_bytes, const at::Tensor& directions, double scale,
                                const at::Tensor& sample_weight, const std::vector<bool>& want_weight,
                                const std::vector<bool>& want_bias, bool need_input_grad);

}  // namespace dbprop

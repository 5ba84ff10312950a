// Algorithm 4 (accumulated eta) for the Jacobian penalty, one native call.
#pragma once

#include "program.h"

namespace dbprop {

struct JacobianResult {
  at::Tensor value;                 // per-sample R_b (B,)
  std::vector<at::Tensor> grad_w;   // per affine op (undefined where not wanted)
  std::vector<at::Tensor> grad_b;
  at::Tensor grad_x;                // per-sample ∇x R_b · w_b (undefined unless asked)
  std::vector<int64_t> chunk_sizes;  // directions per batched pass, in order
  std::vector<double> chunk_seconds;  // their wall seconds (device synchronised), if asked
};

// `s`: the forward pass of `x` (kept inputs: softmax and parameter gradients wanted). `chunks`: directions per
// batched pass in order, the last size repeated until all n are done (dbprop/tuning.py chooses them), none
// larger than `cap` (dbprop/engine.py chunk_cap, the one memory budget); `time_chunks`: measure each pass.
JacobianResult jacobian_penalty(const Program& p, const ForwardState& s, const at::Tensor& x, bool softmax,
                                const std::vector<int64_t>& chunks, int64_t cap, bool time_chunks,
                                const at::Tensor& directions, double scale, const at::Tensor& sample_weight,
                                const std::vector<bool>& want_weight, const std::vector<bool>& want_bias,
                                bool need_input_grad);

}  // namespace dbprop

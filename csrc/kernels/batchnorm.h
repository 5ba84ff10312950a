// Train-mode BatchNorm (batch statistics, docs/maths.md §4.9): element bodies shared by the CPU launchers
// (csrc/cpu/batchnorm.cpp, at::parallel_for) and the CUDA launchers (csrc/cuda/batchnorm.cu).
//
// Layout. Tangents / cotangents q and ξ hold k direction copies stacked along the batch: contiguous
// (k·B, C, S...) read as (k, B, C, S) with S the product of the spatial sizes (S = 1 for BatchNorm1d on (B, C)).
// x̂ = (x − μ_B)/σ_B is (B, C, S), 1/σ and γ are (C,). m(·) is the mean over the N = B·S entries of one
// (copy, channel). With
//     m_q = m(q),  w = m(x̂ q),  m_ξ = m(ξ),  cov = m(ξ q) − m_ξ m_q,  u = m(ξ x̂)
// the node's operators are
//     A q = (γ/σ) (q − m_q − x̂ w)                                  (4.3; A is self-adjoint: also Aᵀ ξ)
//     θ̂_γ += (N/σ) Σ_k (cov − u w)                                 (4.5)
//     ŝ   += (γ/σ²) Σ_k [(3 u w − cov) x̂ − w (ξ − m_ξ) − u (q − m_q)]   (4.6)
// Everything is accumulated and evaluated in `acc_t`: at::acc_type<scalar_t, is_cuda> (double on the CPU for
// float, float on CUDA for float / half / bfloat16, double for double).
#pragma once

#include "elementwise.h"  // DBPROP_HD, <cmath>, <cstdint>

namespace dbprop {
namespace kernels {

// Slots of the per-(copy, channel) record: first the sums over the N entries (the one reduction pass), then,
// after batchnorm_finish_moments, the moments themselves.
enum BatchNormSlot : int {
  kBnQ = 0,      // Σ q        -> m_q
  kBnXhatQ = 1,  // Σ x̂ q      -> w
  kBnXi = 2,     // Σ ξ        -> m_ξ
  kBnXiQ = 3,    // Σ ξ q      -> cov = m(ξ q) − m_ξ m_q
  kBnXiXhat = 4, // Σ ξ x̂      -> u
  kBnSlots = 5
};

// Flat offsets of element (copy kk, sample b, channel c, position s) in q / ξ and of (b, c, s) in x̂.
DBPROP_HD int64_t bn_copy_offset(int64_t kk, int64_t b, int64_t c, int64_t s, int64_t B, int64_t C, int64_t S) {
  return ((kk * B + b) * C + c) * S + s;
}
DBPROP_HD int64_t bn_xhat_offset(int64_t b, int64_t c, int64_t s, int64_t C, int64_t S) { return (b * C + c) * S + s; }

// Per-channel factors from (C,) vectors, a missing vector (nullptr) reading as 1: the tangent scale
// γ/σ = factor(γ, 1/σ) (or a given scale: factor(scale, nullptr)) and the source factor γ/σ² (4.6).
template <typename scalar_t, typename acc_t>
DBPROP_HD acc_t batchnorm_channel_factor(const scalar_t* a, const scalar_t* b, int64_t c) {
  return (a ? static_cast<acc_t>(a[c]) : acc_t(1)) * (b ? static_cast<acc_t>(b[c]) : acc_t(1));
}
template <typename scalar_t, typename acc_t>
DBPROP_HD acc_t batchnorm_source_factor(const scalar_t* gamma, const scalar_t* invstd, int64_t c) {
  return batchnorm_channel_factor<scalar_t, acc_t>(gamma, invstd, c) * static_cast<acc_t>(invstd[c]);
}

// Adds one entry (q and ξ at offset e, x̂ at offset eh) to the sums; ξ only if kWithXi.
template <bool kWithXi, typename scalar_t, typename acc_t>
DBPROP_HD void batchnorm_accumulate(const scalar_t* xi, const scalar_t* q, const scalar_t* xhat, int64_t e,
                                    int64_t eh, acc_t* sums) {
  const acc_t qv = static_cast<acc_t>(q[e]), xh = static_cast<acc_t>(xhat[eh]);
  sums[kBnQ] += qv;
  sums[kBnXhatQ] += xh * qv;
  if (kWithXi) {
    const acc_t x = static_cast<acc_t>(xi[e]);
    sums[kBnXi] += x;
    sums[kBnXiQ] += x * qv;
    sums[kBnXiXhat] += x * xh;
  }
}

// Sums over the N entries of one (copy, channel) -> moments (m_q, w, m_ξ, cov, u), in place.
template <bool kWithXi, typename acc_t>
DBPROP_HD void batchnorm_finish_moments(acc_t* r, int64_t n) {
  const acc_t inv_n = acc_t(1) / static_cast<acc_t>(n);
  r[kBnQ] *= inv_n;
  r[kBnXhatQ] *= inv_n;
  if (kWithXi) {
    r[kBnXi] *= inv_n;
    r[kBnXiQ] = r[kBnXiQ] * inv_n - r[kBnXi] * r[kBnQ];
    r[kBnXiXhat] *= inv_n;
  }
}

// (4.3) for one entry: A q = scale (q − m_q − x̂ w), scale = γ/σ; `mom` is the record of the entry's
// (copy, channel).
template <typename scalar_t, typename acc_t>
DBPROP_HD scalar_t batchnorm_tangent(scalar_t q, scalar_t xhat, const acc_t* mom, acc_t scale) {
  return static_cast<scalar_t>(
      scale * (static_cast<acc_t>(q) - mom[kBnQ] - static_cast<acc_t>(xhat) * mom[kBnXhatQ]));
}

// The bracket of (4.6) for one entry of one copy: (3 u w − cov) x̂ − w (ξ − m_ξ) − u (q − m_q).
template <typename scalar_t, typename acc_t>
DBPROP_HD acc_t batchnorm_source_term(scalar_t xi, scalar_t q, scalar_t xhat, const acc_t* mom) {
  const acc_t w = mom[kBnXhatQ], u = mom[kBnXiXhat];
  return (acc_t(3) * u * w - mom[kBnXiQ]) * static_cast<acc_t>(xhat) -
         w * (static_cast<acc_t>(xi) - mom[kBnXi]) - u * (static_cast<acc_t>(q) - mom[kBnQ]);
}

// (4.6) at x̂ entry (b, c, s), summed over the k copies in order (one writer per entry): the bracket times
// γ/σ² (`coef`). `moments` is the (k, C, kBnSlots) record array.
template <typename scalar_t, typename acc_t>
DBPROP_HD scalar_t batchnorm_source(const scalar_t* xi, const scalar_t* q, const scalar_t* xhat,
                                    const acc_t* moments, int64_t k, int64_t B, int64_t C, int64_t S, int64_t b,
                                    int64_t c, int64_t s, acc_t coef) {
  const scalar_t xh = xhat[bn_xhat_offset(b, c, s, C, S)];
  acc_t total = 0;
  for (int64_t kk = 0; kk < k; ++kk) {
    const int64_t e = bn_copy_offset(kk, b, c, s, B, C, S);
    total += batchnorm_source_term<scalar_t, acc_t>(xi[e], q[e], xh, moments + (kk * C + c) * kBnSlots);
  }
  return static_cast<scalar_t>(coef * total);
}

// (4.5) for channel c: (N/σ_c) Σ_k (cov − u w).
template <typename acc_t>
DBPROP_HD acc_t batchnorm_dgamma(const acc_t* moments, int64_t k, int64_t C, int64_t c, int64_t n, acc_t invstd) {
  acc_t total = 0;
  for (int64_t kk = 0; kk < k; ++kk) {
    const acc_t* mom = moments + (kk * C + c) * kBnSlots;
    total += mom[kBnXiQ] - mom[kBnXiXhat] * mom[kBnXhatQ];
  }
  return static_cast<acc_t>(n) * invstd * total;
}

}  // namespace kernels
}  // namespace dbprop

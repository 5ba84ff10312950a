// Element bodies shared by the CPU launchers (at::parallel_for) and the CUDA launchers (grid-stride
// __global__ kernels): one body, two launchers. Each body computes one output element (or one byte of
// packed mask bits) from plain pointers; `acc_t` is the accumulation type (float for half/bfloat16).
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define DBPROP_HD __host__ __device__ __forceinline__
#else
#define DBPROP_HD inline
#endif

namespace dbprop {
namespace kernels {

// Number of bytes holding the derivative bits of n elements (1 bit per element, docs/maths.md §4.7).
DBPROP_HD int64_t packed_bytes(int64_t n) { return (n + 7) / 8; }

// a = g'(z) ∈ {slope, 1} read from packed bits: bit e of the per-sample-batch mask.
DBPROP_HD bool mask_bit(const uint8_t* bits, int64_t e) { return (bits[e >> 3] >> (e & 7)) & 1; }

// Forward epilogue, element e of a (row, channel) block sharing one bias value: z_j = K x + b, x_j = g(z_j).
template <typename scalar_t, typename acc_t>
DBPROP_HD void forward_epilogue_element(const scalar_t* z, scalar_t* x, acc_t bias, acc_t slope, int64_t e) {
  const acc_t v = static_cast<acc_t>(z[e]) + bias;
  x[e] = static_cast<scalar_t>(v > acc_t(0) ? v : v * slope);
}

// Bits of [x > 0] for the 8 elements of byte `byte`: a_j = [z_j > 0] read from x_j = g(z_j) when the slope
// is >= 0 (then x_j > 0 exactly where z_j > 0), or from a 0/1 byte tensor [z_j > 0] otherwise.
template <typename scalar_t>
DBPROP_HD void pack_positive_byte(const scalar_t* x, uint8_t* bits, int64_t n, int64_t byte) {
  const int64_t first = byte * 8;
  const int count = static_cast<int>(n - first < 8 ? n - first : 8);
  uint8_t packed = 0;
  for (int t = 0; t < count; ++t) packed |= static_cast<uint8_t>(static_cast<float>(x[first + t]) > 0.0f) << t;
  bits[byte] = packed;
}

// ζ = a ⊙ ξ (backward), q = a ⊙ h (backward-backward), η = a ⊙ γ (forward-backward) for element e of a
// tensor whose rows are k stacked copies of the batch: the mask index is e mod mask_numel.
template <typename scalar_t, typename acc_t>
DBPROP_HD scalar_t mask_multiply(const scalar_t* c, const uint8_t* bits, int64_t mask_numel, acc_t slope,
                                 int64_t e) {
  const acc_t v = static_cast<acc_t>(c[e]);
  return static_cast<scalar_t>(mask_bit(bits, e % mask_numel) ? v : v * slope);
}

// The same for the 8 elements of mask byte `byte` in stacked copy `copy` (no division per element).
template <typename scalar_t, typename acc_t>
DBPROP_HD void mask_multiply_byte(const scalar_t* c, const uint8_t* bits, scalar_t* out, int64_t mask_numel,
                                  acc_t slope, int64_t copy, int64_t byte) {
  const uint8_t packed = bits[byte];
  const int64_t first = byte * 8, base = copy * mask_numel + first;
  const acc_t off = acc_t(1) - slope;
  if (mask_numel - first >= 8) {  // full byte: fixed trip count, branch-free (vectorises)
    for (int t = 0; t < 8; ++t)
      out[base + t] = static_cast<scalar_t>(static_cast<acc_t>(c[base + t]) *
                                            (slope + off * static_cast<acc_t>((packed >> t) & 1)));
    return;
  }
  for (int t = 0; t < mask_numel - first; ++t)
    out[base + t] = static_cast<scalar_t>(static_cast<acc_t>(c[base + t]) *
                                          (slope + off * static_cast<acc_t>((packed >> t) & 1)));
}

// a ⊙ c over a contiguous run of `len` elements starting at element e0 whose mask index is m0 (the run
// stays inside one stacked copy); returns Σ a ⊙ c over the run (the bias-gradient contribution).
template <typename scalar_t, typename acc_t>
DBPROP_HD acc_t mask_multiply_run(const scalar_t* c, const uint8_t* bits, scalar_t* out, acc_t slope, int64_t e0,
                                  int64_t m0, int64_t len) {
  acc_t total = 0;
  const acc_t off = acc_t(1) - slope;
  for (int64_t s = 0; s < len; ++s) {
    const int64_t m = m0 + s;
    const acc_t v = static_cast<acc_t>(c[e0 + s]) * (slope + off * static_cast<acc_t>((bits[m >> 3] >> (m & 7)) & 1));
    out[e0 + s] = static_cast<scalar_t>(v);
    total += v;
  }
  return total;
}

// Softmax output terms for one sample and one direction (docs/maths.md §4.11), x = softmax(z_L), C classes:
//   ζ_L = S v = x ⊙ v − ⟨x, v⟩ x                                    (zeta, length C)
// and, given the tangent h = h_L of that direction, (3.15) added into eta (length C):
//   η_L += x⊙v⊙h − ⟨x,v⟩ x⊙h − ⟨x,h⟩ x⊙v − ⟨x,v⊙h⟩ x + 2⟨x,v⟩⟨x,h⟩ x
template <typename scalar_t, typename acc_t>
DBPROP_HD void softmax_cotangent(const scalar_t* x, const scalar_t* v, scalar_t* zeta, int64_t C) {
  acc_t xv = 0;
  for (int64_t i = 0; i < C; ++i) xv += static_cast<acc_t>(x[i]) * static_cast<acc_t>(v[i]);
  for (int64_t i = 0; i < C; ++i)
    zeta[i] = static_cast<scalar_t>(static_cast<acc_t>(x[i]) * (static_cast<acc_t>(v[i]) - xv));
}

template <typename scalar_t, typename acc_t>
DBPROP_HD void softmax_eta_accumulate(const scalar_t* x, const scalar_t* v, const scalar_t* h, acc_t* eta,
                                      int64_t C) {
  acc_t xv = 0, xh = 0, xvh = 0;
  for (int64_t i = 0; i < C; ++i) {
    const acc_t xi = x[i], vi = v[i], hi = h[i];
    xv += xi * vi;
    xh += xi * hi;
    xvh += xi * vi * hi;
  }
  for (int64_t i = 0; i < C; ++i) {
    const acc_t xi = x[i], vi = v[i], hi = h[i];
    eta[i] += xi * vi * hi - xv * xi * hi - xh * xi * vi - xvh * xi + acc_t(2) * xv * xh * xi;
  }
}

// Penalty heads (docs/maths.md §5) for one row: one direction of one sample, n input features, sample weight w.
// Returns p(ξ_0); writes q_0 = w ∇p(ξ_0) (if q0) and adds w ∂p/∂x (if gx; the direct x-dependence of p).
//   kSquaredNorm  p = s‖ξ‖²                         q_0 = 2sξ                            (params: s)
//   kSpectral     p = ‖ξ‖                           q_0 = ξ/‖ξ‖                          (v held constant)
//   kGradientNorm p = (‖ξ‖ − c)²                    q_0 = 2(‖ξ‖ − c) ξ/‖ξ‖               (params: c)
//   kAlignment    p = ‖x‖²‖ξ‖² − ⟨x,ξ⟩²             q_0 = 2‖x‖²ξ − 2⟨x,ξ⟩x,  ∂p/∂x = 2‖ξ‖²x − 2⟨x,ξ⟩ξ
//   kRelevance    p = λ1‖r‖₁ + λ2‖r‖², r = x⊙ξ      q_0 = x⊙(λ1 sign r + 2λ2 r), ∂p/∂x = ξ⊙(λ1 sign r + 2λ2 r)
// The one table of heads: enum value, the name Python uses (dbprop/penalties.py `native_head`), and whether p
// reads x (then x is a required argument and ∂p/∂x is non-zero; Python's `Penalty.reads_x` must agree, checked
// on import through `_C.penalty_heads()`).
#define DBPROP_PENALTY_HEADS(X)                 \
  X(kSquaredNorm, "squared_norm", false)       \
  X(kSpectral, "spectral", false)              \
  X(kGradientNorm, "gradient_norm", false)     \
  X(kAlignment, "alignment", true)             \
  X(kRelevance, "relevance", true)
#define DBPROP_HEAD_ENUM(id, name, reads_x) id,
enum HeadKind : int { DBPROP_PENALTY_HEADS(DBPROP_HEAD_ENUM) };
#undef DBPROP_HEAD_ENUM

inline bool head_reads_x(int64_t kind) {
  switch (kind) {
#define DBPROP_HEAD_READS_X(id, name, reads_x) \
  case id:                                     \
    return reads_x;
    DBPROP_PENALTY_HEADS(DBPROP_HEAD_READS_X)
#undef DBPROP_HEAD_READS_X
    default:
      return false;
  }
}

template <typename acc_t>
DBPROP_HD acc_t sign_of(acc_t v) { return v > acc_t(0) ? acc_t(1) : (v < acc_t(0) ? acc_t(-1) : acc_t(0)); }

template <typename scalar_t, typename acc_t>
DBPROP_HD acc_t penalty_head_row(int kind, acc_t p1, acc_t p2, const scalar_t* xi, const scalar_t* x, scalar_t* q0,
                                 acc_t* gx, int64_t n, acc_t w) {
  acc_t xixi = 0, xxi = 0, xx = 0, r1 = 0, r2 = 0;  // ‖ξ‖², ⟨x,ξ⟩, ‖x‖², ‖r‖₁, ‖r‖²
  for (int64_t e = 0; e < n; ++e) {
    const acc_t a = static_cast<acc_t>(xi[e]);
    const acc_t b = x ? static_cast<acc_t>(x[e]) : acc_t(0);
    const acc_t r = a * b;
    xixi += a * a;
    xxi += r;
    xx += b * b;
    r1 += r < acc_t(0) ? -r : r;
    r2 += r * r;
  }
  const acc_t norm = sqrt(xixi);
  const acc_t inv = norm > acc_t(0) ? acc_t(1) / norm : acc_t(0);  // subgradient 0 at ξ = 0
  acc_t p = 0, a_xi = 0, a_x = 0;  // q_0 = w (a_xi ξ + a_x x) for the non-relevance heads
  acc_t g_x = 0, g_xi = 0;         // ∂p/∂x = w (g_x x + g_xi ξ)
  switch (kind) {
    case kSquaredNorm: p = p1 * xixi; a_xi = acc_t(2) * p1; break;
    case kSpectral: p = norm; a_xi = inv; break;
    case kGradientNorm: p = (norm - p1) * (norm - p1); a_xi = acc_t(2) * (norm - p1) * inv; break;
    case kAlignment:
      p = xx * xixi - xxi * xxi;
      a_xi = acc_t(2) * xx;
      a_x = acc_t(-2) * xxi;
      g_x = acc_t(2) * xixi;
      g_xi = acc_t(-2) * xxi;
      break;
    default: p = p1 * r1 + p2 * r2; break;  // kRelevance
  }
  for (int64_t e = 0; e < n; ++e) {
    const acc_t a = static_cast<acc_t>(xi[e]);
    const acc_t b = x ? static_cast<acc_t>(x[e]) : acc_t(0);
    if (kind == kRelevance) {
      const acc_t r = a * b, f = p1 * sign_of(r) + acc_t(2) * p2 * r;
      if (q0) q0[e] = static_cast<scalar_t>(w * b * f);
      if (gx) gx[e] += w * a * f;
    } else {
      if (q0) q0[e] = static_cast<scalar_t>(w * (a_xi * a + a_x * b));
      if (gx) gx[e] += w * (g_x * b + g_xi * a);
    }
  }
  return p;
}

}  // namespace kernels
}  // namespace dbprop

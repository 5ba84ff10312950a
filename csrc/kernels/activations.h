// Smooth coordinate-wise activations x = g(z): element bodies of the first and second derivatives g'(z) and
// g''(z), shared by the CPU launchers (at::parallel_for) and the CUDA launchers (grid-stride __global__
// kernels). Everything is computed in `acc_t` (float for half / bfloat16 / float, double for double) from two
// parameters p1, p2 (passed to the host functions as double and converted to acc_t once per launch).
//
// DBPROP_SMOOTH_ACTIVATIONS below is the one table of the kinds: enum id, the name Python passes, and the
// struct holding the bodies d1 = g' and d2 = g''. Each matches the PyTorch function named in its comment,
// including the conventions of PyTorch's backward formulas at kinks and thresholds. The formulas avoid
// overflow and cancellation: logistic terms from exp(-|z|), tanh'(u) = sech²(u) = 4e/(1+e)² from e = exp(-2|u|)
// (never 1 - tanh², which loses all digits for large |u|), Φ(z) from erfc.
#pragma once

#include "elementwise.h"  // DBPROP_HD, <cmath>, <cstdint>

namespace dbprop {
namespace kernels {

// float and double overloads: the CUDA math library in device code, <cmath> on the host.
namespace amath {
#if defined(__CUDA_ARCH__)
#define DBPROP_AMATH_FN(fn)                        \
  DBPROP_HD float fn(float x) { return ::fn##f(x); } \
  DBPROP_HD double fn(double x) { return ::fn(x); }
#else
#define DBPROP_AMATH_FN(fn)                        \
  DBPROP_HD float fn(float x) { return std::fn(x); } \
  DBPROP_HD double fn(double x) { return std::fn(x); }
#endif
DBPROP_AMATH_FN(exp)
DBPROP_AMATH_FN(expm1)
DBPROP_AMATH_FN(erfc)
DBPROP_AMATH_FN(tanh)
#undef DBPROP_AMATH_FN
}  // namespace amath

// The logistic function at z: s = σ(z), sm = σ(-z) = 1 - σ(z), sd = σ(z)σ(-z) = σ'(z) and dm = σ(-z) - σ(z) =
// 1 - 2σ(z) = -tanh(z/2), all from e = exp(-|z|) ∈ (0, 1] (no overflow, no cancellation):
//   σ(|z|) = 1/(1+e), σ(-|z|) = e/(1+e), σ(z)σ(-z) = e/(1+e)², |σ(-z) - σ(z)| = (1-e)/(1+e) with 1-e = -expm1(-|z|).
template <typename T>
struct Logistic {
  T s, sm, sd, dm;
  DBPROP_HD explicit Logistic(T z) {
    const T a = z < T(0) ? -z : z;
    const T e = amath::exp(-a), r = T(1) / (T(1) + e);
    const T big = r, small = e * r, diff = -amath::expm1(-a) * r;  // σ(|z|), σ(-|z|), σ(|z|) - σ(-|z|)
    s = z < T(0) ? small : big;
    sm = z < T(0) ? big : small;
    sd = small * r;
    dm = z < T(0) ? diff : -diff;
  }
};

// tanh(u) and sech²(u) = 1 - tanh²(u) = 4e/(1+e)² with e = exp(-2|u|); also σ(2u) = (1 + tanh u)/2 without the
// cancellation of 1 + tanh u for u << 0: σ(2|u|) = 1/(1+e), σ(-2|u|) = e/(1+e).
template <typename T>
struct TanhSech2 {
  T t, s2, half_one_plus_t;
  DBPROP_HD explicit TanhSech2(T u) {
    const T a = u < T(0) ? -u : u;
    const T e = amath::exp(T(-2) * a), r = T(1) / (T(1) + e);
    t = amath::tanh(u);
    s2 = T(4) * e * r * r;
    half_one_plus_t = u < T(0) ? e * r : r;
  }
};

// F.gelu(z) (approximate='none'): g = z Φ(z), Φ(z) = erfc(-z/√2)/2, φ(z) = exp(-z²/2)/√(2π).
//   g'(z) = Φ(z) + z φ(z),   g''(z) = φ(z) (2 - z²)
struct Gelu {
  template <typename T>
  static DBPROP_HD T d1(T z, T, T) {
    const T phi = T(0.39894228040143267794) * amath::exp(T(-0.5) * z * z);
    return T(0.5) * amath::erfc(T(-0.70710678118654752440) * z) + z * phi;
  }
  template <typename T>
  static DBPROP_HD T d2(T z, T, T) {
    const T phi = T(0.39894228040143267794) * amath::exp(T(-0.5) * z * z);
    return phi == T(0) ? T(0) : phi * (T(2) - z * z);  // φ = 0 where z² overflows: 0, not 0·∞
  }
};

// F.gelu(z, approximate='tanh'): g = z (1 + tanh u)/2, u = κ(z + c z³), κ = √(2/π), c = 0.044715;
// u' = κ(1 + 3c z²), u'' = 6κc z, t = tanh u, s = sech² u:
//   g'(z) = (1 + t)/2 + z s u'/2 = σ(2u) + z s u'/2,   g''(z) = s (u' - z t u'² + z u''/2)
struct GeluTanh {
  template <typename T>
  static DBPROP_HD T d1(T z, T, T) {
    const T kappa = T(0.79788456080286535588), c = T(0.044715);
    const TanhSech2<T> th(kappa * (z + c * z * z * z));
    if (th.s2 == T(0)) return th.half_one_plus_t;  // saturated (also where u' overflows)
    return th.half_one_plus_t + T(0.5) * z * th.s2 * kappa * (T(1) + T(3) * c * z * z);
  }
  template <typename T>
  static DBPROP_HD T d2(T z, T, T) {
    const T kappa = T(0.79788456080286535588), c = T(0.044715);
    const TanhSech2<T> th(kappa * (z + c * z * z * z));
    if (th.s2 == T(0)) return T(0);
    const T du = kappa * (T(1) + T(3) * c * z * z), ddu = T(6) * kappa * c * z;
    return th.s2 * (du - z * th.t * du * du + T(0.5) * z * ddu);
  }
};

// F.silu: g = z σ(z):
//   g'(z) = σ(z) (1 + z σ(-z)),   g''(z) = σ(z)σ(-z) (2 + z (1 - 2σ(z)))
struct Silu {
  template <typename T>
  static DBPROP_HD T d1(T z, T, T) {
    const Logistic<T> l(z);
    return l.s * (T(1) + z * l.sm);
  }
  template <typename T>
  static DBPROP_HD T d2(T z, T, T) {
    const Logistic<T> l(z);
    return l.sd * (T(2) + z * l.dm);
  }
};

// F.elu(z, alpha=p1): g = z (z > 0), α (exp(z) - 1) (z <= 0). PyTorch's conventions at the kink z = 0:
//   g'(z)  = 1 (z > 0),  α exp(z) (z <= 0)      [elu_backward: x <= 0 takes the exponential branch]
//   g''(z) = 0 (z >= 0), α exp(z) (z < 0)       [elu_double_backward masks with x < 0]
struct Elu {
  template <typename T>
  static DBPROP_HD T d1(T z, T alpha, T) { return z > T(0) ? T(1) : alpha * amath::exp(z); }
  template <typename T>
  static DBPROP_HD T d2(T z, T alpha, T) { return z < T(0) ? alpha * amath::exp(z) : T(0); }
};

// F.softplus(z, beta=p1, threshold=p2): g = log(1 + exp(βz))/β, and g = z where βz > threshold. PyTorch's
// conventions at βz = threshold (softplus_backward tests βz > threshold, its double backward βz < threshold):
//   g'(z)  = σ(βz) (βz <= threshold), 1 (βz > threshold)
//   g''(z) = β σ(βz) σ(-βz) (βz < threshold), 0 (βz >= threshold)
struct Softplus {
  template <typename T>
  static DBPROP_HD T d1(T z, T beta, T threshold) {
    const T x = beta * z;
    return x > threshold ? T(1) : Logistic<T>(x).s;
  }
  template <typename T>
  static DBPROP_HD T d2(T z, T beta, T threshold) {
    const T x = beta * z;
    return x < threshold ? beta * Logistic<T>(x).sd : T(0);
  }
};

// torch.tanh: g = tanh z:   g'(z) = sech² z,   g''(z) = -2 tanh z sech² z
struct Tanh {
  template <typename T>
  static DBPROP_HD T d1(T z, T, T) { return TanhSech2<T>(z).s2; }
  template <typename T>
  static DBPROP_HD T d2(T z, T, T) {
    const TanhSech2<T> th(z);
    return T(-2) * th.t * th.s2;
  }
};

// torch.sigmoid: g = σ(z):   g'(z) = σ(z)σ(-z),   g''(z) = σ(z)σ(-z) (1 - 2σ(z))
struct Sigmoid {
  template <typename T>
  static DBPROP_HD T d1(T z, T, T) { return Logistic<T>(z).sd; }
  template <typename T>
  static DBPROP_HD T d2(T z, T, T) {
    const Logistic<T> l(z);
    return l.sd * l.dm;
  }
};

// F.mish: g = z tanh(sp(z)), sp = log(1 + exp z); with T = tanh(sp), S = sech²(sp), σ = σ(z), sp' = σ:
//   g'(z) = T + z S σ,   g''(z) = S σ (2 + z (1 - σ - 2Tσ))
// With exp(sp) = 1 + w, w = exp(z): T = w(w+2)/(w²+2w+2), S = 4(1+w)²/(w²+2w+2)²; for z > 0 the same in
// v = exp(-z) (no overflow): T = (1+2v)/(1+2v+2v²), S = 4v²(1+v)²/(1+2v+2v²)².
template <typename T>
struct MishTerms {
  T t, s, sig, sigm;  // tanh(sp), sech²(sp), σ(z), σ(-z)
  DBPROP_HD explicit MishTerms(T z) {
    if (z > T(0)) {
      const T v = amath::exp(-z), den = T(1) + T(2) * v + T(2) * v * v, r = T(1) / (T(1) + v);
      t = (T(1) + T(2) * v) / den;
      s = T(4) * (v * (T(1) + v) / den) * (v * (T(1) + v) / den);
      sig = r;
      sigm = v * r;
    } else {
      const T w = amath::exp(z), den = w * w + T(2) * w + T(2), r = T(1) / (T(1) + w);
      t = w * (w + T(2)) / den;
      s = T(4) * ((T(1) + w) / den) * ((T(1) + w) / den);
      sig = w * r;
      sigm = r;
    }
  }
};

struct Mish {
  template <typename T>
  static DBPROP_HD T d1(T z, T, T) {
    const MishTerms<T> m(z);
    return m.t + z * m.s * m.sig;
  }
  template <typename T>
  static DBPROP_HD T d2(T z, T, T) {
    const MishTerms<T> m(z);
    return m.s * m.sig * (T(2) + z * (m.sigm - T(2) * m.t * m.sig));
  }
};

// F.hardswish: g = z min(max(z + 3, 0), 6)/6. PyTorch's hardswish_backward: g' = 0 for z <= -3, z/3 + 1/2 on
// -3 < z < 3, 1 for z >= 3 (the open interval: checked against autograd at z = ±3); its derivative (autograd's
// double backward) is g'' = 1/3 on -3 < z < 3 and 0 elsewhere.
struct Hardswish {
  template <typename T>
  static DBPROP_HD T d1(T z, T, T) {
    return z <= T(-3) ? T(0) : (z < T(3) ? z / T(3) + T(0.5) : T(1));
  }
  template <typename T>
  static DBPROP_HD T d2(T z, T, T) { return z > T(-3) && z < T(3) ? T(1) / T(3) : T(0); }
};

// F.hardsigmoid: g = min(max(z + 3, 0), 6)/6. PyTorch's hardsigmoid_backward: g' = 1/6 on -3 < z < 3 (open),
// 0 elsewhere; g'' = 0 (autograd has no double backward for it; the a.e. derivative of g' is 0).
struct Hardsigmoid {
  template <typename T>
  static DBPROP_HD T d1(T z, T, T) { return z > T(-3) && z < T(3) ? T(1) / T(6) : T(0); }
  template <typename T>
  static DBPROP_HD T d2(T, T, T) { return T(0); }
};

// The one table of smooth kinds: X(enum id, name, struct with d1 = g' and d2 = g''). Add a kind here (and its
// struct above); the enum, the names, the name lookup and the launchers' dispatch all expand this table.
#define DBPROP_SMOOTH_ACTIVATIONS(X)                        \
  X(kActGelu, "gelu", ::dbprop::kernels::Gelu)              \
  X(kActGeluTanh, "gelu_tanh", ::dbprop::kernels::GeluTanh) \
  X(kActSilu, "silu", ::dbprop::kernels::Silu)              \
  X(kActElu, "elu", ::dbprop::kernels::Elu)                 \
  X(kActSoftplus, "softplus", ::dbprop::kernels::Softplus)  \
  X(kActTanh, "tanh", ::dbprop::kernels::Tanh)              \
  X(kActSigmoid, "sigmoid", ::dbprop::kernels::Sigmoid)     \
  X(kActMish, "mish", ::dbprop::kernels::Mish)                \
  X(kActHardswish, "hardswish", ::dbprop::kernels::Hardswish) \
  X(kActHardsigmoid, "hardsigmoid", ::dbprop::kernels::Hardsigmoid)

#define DBPROP_ACTIVATION_ENUM(id, name, Act) id,
enum ActivationKind : int { DBPROP_SMOOTH_ACTIVATIONS(DBPROP_ACTIVATION_ENUM) kNumActivations };
#undef DBPROP_ACTIVATION_ENUM

// Host side: calls f(Act{}) with the struct of `kind`; returns false for an unknown kind (the dispatchers in
// csrc/ops.h reject those before any launcher runs).
template <typename F>
inline bool visit_activation(int64_t kind, F&& f) {
  switch (kind) {
#define DBPROP_ACTIVATION_CASE(id, name, Act) \
  case id:                                    \
    f(Act{});                                 \
    return true;
    DBPROP_SMOOTH_ACTIVATIONS(DBPROP_ACTIVATION_CASE)
#undef DBPROP_ACTIVATION_CASE
    default:
      return false;
  }
}

// out = g'(z) ⊙ c at z element m for the `copies` stacked copies of z in c (element m + i·z_numel of copy i):
// g'(z_m) is evaluated once and applied to every copy.
template <typename Act, typename scalar_t, typename acc_t>
DBPROP_HD void activation_derivative_multiply(const scalar_t* c, const scalar_t* z, scalar_t* out, int64_t z_numel,
                                              int64_t copies, acc_t p1, acc_t p2, int64_t m) {
  const acc_t d = Act::d1(static_cast<acc_t>(z[m]), p1, p2);
  for (int64_t i = 0, e = m; i < copies; ++i, e += z_numel)
    out[e] = static_cast<scalar_t>(static_cast<acc_t>(c[e]) * d);
}

// Source term at z element m: g''(z_m) Σ_i ξ_i q_i over the stacked copies, summed in acc_t in copy order (one
// writer per element: deterministic, no atomics).
template <typename Act, typename scalar_t, typename acc_t>
DBPROP_HD scalar_t activation_source(const scalar_t* xi, const scalar_t* q, const scalar_t* z, int64_t z_numel,
                                     int64_t copies, acc_t p1, acc_t p2, int64_t m) {
  acc_t total = 0;
  for (int64_t i = 0, e = m; i < copies; ++i, e += z_numel)
    total += static_cast<acc_t>(xi[e]) * static_cast<acc_t>(q[e]);
  return static_cast<scalar_t>(Act::d2(static_cast<acc_t>(z[m]), p1, p2) * total);
}

}  // namespace kernels
}  // namespace dbprop

// dbprop._C: the native extension. This file is the single pybind11 binding unit; the fused pass
// drivers (csrc/cpu, csrc/cuda) and the shared element bodies (csrc/kernels) bind here as they land.
// Until then the Python passes are the only backend (dbprop.native_available() is False).
#include <torch/extension.h>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace {

pybind11::dict build_info() {
  pybind11::dict info;
#ifdef _OPENMP
  info["openmp"] = true;
  info["openmp_max_threads"] = omp_get_max_threads();
#else
  info["openmp"] = false;
#endif
#ifdef WITH_CUDA
  info["cuda"] = true;
#else
  info["cuda"] = false;
#endif
  return info;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "dbprop native extension (build skeleton: no pass drivers yet)";
  m.def("build_info", &build_info, "What this extension was compiled with.");
}

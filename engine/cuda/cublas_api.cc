#include "engine/cuda/cublas_api.h"

#include <dlfcn.h>

#include <mutex>
#include <string>

#include "engine/base/error.h"

namespace needle::cuda {

namespace {
CublasApi Load() {
  const std::string versioned = "libcublas.so." + std::to_string(CUBLAS_VER_MAJOR);
  void* h = dlopen(versioned.c_str(), RTLD_NOW | RTLD_LOCAL);
  if (h == nullptr) h = dlopen("libcublas.so", RTLD_NOW | RTLD_LOCAL);
  if (h == nullptr)
    Fail("cannot load cuBLAS (", versioned, "): ", dlerror(),
         " (install the CUDA toolkit's cuBLAS or add its folder to LD_LIBRARY_PATH)");
  CublasApi a{};
  const auto sym = [&](auto& fn, const char* name) {
    fn = reinterpret_cast<std::remove_reference_t<decltype(fn)>>(dlsym(h, name));
    if (fn == nullptr) Fail("cuBLAS (", versioned, ") lacks ", name);
  };
  sym(a.Create, "cublasCreate_v2");
  sym(a.Destroy, "cublasDestroy_v2");
  sym(a.SetStream, "cublasSetStream_v2");
  sym(a.GemmEx, "cublasGemmEx");
  sym(a.Sgemm, "cublasSgemm_v2");
  sym(a.GetStatusName, "cublasGetStatusName");
  sym(a.GetStatusString, "cublasGetStatusString");
  return a;
}
}  // namespace

const CublasApi& Cublas() {
  static const CublasApi api = Load();  // thread-safe; a failed load throws again next time
  return api;
}

}  // namespace needle::cuda

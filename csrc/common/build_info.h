/*
 * kbit_build_info(): a JSON object assembled at compile time (constexpr), so the returned string is
 * static, needs no allocation and no initialization race.
 *
 * Inputs (macros): KBIT_BUILD_BACKEND ("cpu"/"cuda"), KBIT_SOURCE_REVISION (string literal),
 * and for CUDA builds: __CUDA_ARCH_LIST__ (nvcc >= 11.5, e.g. 750,900,1200: every *virtual*
 * architecture compiled, one per CMake arch entry whether -real or -virtual), KBIT_CUDA_PTX_ARCH
 * (e.g. 120, the arch whose PTX is embedded; 0 for none) and KBIT_CUDA_PTX_ARCH_IS_REAL (1 when the
 * PTX arch also has a cubin). Real archs = the list minus the PTX arch unless it is also real.
 */
#ifndef KBIT_COMMON_BUILD_INFO_H_
#define KBIT_COMMON_BUILD_INFO_H_

#include "kbit.h"

#ifndef KBIT_SOURCE_REVISION
#define KBIT_SOURCE_REVISION "unknown"
#endif

namespace kbit {
namespace build_info {

struct Text {
  char s[768];
  int len;
  constexpr Text() : s{}, len(0) {}
  constexpr void put(const char* p) {
    while (*p && len < (int)sizeof(s) - 1) s[len++] = *p++;
  }
  constexpr void put_json_string(const char* p) { /* revision etc.: escape quotes/backslashes */
    put("\"");
    while (*p && len < (int)sizeof(s) - 3) {
      if (*p == '"' || *p == '\\') s[len++] = '\\';
      if ((unsigned char)*p >= 0x20) s[len++] = *p;
      ++p;
    }
    put("\"");
  }
  constexpr void put_uint(long v) {
    char d[24] = {};
    int k = 0;
    do {
      d[k++] = (char)('0' + v % 10);
      v /= 10;
    } while (v > 0);
    while (k > 0 && len < (int)sizeof(s) - 1) s[len++] = d[--k];
  }
};

/* "archs" and "ptx" arrays from a list of virtual archs in nvcc's 3-4 digit form (750 -> "75"). */
template <int N>
constexpr void put_archs(Text& t, const int (&list)[N], int ptx, int ptx_is_real) {
  t.put("\"archs\":[");
  bool first = true;
  for (int i = 0; i < N; ++i) {
    if (list[i] <= 0) continue;
    if (list[i] / 10 == ptx && !ptx_is_real) continue;
    if (!first) t.put(",");
    first = false;
    t.put("\"");
    t.put_uint(list[i] / 10);
    t.put("\"");
  }
  t.put("],\"ptx\":[");
  if (ptx > 0) {
    t.put("\"");
    t.put_uint(ptx);
    t.put("\"");
  }
  t.put("]");
}

constexpr void put_host_compiler(Text& t) {
#if defined(__clang__)
  t.put("clang ");
  t.put_uint(__clang_major__);
  t.put(".");
  t.put_uint(__clang_minor__);
  t.put(".");
  t.put_uint(__clang_patchlevel__);
#elif defined(__GNUC__)
  t.put("gcc ");
  t.put_uint(__GNUC__);
  t.put(".");
  t.put_uint(__GNUC_MINOR__);
  t.put(".");
  t.put_uint(__GNUC_PATCHLEVEL__);
#else
  t.put("unknown");
#endif
}

constexpr Text make() {
  Text t;
  t.put("{\"backend\":\"" KBIT_BUILD_BACKEND "\",\"abi\":");
  t.put_uint(KBIT_ABI_VERSION);
#if defined(__CUDACC__) && defined(__CUDA_ARCH_LIST__)
  t.put(",\"cuda\":\"");
  t.put_uint(__CUDACC_VER_MAJOR__);
  t.put(".");
  t.put_uint(__CUDACC_VER_MINOR__);
  t.put("\",");
  {
    constexpr int list[] = {__CUDA_ARCH_LIST__};
#ifndef KBIT_CUDA_PTX_ARCH
#define KBIT_CUDA_PTX_ARCH 0
#endif
#ifndef KBIT_CUDA_PTX_ARCH_IS_REAL
#define KBIT_CUDA_PTX_ARCH_IS_REAL 0
#endif
    put_archs(t, list, KBIT_CUDA_PTX_ARCH, KBIT_CUDA_PTX_ARCH_IS_REAL);
  }
  t.put(",\"compiler\":\"nvcc ");
  t.put_uint(__CUDACC_VER_MAJOR__);
  t.put(".");
  t.put_uint(__CUDACC_VER_MINOR__);
  t.put(".");
  t.put_uint(__CUDACC_VER_BUILD__);
  t.put("\",\"host_compiler\":\"");
#else
  t.put(",\"cuda\":null,\"archs\":[],\"ptx\":[],\"compiler\":\"");
#endif
  put_host_compiler(t);
  t.put("\"");
#if !(defined(__CUDACC__) && defined(__CUDA_ARCH_LIST__))
  t.put(",\"host_compiler\":\""); /* a CPU build's compiler is its host compiler */
  put_host_compiler(t);
  t.put("\"");
#endif
  t.put(",\"revision\":");
  t.put_json_string(KBIT_SOURCE_REVISION);
  t.put("}");
  return t;
}

}  // namespace build_info
}  // namespace kbit

#endif /* KBIT_COMMON_BUILD_INFO_H_ */

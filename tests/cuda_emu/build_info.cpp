// kbit_build_info() of the emulated CUDA library: backend "cuda-emu", no CUDA version or archs.
#define KBIT_BUILD_BACKEND "cuda-emu"
#include "build_info.h"

static constexpr kbit::build_info::Text kBuildInfo = kbit::build_info::make();

extern "C" KBIT_API const char* kbit_build_info(void) { return kBuildInfo.s; }

// kbit_build_info() in a translation unit of its own: the source revision is compiled in here only,
// so a new commit rebuilds this small file, not the kernels.
#define KBIT_BUILD_BACKEND "cuda"
#include "build_info.h"

static constexpr kbit::build_info::Text kBuildInfo = kbit::build_info::make();

extern "C" KBIT_API const char* kbit_build_info(void) { return kBuildInfo.s; }

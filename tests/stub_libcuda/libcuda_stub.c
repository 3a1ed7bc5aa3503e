/* A stand-in for the NVIDIA driver's libcuda.so.1, for the selection scenarios in test_scenarios.py.
 *
 * It implements only what kbit's driver probe calls, and reports the machine the environment
 * describes:
 *   KBIT_STUB_DRIVER       cuDriverGetVersion's value, e.g. 12040 for CUDA 12.4 (default 12040)
 *   KBIT_STUB_DEVICES      comma-separated MAJOR.MINOR:NAME, e.g. "8.0:A100,6.1:Tesla P100"
 *   KBIT_STUB_INIT_ERROR   a CUresult for cuInit to return (e.g. 100, CUDA_ERROR_NO_DEVICE)
 * No kernel can run through it: the scenarios exercise selection and loading only.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MAX_DEVICES 16
#define NAME_LEN 128

typedef int CUresult;

static int count, majors[MAX_DEVICES], minors[MAX_DEVICES], parsed;
static char names[MAX_DEVICES][NAME_LEN];

static void parse_devices(void) {
    if (parsed) return;
    parsed = 1;
    const char *spec = getenv("KBIT_STUB_DEVICES");
    if (!spec) return;
    char buf[2048];
    snprintf(buf, sizeof buf, "%s", spec);
    for (char *save = NULL, *item = strtok_r(buf, ",", &save); item && count < MAX_DEVICES;
         item = strtok_r(NULL, ",", &save)) {
        char *colon = strchr(item, ':');
        if (colon) *colon = '\0';
        if (sscanf(item, "%d.%d", &majors[count], &minors[count]) != 2) continue;
        snprintf(names[count], NAME_LEN, "%s", colon ? colon + 1 : "Stub GPU");
        count++;
    }
}

static const char *error_names[] = {"CUDA_SUCCESS", "CUDA_ERROR_INVALID_VALUE"};
static const char no_device[] = "CUDA_ERROR_NO_DEVICE";
static const char unknown[] = "CUDA_ERROR_UNKNOWN";

CUresult cuGetErrorName(CUresult error, const char **out) {
    if (!out) return 1;
    *out = error == 100 ? no_device : (error >= 0 && error < 2 ? error_names[error] : unknown);
    return 0;
}

CUresult cuInit(unsigned int flags) {
    (void)flags;
    const char *err = getenv("KBIT_STUB_INIT_ERROR");
    return err ? atoi(err) : 0;
}

CUresult cuDriverGetVersion(int *version) {
    if (!version) return 1;
    const char *v = getenv("KBIT_STUB_DRIVER");
    *version = v ? atoi(v) : 12040;
    return 0;
}

CUresult cuDeviceGetCount(int *n) {
    if (!n) return 1;
    parse_devices();
    *n = count;
    return 0;
}

CUresult cuDeviceGet(int *device, int ordinal) {
    parse_devices();
    if (!device || ordinal < 0 || ordinal >= count) return 1;
    *device = ordinal;
    return 0;
}

CUresult cuDeviceGetAttribute(int *value, int attribute, int device) {
    parse_devices();
    if (!value || device < 0 || device >= count) return 1;
    if (attribute == 75) *value = majors[device];      /* COMPUTE_CAPABILITY_MAJOR */
    else if (attribute == 76) *value = minors[device]; /* COMPUTE_CAPABILITY_MINOR */
    else return 1;
    return 0;
}

CUresult cuDeviceGetName(char *name, int len, int device) {
    parse_devices();
    if (!name || len <= 0 || device < 0 || device >= count) return 1;
    snprintf(name, (size_t)len, "%s", names[device]);
    return 0;
}

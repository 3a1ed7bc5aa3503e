# A CUDA 13.x toolkit from NVIDIA's PyPI wheels (ci/matrix.toml [row.pypi]) in a venv, laid out as a
# CUDA root at /usr/local/cuda so CMake's CUDA language finds nvcc, headers and the static runtime.
# Built by ci/kbit_ci/images.py with --build-arg BASE REQUIREMENTS LOCK_SHA256; the build context holds
# the pinned wheels in wheels/ (downloaded on the host) and their hash lock requirements.txt (a copy of
# ci/requirements/cudaXY.txt, whose sha256 is LOCK_SHA256), so the build itself needs no access to PyPI and
# pip installs only files whose sha256 the lock names.
ARG BASE=debian:bookworm-slim
FROM ${BASE}

# "nvidia-cuda-nvcc==13.0.88 nvidia-nvvm==13.0.88 ..." (the matrix row's pins; images.py checked that
# the lock pins exactly these before the build)
ARG REQUIREMENTS
ARG LOCK_SHA256

ENV DEBIAN_FRONTEND=noninteractive LANG=C.UTF-8 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1

RUN set -eu; \
    apt-get update -q; \
    apt-get install -y -q --no-install-recommends python3 python3-venv g++ cmake ninja-build ca-certificates ccache; \
    rm -rf /var/lib/apt/lists/* /var/cache/apt/archives/*.deb

# nvcc.profile looks for headers and libraries under $(TOP)/targets/x86_64-linux; the wheels put them
# at $(TOP)/include and $(TOP)/lib (libcudart_static.a and libcudadevrt.a included): link them there.
COPY wheels/ /tmp/wheels/
COPY requirements.txt /tmp/requirements.txt
RUN set -eu; \
    echo "${LOCK_SHA256}  /tmp/requirements.txt" | sha256sum -c -; \
    python3 -m venv /opt/cuda-venv; \
    /opt/cuda-venv/bin/pip install -q --no-index --no-deps --require-hashes --find-links /tmp/wheels \
        -r /tmp/requirements.txt; \
    rm -rf /tmp/wheels /tmp/requirements.txt; \
    cu=$(/opt/cuda-venv/bin/python -c 'import nvidia, os; print(os.path.join(nvidia.__path__[0], "cu13"))'); \
    mkdir -p "$cu/targets/x86_64-linux"; \
    ln -s ../../include "$cu/targets/x86_64-linux/include"; \
    ln -s ../../lib "$cu/targets/x86_64-linux/lib"; \
    ln -s lib "$cu/lib64"; \
    ln -s "$cu" /usr/local/cuda; \
    /usr/local/cuda/bin/nvcc --version

ENV PATH=/usr/local/cuda/bin:${PATH} CUDA_HOME=/usr/local/cuda CUDACXX=/usr/local/cuda/bin/nvcc
LABEL org.kbit.toolkit="pypi" org.kbit.requirements="${REQUIREMENTS}"

# NVIDIA's own devel image for rows only it serves (ci/matrix.toml nvidia_image), plus the build tools.
# Needs a registry that serves NVIDIA's images: CI runners, not air-gapped machines.
ARG NVIDIA_IMAGE=nvidia/cuda:12.6.3-devel-ubuntu22.04
FROM ${NVIDIA_IMAGE}

# RUN lines start with `set -eu`: OCI-format images ignore SHELL, so /bin/sh runs them.
ENV DEBIAN_FRONTEND=noninteractive LANG=C.UTF-8

RUN set -eu; \
    apt-get update -q; \
    apt-get install -y -q --no-install-recommends cmake ninja-build ccache; \
    rm -rf /var/lib/apt/lists/*; \
    nvcc --version

LABEL org.kbit.toolkit="nvidia"

# A CUDA toolkit from Debian's non-free archive, pinned by the matrix row (ci/matrix.toml [row.debian]).
# Built by ci/kbit_ci/images.py with --build-arg BASE SUITE EXTRA_SUITE GXX PACKAGES.
ARG BASE=debian:bookworm-slim
FROM ${BASE}

ARG SUITE=bookworm
# e.g. "experimental": added as a source and taken with apt's -t for the toolkit's dependencies
ARG EXTRA_SUITE=
ARG GXX=g++
# "nvidia-cuda-toolkit=VERSION nvidia-cuda-dev=VERSION ..."
ARG PACKAGES

# RUN lines start with `set -eu`: OCI-format images ignore SHELL, so /bin/sh runs them.
ENV DEBIAN_FRONTEND=noninteractive LANG=C.UTF-8

# Add contrib/non-free (and the extra suite) on the mirror the base image already uses: the one-line
# sources.list that debootstrap writes, or the deb822 debian.sources of the official images.
# sid and experimental carry a short Valid-Until that a snapshot mirror serves expired: the date check is
# skipped (signatures are still verified; the pins fix what gets installed). apt's signature checks stay as
# the base image has them: every Release file must be signed by a key in debian-archive-keyring, and every
# package must match the hash its signed index gives. The linker is not in the image: build_row mounts the
# host's hash-locked zig read-only (it is a static binary, the same file serves every row).
RUN set -eu; \
    if [ -f /etc/apt/sources.list.d/debian.sources ]; then \
        sed -i -E '/^URIs:.*security/,/^$/b; s/^Components:.*/Components: main contrib non-free/' \
            /etc/apt/sources.list.d/debian.sources; \
        mirror=$(awk '/^URIs:/ && !/security/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources); \
    else \
        sed -i -E '/^deb / { /contrib/! s/$/ contrib/; /non-free( |$)/! s/$/ non-free/ }' /etc/apt/sources.list; \
        mirror=$(awk '$1 == "deb" && $2 !~ /security/ {print $2; exit}' /etc/apt/sources.list); \
    fi; \
    test -n "$mirror"; \
    if [ -n "${EXTRA_SUITE}" ]; then \
        echo "deb [check-valid-until=no] ${mirror} ${EXTRA_SUITE} main contrib non-free" \
            > /etc/apt/sources.list.d/extra.list; \
    fi; \
    apt-get -o Acquire::Check-Valid-Until=false update -q; \
    apt-get install -y -q --no-install-recommends ${GXX} cmake ninja-build ca-certificates; \
    apt-get install -y -q --no-install-recommends ${EXTRA_SUITE:+-t ${EXTRA_SUITE}} ${PACKAGES}; \
    rm -rf /var/lib/apt/lists/* /var/cache/apt/archives/*.deb; \
    nvcc --version; ${GXX} --version | head -1

# The compiler cache (ci/kbit_ci/build_row.py mounts the row's cache directory). A layer of its own, so
# adding it kept the multi-GB toolkit layer above. apt verifies every index and package as above.
RUN set -eu; \
    apt-get -o Acquire::Check-Valid-Until=false update -q; \
    apt-get install -y -q --no-install-recommends ccache; \
    rm -rf /var/lib/apt/lists/* /var/cache/apt/archives/*.deb; \
    ccache --version | head -1

LABEL org.kbit.toolkit="debian" org.kbit.suite="${SUITE}" org.kbit.gxx="${GXX}"

# The node image: the agent and the CSI plugin in one process (`weightcache node`), and the
# metadata-only controller (`weightcache controller`). Mount propagation and the kubelet
# directories are set by the DaemonSet in deploy/.
#
# Two stages: the build stage installs the package and its runtime dependencies into a virtual
# environment; the runtime stage is the same pinned base with only that environment added (no
# pip cache, no build tools, no test extras, no sources). mount(8) and umount(8) come with the
# base image (Debian's util-linux and mount packages are part of every Debian image).
ARG PYTHON_IMAGE=python:3.11.13-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
RUN python -m venv /opt/weightcache
WORKDIR /src
COPY pyproject.toml README.md ./
COPY app/ app/
COPY daemon/ daemon/
COPY csi/ csi/
COPY proto/ proto/
COPY testing/ testing/
RUN /opt/weightcache/bin/pip install --no-cache-dir . \
    && /opt/weightcache/bin/pip uninstall --yes pip \
    && find /opt/weightcache -name __pycache__ -prune -exec rm -rf {} +

FROM ${PYTHON_IMAGE}
ARG VERSION=0.1.0
ARG REVISION=unknown
LABEL org.opencontainers.image.title="weightcache" \
      org.opencontainers.image.description="Node-level model-weight cache for Kubernetes GPU fleets: a DaemonSet and CSI driver that prefetch, verify and mount model weights read-only" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.source="https://github.com/weightcache/weightcache" \
      org.opencontainers.image.base.name="docker.io/library/python:3.11.13-slim-bookworm"
COPY --from=build /opt/weightcache /opt/weightcache
ENV PATH=/opt/weightcache/bin:$PATH PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
WORKDIR /
ENTRYPOINT ["weightcache"]
CMD ["node"]

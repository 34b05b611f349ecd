# The node image: the agent and the CSI plugin in one process (`weightcache node`), and the
# metadata-only controller (`weightcache controller`). Mount propagation and the kubelet
# directories are set by the DaemonSet in deploy/.
FROM python:3.11-slim-bookworm

RUN apt-get update \
    && apt-get install -y --no-install-recommends util-linux \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /src
COPY pyproject.toml README.md ./
COPY daemon/ daemon/
COPY csi/ csi/
COPY proto/ proto/
COPY testing/ testing/
RUN pip install --no-cache-dir . && rm -rf /src

WORKDIR /
ENTRYPOINT ["weightcache"]
CMD ["node"]

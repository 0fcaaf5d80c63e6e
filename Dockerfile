# The one image both workloads in manifests/ run: `ztd` (Deployment) and `zt-bridge` (DaemonSet).
#   docker build -t ztdpu:0.1.0 .
# Not built by CI: this machine reaches no container registry. The install step is the one tests run (`pip install .`).
FROM python:3.11-slim
WORKDIR /src
COPY pyproject.toml README.md ./
COPY ztcore ztcore
COPY sds sds
COPY xds_server xds_server
COPY ipsec_bridge ipsec_bridge
COPY ztctl ztctl
COPY protos protos
RUN pip install --no-cache-dir . && rm -rf /src
WORKDIR /
# ztd runs as 1337 (its Deployment says so); zt-bridge as root with NET_ADMIN only (its DaemonSet).
USER 1337
ENTRYPOINT []

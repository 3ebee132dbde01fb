# lmcd on a CUDA-capable PyTorch base: `docker build -t lmcd .`
# Run next to vLLM with the host's network and IPC namespaces (CUDA IPC):
#   docker run --gpus all --network host --ipc host lmcd --cpu-buffer-size 50
FROM pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1

WORKDIR /opt/lmcd
COPY pyproject.toml README.md ./
COPY lmcd ./lmcd
COPY lmcd_backends ./lmcd_backends
# torch comes with the base image; pip keeps it.
RUN python -m pip install --no-cache-dir .

# The default flags bind every interface, as a node-local service must for
# pods on the same node; keep the port off untrusted networks (docs/operations.md).
EXPOSE 5555 9090
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s \
    CMD ["lmcd", "inspect", "--check", "--host", "127.0.0.1"]
ENTRYPOINT ["lmcd", "serve", "--host", "0.0.0.0"]
CMD ["--cpu-buffer-size", "50"]

# immunize-cli on Ray's GPU image, for Kubernetes (deploy/kuberay/) or any Ray cluster of containers.
#   docker build -t registry.example.com/immunize-cli:0.1.0 . && docker push registry.example.com/immunize-cli:0.1.0
# RAY_VERSION must be the cluster's Ray (rayVersion in deploy/kuberay/*.yaml) and meet pyproject's ray requirement
# (tests/test_deploy.py checks both). The entrypoint stays Ray's: KubeRay starts `ray start` in the container.
ARG RAY_VERSION=2.60.0
FROM rayproject/ray:${RAY_VERSION}-py311-gpu
ARG RAY_VERSION
# Optional: a PyTorch wheel index whose CUDA build suits the nodes' NVIDIA driver, e.g.
# --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128; empty: PyPI's default torch wheel.
ARG TORCH_INDEX_URL=""

# The GPU install: torch from PyPI (or TORCH_INDEX_URL), never constraints-cpu.txt (the CPU-only pin of `make setup`).
# The image's Ray is kept (ray==RAY_VERSION): pip would otherwise be free to change it.
COPY --chown=ray:users . /tmp/immunize-cli
WORKDIR /tmp/immunize-cli
RUN if [ -n "$TORCH_INDEX_URL" ]; then pip install --no-cache-dir --index-url "$TORCH_INDEX_URL" "torch>=2.4"; fi \
 && pip install --no-cache-dir . "ray[train,tune,default]==${RAY_VERSION}" \
 && cd / && rm -rf /tmp/immunize-cli \
 && python -c "import ray, sys; sys.exit(ray.__version__ != '${RAY_VERSION}')" \
 && immunize-cli --help > /dev/null
WORKDIR /home/ray

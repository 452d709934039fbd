# MoLink on CPU: `molink serve` (the head) or `molink join` (a stage), one image for both.
#
#   docker build -t molink:cpu .
#   docker run --rm molink:cpu                      # `molink demo` on the bundled model
#   docker run --rm -p 8000:8000 -e MOLINK_CLUSTER_TOKEN molink:cpu \
#       serve /models/default_model --layers 0:2 --port 8000 --peer-port 50051
#   docker compose up                               # head + two stages (compose.yaml)
#
# The CUDA image is Dockerfile.cuda.
FROM python:3.11-slim

# torch==2.13.0 from PyPI, as the README installs it. On x86-64 Linux PyPI's wheel also pulls
# CUDA libraries (several GB, unused on a CPU); for a CPU-only image pass
#   --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HOME=/data/huggingface

# torch first, in a layer of its own: a change to MoLink's code does not download it again.
RUN pip install "torch==${TORCH_VERSION}" ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}

WORKDIR /src
COPY pyproject.toml README.md ./
COPY molink ./molink
# /models/default_model: the small model bundled in the package (molink/assets/default_model),
# at a short path for `molink serve` / `molink join` (compose.yaml uses it).
RUN pip install . \
    && mkdir -p /models \
    && ln -s "$(python -c 'import molink, pathlib; print(pathlib.Path(molink.__file__).parent / "assets" / "default_model")')" /models/default_model \
    && test -f /models/default_model/model.safetensors \
    && useradd --create-home --uid 1000 molink \
    && mkdir -p "$HF_HOME" && chown molink "$HF_HOME" \
    && rm -rf /src

# Models fetched from the Hub (HF_HOME) outlive the container; a node's TLS identity is kept
# in ~/.local/state/molink (MOLINK_STATE_DIR to move it).
VOLUME ["/data/huggingface"]
USER molink
WORKDIR /home/molink
# 8000: the head's HTTP API (--port); 50051 / 50052: the peer ports of the README's recipe.
EXPOSE 8000 50051 50052
ENTRYPOINT ["molink"]
CMD ["demo"]

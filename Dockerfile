# The Gradio app on a CUDA PyTorch base image.
#
#   docker build -t self-forcing-app .
#   docker run --gpus all -p 7860:7860 self-forcing-app                      # the shipped default model
#   docker run --gpus all -p 7860:7860 -v /models/sf:/models/sf:ro -e APP_AUTH=alice:secret \
#       self-forcing-app python -m app --host 0.0.0.0 --checkpoint /models/sf
#
# BASE_IMAGE and XFORMERS_VERSION go together: an xformers wheel is built for one torch version (xformers
# 0.0.33.post1 <-> torch 2.9.0, CUDA 12.8). Change both, and XFORMERS_INDEX for another CUDA version.
ARG BASE_IMAGE=pytorch/pytorch:2.9.0-cuda12.8-cudnn9-runtime
FROM ${BASE_IMAGE}

ARG XFORMERS_VERSION=0.0.33.post1
ARG XFORMERS_INDEX=https://download.pytorch.org/whl/cu128

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    GRADIO_ANALYTICS_ENABLED=False \
    PORT=7860

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# ffmpeg and ffprobe: Gradio's streaming gr.Video remuxes every H.264 chunk with them (PyAV encodes the chunks).
# Not pinned: the base image's Ubuntu release fixes the version, and a pin would break at every base update.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ffmpeg \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app

# Requirements without torch: the base image's CUDA build of torch stays (a PyPI torch would replace it).
COPY requirements.txt /tmp/requirements.txt
RUN grep -v -E '^\s*(torch|torchvision|torchaudio)\s*([=<>!~;[]|$)' /tmp/requirements.txt > /tmp/requirements-notorch.txt \
    && pip install --no-cache-dir -r /tmp/requirements-notorch.txt \
    && pip install --no-cache-dir --no-deps --index-url "${XFORMERS_INDEX}" "xformers==${XFORMERS_VERSION}" \
    && python -c "import torch, xformers, av, gradio; print('torch', torch.__version__, 'xformers', xformers.__version__, 'gradio', gradio.__version__)" \
    && rm /tmp/requirements.txt /tmp/requirements-notorch.txt

COPY engine/ /app/engine/
COPY app/ /app/app/
COPY configs/ /app/configs/
COPY checkpoints/ /app/checkpoints/

RUN useradd --create-home --uid 1000 --user-group --shell /usr/sbin/nologin app
USER 1000:1000

EXPOSE 7860

# "/" answers 200 with or without APP_AUTH (the login page); loading a big checkpoint takes a while.
HEALTHCHECK --interval=30s --timeout=10s --start-period=180s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/' % os.environ.get('PORT', '7860'), timeout=8)"]

CMD ["python", "-m", "app", "--host", "0.0.0.0"]

# Tuneboard image: the same `make install` as on a laptop, then `tuneboard serve`.
# TORCH_INDEX picks the torch build: CPU (the default, enough for the web server) or CUDA for a GPU worker,
# e.g. --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 (docker-compose.yml does this).
FROM python:3.11-slim
ARG TORCH=torch==2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
RUN apt-get update && apt-get install -y --no-install-recommends make && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY . .
# pip prefers the index's build (e.g. 2.13.0+cu128) over PyPI's plain 2.13.0; other packages stay at the lock's versions.
RUN PIP_EXTRA_INDEX_URL="$TORCH_INDEX" make install TORCH="$TORCH" VENV=/opt/venv
ENV PATH=/opt/venv/bin:$PATH
EXPOSE 8000 8001
CMD ["tuneboard", "serve", "--host", "0.0.0.0", "--port", "8000"]

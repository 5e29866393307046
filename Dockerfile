# One image for every HydraServe process (API, scheduler, store, node agents); the compose file
# picks the command. CPU build of torch; a CUDA node would use a CUDA base image and torch build.
FROM python:3.11-slim

ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1 HYDRA_NATIVE_CACHE=/opt/hydraserve/native
WORKDIR /app
# a C compiler for the runtime's native CPU kernels (gpu_runtime/native.py); they are built
# below, and rebuilt on first use only on a host whose CPU differs from the builder's
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
COPY pyproject.toml setup.py README.md alembic.ini ./
COPY platform platform
COPY gpu_runtime gpu_runtime
COPY migrations migrations
RUN pip install -e . && python -m gpu_runtime.native
EXPOSE 8000 8300
CMD ["hydraserve", "--help"]

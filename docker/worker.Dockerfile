# The GPU worker. PyPI's Linux torch wheels bring their own CUDA libraries; the host needs an NVIDIA driver
# and the NVIDIA container toolkit (docker-compose.yml reserves one GPU). Without a GPU it runs on the CPU.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md constraints.txt ./
COPY core ./core
COPY api ./api
COPY worker ./worker
RUN pip install --no-cache-dir -c constraints.txt . \
    && useradd --create-home --uid 1000 nad && mkdir -p /data/storage && chown -R nad /data
USER nad
# Every torch.load in the image reads weights only, whatever its call asks (worker/app.py sets it as well).
ENV TORCH_FORCE_WEIGHTS_ONLY_LOAD=1
CMD ["celery", "-A", "worker.app", "worker", "--loglevel", "INFO", "--without-mingle", "--without-gossip"]

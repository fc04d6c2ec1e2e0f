# The API: HTTP, validation, uploads to disk. No torch in this image: the API never opens a checkpoint.
FROM python:3.11-slim
WORKDIR /app
COPY docker/api-requirements.txt constraints.txt /tmp/
RUN pip install --no-cache-dir -r /tmp/api-requirements.txt -c /tmp/constraints.txt
COPY pyproject.toml README.md ./
COPY core ./core
COPY api ./api
COPY worker ./worker
# --no-deps: the torch-free set above is all the API needs of pyproject's dependencies.
RUN pip install --no-cache-dir --no-deps . \
    && useradd --create-home --uid 1000 nad && mkdir -p /data/storage && chown -R nad /data
USER nad
ENV NAD_API_HOST=0.0.0.0
EXPOSE 8000
CMD ["python", "-m", "api"]

# FUDLR image: the method, the CLI, the API and the worker (docker-compose.yml runs them).
# CPU torch by default; the GPU worker's build:
#   --build-arg TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
FROM python:3.11-slim

ARG TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu"
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    FUDLR_DATA_DIR=/data \
    FUDLR_CACHE_DIR=/data/cache

WORKDIR /app
RUN pip install ${TORCH_SPEC}
COPY pyproject.toml README.md ./
COPY fudlr ./fudlr
COPY service ./service
COPY workers ./workers
COPY clients ./clients
RUN pip install '.[all]' \
    && useradd --create-home --uid 1000 fudlr \
    && mkdir -p /data /models \
    && chown fudlr /data

USER fudlr
VOLUME ["/data"]
EXPOSE 8000
ENTRYPOINT ["fudlr"]
# the embedded mode: API + worker, SQLite and artifacts under /data
CMD ["serve", "--host", "0.0.0.0", "--port", "8000"]

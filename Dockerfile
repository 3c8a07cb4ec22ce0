# Freeference: one image for both roles (`freeference api` and `freeference worker`).
# Unverified: Docker does not run on the machine this was written on; written by reading.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# Dependencies first (cached layer), then the code.
COPY pyproject.toml README.md ./
COPY api ./api
COPY workers ./workers
COPY router ./router
COPY settings ./settings
COPY cli ./cli
COPY bench ./bench
RUN pip install . \
    && useradd --system --uid 10001 --home-dir /app freeference

USER freeference
EXPOSE 8000

# Logs are JSON lines on stderr (FREEFERENCE_LOG_FORMAT=text for a terminal).
ENV FREEFERENCE_LOG_FORMAT=json
CMD ["freeference", "api", "--host", "0.0.0.0", "--port", "8000"]

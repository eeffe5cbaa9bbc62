# The bomstream gateway as an image.
#
# Configure it with BOMSTREAM_<SECTION>_<KEY> environment variables (every key
# is listed in config.toml). It listens on every interface, so it refuses to
# start until auth.admin_token or auth.jwt_secret is set.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    BOMSTREAM_SERVER_HOST=0.0.0.0 \
    BOMSTREAM_SERVER_PORT=8080 \
    BOMSTREAM_SERVER_LOG_FORMAT=json

RUN useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin bomstream

WORKDIR /app
COPY pyproject.toml README.md ./
COPY src ./src
RUN pip install --no-cache-dir .

USER bomstream
EXPOSE 8080
# The gateway ends every stream with stream_end server_shutdown and exits 0
# within server.shutdown_grace_s; give `docker stop -t` more than that.
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=10s --timeout=5s --start-period=10s --retries=3 \
    CMD ["bomstream", "health", "--timeout", "4"]
CMD ["bomstream", "serve"]

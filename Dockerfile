# CPU image of `histocsc serve`. Build: docker build -t histocsc .
# Run:   docker run -p 8000:8000 -v $PWD/models:/models:ro -v /archive:/slides:ro \
#          -v histocsc-data:/data histocsc
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 NO_ALBUMENTATIONS_UPDATE=1

WORKDIR /opt/histocsc
COPY pyproject.toml README.md constraints.txt ./
COPY histocsc ./histocsc
COPY configs ./configs
# CPU wheels of torch (the CUDA ones are several GB and unused here)
RUN pip install --extra-index-url https://download.pytorch.org/whl/cpu -c constraints.txt . \
    && useradd --create-home --uid 10001 --shell /usr/sbin/nologin histocsc \
    && mkdir -p /data /models /slides \
    && chown histocsc:histocsc /data

USER histocsc
EXPOSE 8000
VOLUME ["/data"]
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/v2/health/ready', timeout=4)"]
ENTRYPOINT ["histocsc", "serve", "--host", "0.0.0.0", "--port", "8000", "--data", "/data", "--device", "cpu"]
CMD ["--model", "/models/model.onnx", "--slides-root", "/slides"]

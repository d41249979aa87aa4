# Tuneboard image: the same `make install` as on a laptop, then `tuneboard serve`.
FROM python:3.11-slim
ARG TORCH=torch==2.13.0
RUN apt-get update && apt-get install -y --no-install-recommends make && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY . .
RUN make install TORCH="$TORCH" VENV=/opt/venv
ENV PATH=/opt/venv/bin:$PATH
EXPOSE 8000
CMD ["tuneboard", "serve", "--host", "0.0.0.0", "--port", "8000"]

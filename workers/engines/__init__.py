"""Engines that turn (image, prompt) into model text: medgemma, vllm, demo."""

"""What pruning costs and what quantization costs: KL divergence to the base model.

:mod:`moeprune.kld.report` holds the pure parts (rows from parsed llama-perplexity output, the
equal-size rival, the self-check, recomputation from the stored evidence); :mod:`moeprune.kld.stage`
runs llama-perplexity and writes ``eval/kld.json``.
"""

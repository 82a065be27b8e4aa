"""The DHO trainer and what it needs: config, data (datasets, splits, sampling, transforms), models (students,
teachers), evaluation, checkpoints, logging, distributed, and the ``dho-fast`` CLI (:mod:`dho_fast.train.cli`).

It uses only the public op API (:mod:`dho_fast.ops`).
"""

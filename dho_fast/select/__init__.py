"""Active selection for ActiveKD (PCoreSet and its baselines) will live here; it uses only the public op API."""

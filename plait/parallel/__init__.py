"""Parallelism applied from outside the models: data parallel, and pipeline stages for plait's native models
(pipeline.py) and for stock transformers models (hf_pipeline.py)."""

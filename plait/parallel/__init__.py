"""Parallelism applied from outside the models: data parallel today; pipeline stages next."""

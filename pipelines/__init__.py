"""Orchestration of the GAN library: the DAG, Ray Train/Tune, MLflow, storage and the CLI."""

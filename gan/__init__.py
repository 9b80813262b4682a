"""ganpipe core: pure PyTorch/numpy GAN models, data and metrics (no Ray, MLflow or boto3)."""

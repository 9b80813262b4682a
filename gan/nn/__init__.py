"""Neural-network building blocks: models and normalization layers."""

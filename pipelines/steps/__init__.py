"""The pipeline's steps, one module each, and the default DAG that wires them."""

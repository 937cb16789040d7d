"""Finding local models and reading their facts: HF cache, GGUF headers, MLX configs."""

"""tinyllama-ref: a readable Llama-2 inference engine."""

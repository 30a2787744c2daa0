"""tca4rec: token-level collaborative alignment for LLM-based generative recommendation."""

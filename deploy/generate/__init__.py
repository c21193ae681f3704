"""Text generation on any runner: the token loop, its KV cache policy, sampling and tokenizers."""

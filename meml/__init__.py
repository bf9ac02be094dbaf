"""meml: a from-scratch PyTorch reference implementation of MEML-GRPO (arXiv 2508.09670)."""

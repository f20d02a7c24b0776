"""Model code that is ours rather than Hugging Face's: the block-diffusion drafter network."""

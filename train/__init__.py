"""Config, data, tokenizer, the training loop, evaluation, tracking and the methods."""

"""GPT-2: the model, its presets, tokenizer, data, checkpoints and the training-loop pieces."""

"""The source stage: conversations to tokenized prompts with loss masks, published exactly once."""

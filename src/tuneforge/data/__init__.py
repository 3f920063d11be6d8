"""Dataset formats, validation with line-level errors, chat templates and loss masks, batching."""

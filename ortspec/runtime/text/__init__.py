"""Text in and out: tokenizer, chat templates (sandboxed), prompt files."""

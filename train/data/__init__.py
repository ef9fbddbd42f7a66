"""Data: file formats and their row checks, named sources (local folder, Hub, URL), the generated
tasks, answer rules, tokenization of records, and the tokenizer."""

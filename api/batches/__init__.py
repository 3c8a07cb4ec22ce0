"""Files and batches on the API side: Redis records, input validation, OpenAI object shapes."""

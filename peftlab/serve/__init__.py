"""``peftlab serve``: one base model, many adapters of mixed methods in one batch, an OpenAI-compatible API."""

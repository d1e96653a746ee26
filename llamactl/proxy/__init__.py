"""The OpenAI-compatible proxy: routes by model, launches on demand, queues, streams, evicts."""

"""Generation: the OpenAI-compatible upstream (vLLM) the chat path sends prompts to."""

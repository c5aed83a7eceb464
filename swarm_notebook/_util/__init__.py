"""Small shared helpers below every layer: owned asyncio tasks, rate limiting, the loop thread."""

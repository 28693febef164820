"""The serving layer: request semantics between the routes and the engine (tokenization, limits,
compositions, decoding options, result shaping), for the native and the OpenAI routes."""

"""The bundled inference engine: load a Llama, Mistral, Mixtral, Qwen2/2.5, Qwen2-MoE, Qwen3, Qwen3-MoE,
Gemma 2, Gemma 3 or Phi-3 checkpoint and generate.

Entry points: `model.load_model`, `tokenizer.load_tokenizer`, `generate.generate`.
"""

"""The LLM recommender: LoRA SFT, generation + grounding to the catalog, title scoring."""

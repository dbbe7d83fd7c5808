"""Model code: the Llama family (Llama, Mistral, Qwen2) as our own torch modules."""

from engine.models.llama import LlamaForCausalLM

__all__ = ["LlamaForCausalLM"]

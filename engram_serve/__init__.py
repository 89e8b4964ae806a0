"""engram-serve: an OpenAI-compatible server for Engram-augmented language models."""

from engram_serve.engine.request import RequestOutput, SamplingParams
from engram_serve.llm import LLM

__all__ = ["LLM", "RequestOutput", "SamplingParams"]
__version__ = "0.1.0"

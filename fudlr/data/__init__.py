"""The data bundle: schemas, loading, builders for MovieLens, prompt templates."""

from fudlr.data.bundle import Bundle
from fudlr.data.prompts import MOVIES, PromptTemplate

__all__ = ["MOVIES", "Bundle", "PromptTemplate"]

"""Semantic similarity between classes (hierarchies, WordNet) and between captions (sentence embeddings)."""
from __future__ import annotations

from rayhash.semantics.hierarchy import ClassHierarchy
from rayhash.semantics.sentences import load_sentence_model, sentence_embeddings, sentence_similarity
from rayhash.semantics.wordnet import ensure_wordnet, install_wordnet, wordnet_synset

__all__ = ["ClassHierarchy", "sentence_similarity", "sentence_embeddings", "load_sentence_model",
           "ensure_wordnet", "install_wordnet", "wordnet_synset"]

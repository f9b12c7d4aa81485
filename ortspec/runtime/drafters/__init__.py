"""Proposers of draft tokens: a draft model or head, n-grams, suffix matching, and the hybrid."""

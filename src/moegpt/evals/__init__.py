"""Evaluations of a trained model: long-context retrieval and perplexity (`moegpt eval`)."""

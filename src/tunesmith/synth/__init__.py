"""Training data from documents: read, chunk, ask a model for questions and answers, filter, write."""

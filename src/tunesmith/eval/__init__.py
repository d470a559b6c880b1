"""Evaluation: perplexity, multiple choice by log-likelihood and generation tasks (`tunesmith eval`)."""

"""Tuneboard: a self-hosted dashboard for PEFT fine-tuning of causal language models."""

"""Adapters to other evaluation frameworks (optional extras)."""

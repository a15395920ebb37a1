"""Pigeon ui."""

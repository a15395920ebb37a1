"""Pigeon node."""

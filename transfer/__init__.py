"""Pigeon transfer."""

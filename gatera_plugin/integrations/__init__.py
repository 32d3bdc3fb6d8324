"""Integrations with training frameworks (imported only by those frameworks)."""

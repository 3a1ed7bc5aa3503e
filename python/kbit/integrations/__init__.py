"""Integrations with other libraries; each is imported on demand and imports its library lazily."""

"""Process settings (env + .env, prefix FREEFERENCE_) and the catalog file models."""

from settings.config import Settings, get_settings

__all__ = ["Settings", "get_settings"]

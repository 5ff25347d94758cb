"""Compatibility alias: the server lives in runtime.serve (import from there)."""

from runtime.serve import ApiError, DynamicBatcher, ServeSettings, app_from_env, create_app, serve

__all__ = ["ApiError", "DynamicBatcher", "ServeSettings", "app_from_env", "create_app", "serve"]

"""The JSON API (/api/v1): `setup(app)` adds its routes to the relay's web app."""

from relay.web.api.routes import setup

__all__ = ["setup"]

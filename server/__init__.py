"""statehost.server: the device-owning FastAPI server (``statehost serve``)."""

from statehost.server.app import create_app
from statehost.server.settings import Settings

__all__ = ["Settings", "create_app"]

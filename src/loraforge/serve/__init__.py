"""The local server: FastAPI routers per endpoint family, wired in `create_app()`."""

"""Errors the product reports to people: one message that names the field, record or file."""

from __future__ import annotations


class LoraforgeError(Exception):
    """Base of every error that is the user's to fix (bad config, bad data, unknown model).

    The CLI prints these without a traceback; the server turns them into 4xx JSON errors.
    """

    code = "invalid_request"
    status = 400

    def __init__(self, message: str, *, field: str | None = None):
        super().__init__(message)
        self.message = message
        self.field = field


class ConfigError(LoraforgeError):
    code = "invalid_config"
    status = 422


class InsufficientMemory(LoraforgeError):
    """The run's estimated peak memory exceeds what the machine has (the message names the fixes)."""

    code = "insufficient_memory"
    status = 422


class DataError(LoraforgeError):
    """Bad training or evaluation data (a record, a line, a file): the request's input, so a 400."""
    code = "invalid_data"
    status = 400


class InvalidName(LoraforgeError):
    code = "invalid_name"
    status = 400


class NotFound(LoraforgeError):
    code = "not_found"
    status = 404


class Conflict(LoraforgeError):
    code = "conflict"
    status = 409


class DeviceError(LoraforgeError):
    code = "device_unsupported"
    status = 422


class IntegrityError(LoraforgeError):
    code = "integrity_error"
    status = 409

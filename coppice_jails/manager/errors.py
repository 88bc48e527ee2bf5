"""What the manager refuses or fails to do; the REST layer maps each class to a status."""

from __future__ import annotations


class SandboxError(Exception):
    """A request the manager refuses or could not carry out; the message is for the client."""


class NotFound(SandboxError):
    pass


class TemplateNotFound(NotFound):
    """An unknown template; the message names the available ones."""


class Conflict(SandboxError):
    pass


class InvalidArgument(SandboxError):
    pass


class OperationFailed(SandboxError):
    """A backend (storage, runtime, registry) failed; what was made has been rolled back."""

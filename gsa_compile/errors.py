"""Exceptions raised by gsa_compile. Each message names what was wrong and what is allowed."""


class GSAError(Exception):
    """Base class of every error gsa_compile raises on purpose."""


class GSAConfigError(GSAError, ValueError):
    """A GSAConfig field has a value outside what the spec allows."""


class GSAInputError(GSAError, ValueError):
    """A tensor handed to a GSA op has the wrong shape, dtype or device."""


class GSABackendUnavailable(GSAError, RuntimeError):
    """A backend was asked for explicitly but cannot run here (missing package or device)."""

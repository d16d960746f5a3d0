"""One family of errors for everything a user can get wrong.

Every error the library raises on purpose — a bad checkpoint, a manifest that cannot be
opened, a recipe given a parameter it does not take — is a :class:`SoupError`. The ``soup``
command and the app catch this family (and ``OSError``) alone, so a genuine bug still ends in
a traceback instead of hiding behind a one-line message. ``SoupError`` is a ``ValueError``, so
code written against the old ``ValueError`` subclasses keeps working.

>>> from soup_core.errors import CheckpointError, SoupError
>>> issubclass(CheckpointError, SoupError) and issubclass(SoupError, ValueError)
True
"""

from __future__ import annotations


class SoupError(ValueError):
    """Something the user can fix; the message says what is wrong and what to do."""


class CheckpointError(SoupError):
    """A checkpoint cannot be read, written, or does not fit with the others."""


class ZooError(SoupError):
    """A manifest or folder that cannot be opened; the message names the file and the field."""


class ModelError(SoupError):
    """No model can be built for a checkpoint (unknown architecture, missing package)."""


class DataError(SoupError):
    """A ``[data]`` table that cannot be turned into an evaluator."""


class RecipeError(SoupError):
    """A recipe asked for something it cannot do: unknown name, bad parameter, missing θ0."""


class UsageError(SoupError):
    """A command-line request that makes no sense (a flag out of range, an unknown split)."""


__all__ = ["CheckpointError", "DataError", "ModelError", "RecipeError", "SoupError", "UsageError", "ZooError"]

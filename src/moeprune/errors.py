"""User-facing errors.

Every failure a user can cause (bad recipe, missing file, wrong model) is raised as a
:class:`MoepruneError` whose message names the file or field and what to do. ``tasks.py``
turns it into ``invoke.Exit`` so users see one clear line, not a traceback.
"""

from __future__ import annotations


class MoepruneError(Exception):
    """An error whose message is meant for the user, as is."""


class RecipeError(MoepruneError):
    """A recipe file that cannot be used."""

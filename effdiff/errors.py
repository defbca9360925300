"""User-facing errors: the CLI prints them as one line and exits non-zero."""


class EffdiffError(Exception):
    """A problem the user can fix (bad path, bad option, incompatible artifacts)."""


class ValidationFailed(EffdiffError):
    """Exported graphs ran but differ from PyTorch beyond tolerance; artifacts and report are kept."""


class FolderBusy(EffdiffError):
    """Another live process holds the folder's write lock (e.g. the old owner of a shard that Ray is
    restarting elsewhere has not exited yet)."""

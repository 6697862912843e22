"""Every error hyperfleet raises on purpose derives from :class:`HyperfleetError`.

Each message says what was wrong and how to fix it, because the command line prints it as is
(without a traceback) and exits with status 2.
"""

from __future__ import annotations


class HyperfleetError(Exception):
    """Root of every error hyperfleet raises on purpose."""


class ConfigError(HyperfleetError):
    """A flag, keyword argument or configuration value is invalid."""


class ObjectiveError(HyperfleetError):
    """The objective cannot be found, imported or called."""


class ResourceError(HyperfleetError):
    """A GPU or CPU request cannot be met by this machine."""


class StorageError(HyperfleetError):
    """The Optuna storage cannot be opened or contradicts the request."""


class RunDirError(HyperfleetError):
    """The run directory cannot be used (not writable, or in use by another controller)."""


class WorkerError(HyperfleetError):
    """A worker process could not be started or broke its protocol."""


class NodeError(HyperfleetError):
    """An agent cannot reach its controller, or the controller refused it."""


class ArtifactNotSeen(HyperfleetError):
    """An objective's file-system artifact store wrote where the controller cannot read (a
    node's own disk): nobody could download the artifact, so its record is refused."""


class TrialInterrupted(HyperfleetError):
    """Raised by an objective that stops early because hyperfleet asked it to.

    After :func:`hyperfleet.should_stop` answers True (the controller got SIGTERM), save the
    checkpoint and raise this: the trial is recorded as interrupted and its next attempt
    continues from the checkpoint. Raised when no stop was asked, it fails the trial.
    """

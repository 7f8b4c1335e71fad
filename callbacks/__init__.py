"""Training-side integrations: `from guardian.callbacks import GuardianCallback`."""

from guardian.callbacks.trainer_callback import GuardianCallback

__all__ = ["GuardianCallback"]

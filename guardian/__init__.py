"""Guardian: watches training runs and rescues them from NaNs, loss spikes and divergence."""

__version__ = "0.1.0"

"""relayd: stands in for a transcription provider's webhook by polling within its rate budget."""

__version__ = "0.1.0"

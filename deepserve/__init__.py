"""deepserve: a self-hosted inference platform for DeepSeek-family models."""

__version__ = "0.1.0"

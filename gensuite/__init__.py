"""gensuite: classic generative model families as reproducible batch jobs."""

__version__ = "0.1.0"

"""Built-in families; importing this package registers them."""

from gensuite.families import gan, vae  # noqa: F401

"""Built-in families; importing this package registers them."""

from gensuite.families import classifier, cnf, diffusion, ebm, flow, gan, stackgan, vae  # noqa: F401

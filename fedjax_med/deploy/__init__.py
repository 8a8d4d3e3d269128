"""A federated config run across real hospitals on Flower: ``pip install 'fedjax_med[deploy]'``."""
